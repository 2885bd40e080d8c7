"""patch_lavin / set_skipped against the reference of EAS_SPEC §2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eas_kernels
from eas_kernels import (
    SkipPlan,
    from_pretrained,
    greedy_generate,
    patch_lavin,
    save_pretrained,
    set_skipped,
    skipped_mhas,
    unpatch,
)
from eas_kernels.patch import runtime_of
from tests.helpers import (
    assert_all_or_nothing,
    assert_bitwise,
    left_pad,
    patched,
    random_sequences,
    randomize_pias,
    structure,
    tiny_model,
    weights_snapshot,
)
from tests.reference import eas_forward_reference


def test_fresh_patch_without_skips_is_exactly_the_unpatched_model():
    model = tiny_model(seed=5)
    original = copy.deepcopy(model)
    patch_lavin(model, SkipPlan(4, []))
    sequences = random_sequences([4, 8, 6], vocab=97, seed=1)
    tokens, real = left_pad(sequences)
    assert torch.equal(model(tokens, attention_mask=real), original(tokens, attention_mask=real))
    ours, theirs = greedy_generate(model, sequences, 5), greedy_generate(original, sequences, 5)
    assert ours.tokens == theirs.tokens and torch.equal(ours.logits, theirs.logits)


@pytest.mark.parametrize("skipped", [[1], [0, 2, 3]])
def test_fresh_patch_with_skips_is_the_model_with_those_mhas_deleted(skipped):
    model = tiny_model(seed=6)
    patch_lavin(model, SkipPlan(4, skipped))
    tokens = torch.tensor(random_sequences([10], vocab=97, seed=2))
    # The reference runs no PIA at all here: every up projection is zero.
    bare = copy.deepcopy(model)
    for block in bare.layers:
        for name in ("attn_adapter", "skip_pia"):
            if hasattr(block, name):
                delattr(block, name)
    expected = eas_forward_reference(bare, tokens[0], 10, set(skipped))
    torch.testing.assert_close(model(tokens)[0], expected, rtol=1e-5, atol=1e-5)


def test_structure_freezing_and_state_dict_keys():
    model = tiny_model()
    patch_lavin(model, SkipPlan(4, [1, 3], skip_rank=5, adapter_rank=2))
    for index, block in enumerate(model.layers):
        if index in (1, 3):
            assert block.skip_pia.rank == 5 and block.skip_pia.token_mixing
            assert not hasattr(block, "attn_adapter")
        else:
            assert block.attn_adapter.rank == 2 and block.attn_adapter.down2 is None
            assert not hasattr(block, "skip_pia")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("attn_adapter" in n) or ("skip_pia" in n) for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if "pia" in n or "adapter" in n)
    assert "layers.1.skip_pia.down2.weight" in model.state_dict()
    assert "layers.0.attn_adapter.router.weight" in model.state_dict()
    assert skipped_mhas(model) == (1, 3)


def test_skipped_mhas_hold_no_kv_cache_and_run_no_attention():
    model = patched([1, 2], seed=8)
    calls = []
    for block in model.layers:
        block.attention.register_forward_hook(lambda module, args, out: calls.append(module))
    greedy_generate(model, [[5, 6, 7]], 4)
    for index, block in enumerate(model.layers):
        has_cache = block.attention.cache_k is not None
        assert has_cache == (index not in (1, 2)), index
    assert {id(m) for m in calls} == {id(model.layers[i].attention) for i in (0, 3)}


def test_patching_frees_an_allocated_cache():
    model = tiny_model()
    model(torch.tensor([[1, 2]]), start_pos=0)
    assert model.layers[2].attention.cache_k is not None
    patch_lavin(model, SkipPlan(4, [2]))
    assert model.layers[2].attention.cache_k is None


def test_training_step_touches_only_pias():
    model = patched([1], seed=9)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = torch.randint(1, 97, (2, 7))
    prompt = torch.zeros(2, 7, dtype=torch.bool)
    prompt[:, :4] = True
    model.train()
    loss = F.cross_entropy(
        model(tokens, prompt_mask=prompt)[:, 3:-1].flatten(0, 1), tokens[:, 4:].flatten()
    )
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in snapshot:
            assert torch.equal(parameter, snapshot[name]), name


def test_set_skipped_switches_roles_under_search():
    model = patched([], seed=10, search=True)
    tokens = torch.tensor(random_sequences([9], vocab=97, seed=5))
    for skip_set in ([0, 3], [1], [], [0, 1, 2, 3]):
        set_skipped(model, skip_set)
        assert skipped_mhas(model) == tuple(skip_set)
        expected = eas_forward_reference(model, tokens[0], 9, set(skip_set))
        torch.testing.assert_close(model(tokens)[0], expected, rtol=1e-5, atol=1e-5)
        # the decode path follows the new roles too
        greedy_generate(model, [tokens[0, :4].tolist()], 3)
        for index, block in enumerate(model.layers):
            assert (block.attention.cache_k is None) == (index in skip_set)
            if index in skip_set:
                continue
            block.attention.cache_k = None  # lazily re-allocated; reset for the next round
            block.attention.cache_v = None


def test_set_skipped_refuses_roles_without_pias():
    model = patched([1, 2])
    with pytest.raises(ValueError, match="layer 0 has no skip PIA"):
        set_skipped(model, [0])
    with pytest.raises(ValueError, match="layer 2 has no attention adapter"):
        set_skipped(model, [1])
    with pytest.raises(ValueError, match="out of range"):
        set_skipped(model, [4])
    with pytest.raises(ValueError, match="duplicate indices"):
        set_skipped(model, [1, 1])
    with pytest.raises(TypeError, match="ints"):
        set_skipped(model, ["1"])
    assert skipped_mhas(model) == (1, 2)
    with pytest.raises(TypeError, match="not patched"):
        set_skipped(tiny_model(), [1])


def test_bad_patches_are_refused_and_leave_the_model_unchanged():
    model = tiny_model()
    snapshot = weights_snapshot(model)
    cases = [
        ((model, SkipPlan(5, [1])), ValueError, "5 layers but the model has 4"),
        ((model, [1, 2]), TypeError, "SkipPlan"),
        ((nn.Linear(4, 4), SkipPlan(4, [])), ValueError, "no LaVIN-style blocks"),
        (("model", SkipPlan(4, [])), TypeError, "nn.Module"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            patch_lavin(*args)
    assert_bitwise(model, snapshot)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(hasattr(block, "skip_pia") for block in model.layers)
    mixed = tiny_model()
    mixed.layers[2].feed_forward.w1.to(torch.float64)
    with pytest.raises(ValueError, match="block 2"):
        patch_lavin(mixed, SkipPlan(4, []))
    assert all(p.requires_grad for p in mixed.parameters())
    patch_lavin(model, SkipPlan(4, []))
    with pytest.raises(ValueError, match="already patched"):
        patch_lavin(model, SkipPlan(4, []))


# ---------------------------------------------------------------------- foreign LaVIN tree
class ForeignAttention(nn.Module):
    """LaVIN-like: eager caches and the (x, start_pos, freqs_cis, mask, adapter) call."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.cache_k = torch.zeros(2, 32, dim)
        self.cache_v = torch.zeros(2, 32, dim)

    def forward(self, x, start_pos, freqs_cis, mask, adapter=None):
        batch, n, _ = x.shape
        self.cache_k[:batch, start_pos : start_pos + n] = self.wk(x)
        self.cache_v[:batch, start_pos : start_pos + n] = self.wv(x)
        keys = self.cache_k[:batch, : start_pos + n]
        values = self.cache_v[:batch, : start_pos + n]
        scores = self.wq(x) @ keys.transpose(1, 2) / x.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + mask
        return self.wo(torch.softmax(scores, dim=-1) @ values)


class ForeignFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ForeignBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention, self.feed_forward = ForeignAttention(dim), ForeignFFN(dim)
        self.attention_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, start_pos, freqs_cis, mask, adapter=None):
        h = x + self.attention.forward(self.attention_norm(x), start_pos, freqs_cis, mask, adapter)
        return h + self.feed_forward.forward(self.ffn_norm(h))


class ForeignModel(nn.Module):
    """No prompt_mask argument: EAS states come from set_prompt_mask."""

    def __init__(self, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.blocks = nn.ModuleList(ForeignBlock(dim) for _ in range(layers))

    def forward(self, tokens, start_pos):
        h = self.embed(tokens)
        n = tokens.shape[1]
        mask = None
        if n > 1:
            mask = torch.full((n, n), float("-inf")).triu(1)
            mask = torch.cat([torch.zeros(n, start_pos), mask], dim=1)
        for block in self.blocks:
            h = block(h, start_pos, None, mask)
        return h


def test_patch_works_on_a_foreign_lavin_style_model():
    torch.manual_seed(0)
    model = ForeignModel().eval()
    original = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (2, 6))
    patch_lavin(model, SkipPlan(3, [1], skip_rank=4, adapter_rank=2))
    assert model.blocks[1].attention.cache_k is None
    # fresh PIAs: the kept layers compute exactly the original blocks
    with torch.no_grad():
        kept_only = original.blocks[0](original.embed(tokens), 0, None, None)
        ours = model.blocks[0](model.embed(tokens), 0, None, None)
    assert torch.equal(ours, kept_only)
    # trained PIAs, frozen prompt state: teacher forcing == prefill + one decode step
    randomize_pias(model, seed=3)
    prompt = torch.zeros(2, 6, dtype=torch.bool)
    prompt[:, :5] = True
    eas_kernels.set_prompt_mask(model, prompt)
    full = model(tokens, 0)
    eas_kernels.set_prompt_mask(model, None)
    prefix = model(tokens[:, :5], 0)
    step = model(tokens[:, 5:], 5)
    torch.testing.assert_close(torch.cat([prefix, step], dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="selects no token"):
        eas_kernels.set_prompt_mask(model, torch.zeros(2, 6, dtype=torch.bool))


def test_unpatch_restores_the_original_model_exactly():
    model = tiny_model(seed=16)
    model.layers[0].ffn_norm.weight.requires_grad_(False)  # a flag unpatch must give back
    original = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    eas_kernels.patch_lavin(model, SkipPlan(4, [1, 2]))
    randomize_pias(model, seed=4)
    eas_kernels.reparameterize(model, "merge")
    greedy_generate(model, [[3, 4, 5]], 3)  # leaves the PIAs merged into the weights
    eas_kernels.unpatch(model)
    assert_bitwise(model, weights_snapshot(original))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for block in model.layers:
        assert not block._forward_pre_hooks and "forward" not in block.__dict__
        assert not block.attention_norm._forward_hooks and not block.ffn_norm._forward_hooks
        assert not block.attention.wq._forward_hooks and block.attention.wq.bias is None
    assert not model._forward_pre_hooks
    sequences = random_sequences([4, 7], vocab=97, seed=9)
    assert (
        greedy_generate(model, sequences, 4).tokens
        == greedy_generate(original, sequences, 4).tokens
    )
    tokens = torch.tensor(sequences[1:])
    assert torch.equal(model(tokens), original(tokens))
    with pytest.raises(TypeError, match="not patched"):
        eas_kernels.unpatch(model)
    eas_kernels.patch_lavin(model, SkipPlan(4, [3]))  # patchable again


# ---------------------------------------------------------------------- all or nothing
@pytest.mark.parametrize("search", [False, "mha_or_ffn"])
def test_a_patch_interrupted_anywhere_leaves_the_model_as_it_was(monkeypatch, search):
    """KeyboardInterrupt at every PIA the patch installs (every block), while it switches
    roles and while it hooks the masks: the model is bitwise and structurally unchanged,
    and can be patched (and unpatched) afterwards."""
    from eas_kernels import patch as patch_module
    from eas_kernels.patch import EASPatch

    plan = SkipPlan(4, [1, 2], skip_rank=6, adapter_rank=3)
    sites = len(runtime_of(patch_lavin(tiny_model(), plan, search=search)).sites)
    points = [(EASPatch, "_add_site", k) for k in range(sites)]
    points += [(EASPatch, "apply", 0), (patch_module, "_install_mask_hook", 0)]
    assert_all_or_nothing(
        monkeypatch, tiny_model, lambda m: patch_lavin(m, plan, search=search), unpatch, points
    )


def test_a_rank_above_the_width_is_refused_before_anything_is_allocated(tmp_path):
    model = tiny_model()  # width 48
    before = structure(model)
    with pytest.raises(ValueError, match=r"plan\.skip_rank = 1099511627776 exceeds"):
        patch_lavin(model, SkipPlan(4, [1], skip_rank=2**40))
    with pytest.raises(ValueError, match=r"plan\.adapter_rank = 49 exceeds the model's width 48"):
        patch_lavin(model, SkipPlan(4, [1], adapter_rank=49))
    assert structure(model) == before
    folder = save_pretrained(patch_lavin(tiny_model(), SkipPlan(4, [1])), tmp_path / "eas")
    document = json.loads((folder / "eas_plan.json").read_text())
    document["plan"]["skip_rank"] = 2**40  # a tampered checkpoint
    (folder / "eas_plan.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="skip_rank = 1099511627776 exceeds"):
        from_pretrained(model, folder)
    assert structure(model) == before
