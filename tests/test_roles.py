"""FFN skips, whole-block (DAS) skips and the search candidate sets, against EAS_SPEC §2/§6.

Every role against the spec reference, and decoding = teacher forcing in every mode, are
in the contract (tests/contract.py, run on both layouts by tests/test_contract.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import eas_kernels
from eas_kernels import (
    SkipPlan,
    current_plan,
    from_pretrained,
    greedy_generate,
    patch_lavin,
    reparameterize,
    save_pretrained,
    set_skipped,
    unpatch,
)
from tests.helpers import (
    assert_bitwise,
    patched,
    random_sequences,
    randomize_pias,
    tiny_model,
    weights_snapshot,
)

ROLE_CASES = [  # (skipped MHAs, skipped FFNs)
    ([], [1]),
    ([2], [0, 3]),
    ([1, 2], [2]),  # block 2 skipped whole
    ([0, 3], [0, 3]),  # DAS: two blocks skipped whole
]


def test_ffn_skip_pia_merges_into_the_attention_projections_and_restores_bitwise():
    model = patched([], skipped_ffns=(1, 2), seed=13)
    pristine = weights_snapshot(model)
    block = model.layers[1]
    assert block.ffn_skip_pia.token_mixing and block.ffn_skip_pia.rank == 6
    assert not hasattr(block, "attn_adapter") and not hasattr(block, "skip_pia")
    reparameterize(model, "merge")
    prompt = random_sequences([6], vocab=97, seed=6)[0]
    greedy_generate(model, [prompt], 3)
    assert not torch.equal(block.attention.wq.weight, pristine["layers.1.attention.wq.weight"])
    assert torch.equal(block.feed_forward.w1.weight, pristine["layers.1.feed_forward.w1.weight"])
    greedy_generate(model, [prompt[:3]], 1)  # a new prefill puts the weights back
    reparameterize(model, "eager")
    model(torch.tensor([prompt]), start_pos=0)
    assert_bitwise(model, pristine)


def test_block_adapter_is_das_and_never_merged():
    model = patched([2], skipped_ffns=(2,), seed=14)
    block = model.layers[2]
    adapter = block.block_adapter
    assert adapter.rank == 6 and not adapter.token_mixing
    for name in ("attn_adapter", "skip_pia", "ffn_skip_pia"):
        assert not hasattr(block, name)
    pristine = weights_snapshot(model)
    reparameterize(model, "merge")
    greedy_generate(model, [random_sequences([5], vocab=97, seed=7)[0]], 3)
    for name in ("attention.wq.weight", "feed_forward.w1.weight"):
        assert torch.equal(getattr_path(block, name), pristine[f"layers.2.{name}"])
    assert block.attention.cache_k is None  # no attention, no KV cache


def getattr_path(module: torch.nn.Module, path: str) -> torch.Tensor:
    for part in path.split("."):
        module = getattr(module, part)
    return module


@pytest.mark.parametrize(
    ("search", "roles"),
    [
        ("mha", {"attn_adapter", "skip_pia"}),
        ("ffn", {"attn_adapter", "ffn_skip_pia"}),
        ("block", {"attn_adapter", "block_adapter"}),
        ("mha_or_ffn", {"attn_adapter", "skip_pia", "ffn_skip_pia", "block_adapter"}),
    ],
)
def test_search_candidates_install_the_pias_their_roles_need(search, roles):
    model = patch_lavin(tiny_model(seed=1), SkipPlan(4, []), search=search)
    for block in model.layers:
        present = {n for n in ("attn_adapter", "skip_pia", "ffn_skip_pia", "block_adapter")}
        assert {n for n in present if hasattr(block, n)} == roles
    candidates = eas_kernels.search.Candidates(search, 4)
    for arms in ([0, 1], [1, 3]) if candidates.num_arms == 4 else ([0, 5], [2, 6]):
        mhas, ffns = candidates.skip_sets(arms)
        set_skipped(model, mhas, ffns=ffns)
        assert current_plan(model) == candidates.plan(arms, SkipPlan(4, []))


def test_search_patch_equals_plan_patch_for_every_role():
    """Switching a searched model to a plan computes what patching with the plan does."""
    searched = patch_lavin(tiny_model(seed=2), SkipPlan(4, []), search="mha_or_ffn")
    randomize_pias(searched, seed=3)
    set_skipped(searched, [1, 2], ffns=[2, 3])
    plan = current_plan(searched)
    direct = patch_lavin(tiny_model(seed=2), plan)
    state = {k: v for k, v in searched.state_dict().items() if k in direct.state_dict()}
    direct.load_state_dict(state, strict=True)
    tokens = torch.tensor(random_sequences([9], vocab=97, seed=8))
    torch.testing.assert_close(searched(tokens), direct(tokens), rtol=0, atol=0)


def test_set_skipped_refuses_roles_the_patch_cannot_play():
    model = patched([1], seed=15)  # plain plan: no FFN-skip or block PIAs anywhere
    with pytest.raises(ValueError, match="layer 0 has no FFN-skip PIA"):
        set_skipped(model, [1], ffns=[0])
    with pytest.raises(ValueError, match="layer 1 has no block adapter"):
        set_skipped(model, [1], ffns=[1])
    with pytest.raises(ValueError, match="ffns"):
        set_skipped(model, [1], ffns=[9])
    assert current_plan(model) == SkipPlan(4, [1], skip_rank=6, adapter_rank=3)
    with pytest.raises(ValueError, match="search must be"):
        patch_lavin(tiny_model(), SkipPlan(4, []), search="attention")


def test_unpatch_restores_ffn_and_block_forwards():
    model = tiny_model(seed=4)
    original = copy.deepcopy(model)
    patch_lavin(model, SkipPlan(4, [0, 1], skipped_ffns=[1, 2]), search="mha_or_ffn")
    unpatch(model)
    tokens = torch.tensor(random_sequences([8], vocab=97, seed=9))
    assert torch.equal(model(tokens), original(tokens))
    for block in model.layers:
        assert "forward" not in block.__dict__ and "forward" not in block.feed_forward.__dict__


def test_plan_roles_json_and_version_1_documents():
    plan = SkipPlan(6, [1, 4], skipped_ffns=[4, 5])
    names = [plan.role(i).name for i in range(6)]
    assert names == ["kept", "skipped_mha", "kept", "kept", "skipped_block", "skipped_ffn"]
    assert plan.skipped_blocks == (4,)
    assert SkipPlan.from_json(plan.to_json()) == plan
    version_1 = {k: v for k, v in SkipPlan(6, [1]).to_dict().items() if k != "skipped_ffns"}
    version_1["version"] = 1
    assert SkipPlan.from_dict(version_1) == SkipPlan(6, [1])
    with pytest.raises(ValueError, match="skipped_ffns"):
        SkipPlan(6, [1], skipped_ffns=[6])
    assert plan.replace(skipped_ffns=[]) == SkipPlan(6, [1, 4])


@pytest.mark.parametrize("active_only", [False, True])
def test_checkpoints_keep_ffn_and_block_roles(tmp_path, active_only):
    model = patch_lavin(tiny_model(seed=5), SkipPlan(4, []), search="mha_or_ffn")
    randomize_pias(model, seed=6)
    set_skipped(model, [0, 2], ffns=[2, 3])
    save_pretrained(model, tmp_path, active_only=active_only)
    document = json.loads((tmp_path / "eas_plan.json").read_text())
    assert document["search"] == (None if active_only else "mha_or_ffn")
    loaded = from_pretrained(tiny_model(seed=5), tmp_path)
    assert current_plan(loaded) == current_plan(model)
    all_pias = ("attn_adapter", "skip_pia", "ffn_skip_pia", "block_adapter")
    present = [[n for n in all_pias if hasattr(block, n)] for block in loaded.layers]
    if active_only:
        assert present == [["skip_pia"], ["attn_adapter"], ["block_adapter"], ["ffn_skip_pia"]]
    else:
        assert present == [list(all_pias)] * 4
    tokens = torch.tensor(random_sequences([9], vocab=97, seed=10))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(("mhas", "ffns"), ROLE_CASES)
def test_a_deep_copy_of_a_patched_model_computes_with_its_own_modules(mhas, ffns):
    model = patched(mhas, skipped_ffns=tuple(ffns), seed=16)
    twin = copy.deepcopy(model)
    tokens = torch.tensor(random_sequences([10, 10], vocab=97, seed=11))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :6] = True
    expected = model(tokens, prompt_mask=mask)
    torch.testing.assert_close(twin(tokens, prompt_mask=mask), expected, rtol=0, atol=0)
    pristine = weights_snapshot(model)
    with torch.no_grad():
        for block in twin.layers:
            block.feed_forward.w1.weight.mul_(1.5)
            block.attention_norm.weight.mul_(0.5)
    assert not torch.allclose(twin(tokens, prompt_mask=mask), expected)
    reparameterize(twin, "merge")
    greedy_generate(twin, [tokens[0].tolist()], 2)
    assert torch.equal(model(tokens, prompt_mask=mask), expected)
    assert_bitwise(model, pristine)


@pytest.mark.parametrize(("mhas", "ffns"), ROLE_CASES)
def test_the_floor_computes_what_a_fresh_patch_computes(mhas, ffns):
    """Fresh PIAs add exactly zero, so the floor (parts deleted, nothing added) and a
    freshly patched model agree for every role."""
    from eas_kernels.tuning.evaluate import floor_model

    base = tiny_model(seed=17)
    plan = SkipPlan(4, mhas, skipped_ffns=ffns)
    floor = floor_model(base, plan)
    fresh = patch_lavin(copy.deepcopy(base), plan)
    tokens = torch.tensor(random_sequences([9], vocab=97, seed=12))
    torch.testing.assert_close(floor(tokens), fresh(tokens), rtol=1e-6, atol=1e-6)
    assert not any("forward" in block.__dict__ for block in base.layers)  # base untouched


# ---------------------------------------------------------------------- a new role
class SkippedMHAUnmixed(eas_kernels.roles.SkippedMHA):
    """A role that is not built in: the MHA skipped, its PIA without token mixing."""

    name = "skipped_mha_unmixed"
    pia_name = "unmixed_skip_pia"
    label = "unmixed skip PIA"

    def token_mixing(self, plan: SkipPlan) -> bool:
        return False


UNMIXED = SkippedMHAUnmixed()


class UnmixedAt(SkipPlan):
    """A plan whose layers in ``unmixed`` take the new role (as a routing plan will)."""

    __slots__ = ("unmixed",)

    def __init__(self, num_layers: int, unmixed: list[int], **options: object) -> None:
        super().__init__(num_layers, [], **options)
        object.__setattr__(self, "unmixed", tuple(unmixed))

    def role(self, layer: int) -> eas_kernels.roles.Role:
        return UNMIXED if layer in self.unmixed else super().role(layer)


@pytest.fixture
def unmixed_role():
    role = eas_kernels.roles.register_role(UNMIXED)
    yield role
    del eas_kernels.roles.ROLES[role.name]


def test_a_new_role_is_one_class_and_one_registration(unmixed_role, tmp_path):
    """The new role computes what the built-in skipped-MHA role computes without token
    mixing, merges and restores bitwise, saves under its own keys and unpatches."""
    sizes = dict(skip_rank=6, adapter_rank=3)
    ours = patch_lavin(tiny_model(seed=21), UnmixedAt(4, [2], **sizes))
    built_in = patch_lavin(tiny_model(seed=21), SkipPlan(4, [2], token_mixing=False, **sizes))
    assert ours.layers[2].unmixed_skip_pia.down2 is None and not hasattr(ours.layers[2], "skip_pia")
    randomize_pias(built_in, seed=22)
    state = {k.replace("skip_pia", "unmixed_skip_pia"): v for k, v in built_in.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    pristine = weights_snapshot(tiny_model(seed=21))
    tokens = torch.tensor(random_sequences([9], vocab=97, seed=13))
    torch.testing.assert_close(ours(tokens), built_in(tokens), rtol=0, atol=0)
    reparameterize(ours, "merge")
    prompt = tokens[0, :5].tolist()
    merged = greedy_generate(ours, [prompt], 3)
    assert not torch.equal(
        ours.layers[2].feed_forward.w1.weight, pristine["layers.2.feed_forward.w1.weight"]
    )
    eager = greedy_generate(built_in, [prompt], 3)
    assert merged.tokens == eager.tokens
    torch.testing.assert_close(merged.logits, eager.logits, rtol=2e-4, atol=2e-4)
    save_pretrained(ours, tmp_path)
    from safetensors.torch import load_file

    assert "layers.2.unmixed_skip_pia.down1.weight" in load_file(
        str(tmp_path / "eas_pia.safetensors")
    )
    unpatch(ours)
    assert_bitwise(ours, pristine)
    assert not any(hasattr(block, "unmixed_skip_pia") for block in ours.layers)


def test_roles_are_singletons_across_copies_and_refuse_unregistered_ones():
    model = patched([1], search=True, seed=23)
    twin = copy.deepcopy(model)
    set_skipped(twin, [2, 3])  # the copy's sites are keyed by the registered roles
    assert current_plan(twin).skipped == (2, 3) and current_plan(model).skipped == (1,)
    with pytest.raises(ValueError, match="layer 2: <role skipped_mha_unmixed> is not registered"):
        patch_lavin(tiny_model(seed=1), UnmixedAt(4, [2]))
    with pytest.raises(ValueError, match="clashes with the registered <role skipped_mha>"):
        eas_kernels.roles.register_role(eas_kernels.roles.SkippedMHA())
