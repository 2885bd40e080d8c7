"""What the merge keeps across prompts: factors, state buffers and the prepared call
(eas_kernels.kept_merge, EAS_SPEC §4)."""

from __future__ import annotations

import pytest
import torch

import eas_kernels.kept_merge as kept_module
from eas_kernels import PIA, reparameterize, set_skipped
from eas_kernels.kept_merge import KeptMerge
from eas_kernels.ops import products_from_factors
from eas_kernels.patch import runtime_of
from eas_kernels.pia import PIAState
from tests.helpers import (
    assert_bitwise,
    decode_logits,
    patched,
    random_sequences,
    weights_snapshot,
)


@pytest.mark.parametrize("rank, outs", [(1, [7]), (5, [33, 17, 40]), (8, [64, 64])])
def test_q_from_the_factors_is_w_times_the_mixed_up_projection(rank, outs):
    """Q from Fᵀ = W Uᵀ and the state is [W W_uᵀ | W βᵀ], W_u and β mixed from the state
    by the PIA (float64, exact)."""
    torch.manual_seed(rank)
    dim = 24
    pia = PIA(dim, rank).double()
    with torch.no_grad():
        for parameter in pia.parameters():
            parameter.normal_(0, 0.5)
    weights = [torch.randn(out, dim, dtype=torch.float64) for out in outs]
    state = PIAState(torch.randn(1, rank).double(), torch.softmax(torch.randn(1, 2), -1).double())
    w_u, beta = pia.mixed_up_projection(state)
    basis = pia.up_basis()
    factors_t = torch.cat([(basis @ weight.t()).t() for weight in weights])
    mix = torch.cat([state.alpha[0], state.c[0]])
    with torch.no_grad():
        q = products_from_factors(factors_t, mix)
    expected = torch.cat([weight @ torch.cat([w_u[0], beta[0, None]]).t() for weight in weights])
    torch.testing.assert_close(q, expected, rtol=1e-12, atol=1e-12)


def merged_model(**options: object) -> torch.nn.Module:
    model = patched([1, 2], **options)
    reparameterize(model, "merge")
    return model


def test_the_factors_are_built_once_and_every_prompt_decodes_alike(monkeypatch):
    """F is built at the first merge and read by every later one; the first prompt and
    the later ones merge with the same arithmetic: the same logits, bitwise."""
    built = []
    real_build = KeptMerge._build
    monkeypatch.setattr(
        KeptMerge, "_build", staticmethod(lambda group: built.append(1) or real_build(group))
    )
    model = merged_model()
    tokens = torch.tensor(random_sequences([6], 97, seed=3))
    first = decode_logits(model, tokens)
    groups = len(built)
    assert groups == 2  # the kept layers' wq/wk/wv, the skipped layers' w1/w3
    for _ in range(3):
        assert torch.equal(decode_logits(model, tokens), first)
    assert len(built) == groups
    assert runtime_of(model)._kept.nbytes > 0


def test_the_factors_follow_the_weights_and_the_skip_set():
    """A change of a PIA's up projection or of a target's weight rebuilds F (the merge
    then matches the eager decode of the new weights); a new skip set drops them."""
    model = merged_model(search=True)
    set_skipped(model, [1, 2])
    tokens = torch.tensor(random_sequences([5], 97, seed=4))
    decode_logits(model, tokens)
    runtime = runtime_of(model)
    kept = list(runtime._kept._factors)
    with torch.no_grad():
        model.layers[1].skip_pia.up1.weight.add_(0.25)  # an optimizer step would do this
    merged = decode_logits(model, tokens)
    rebuilt = runtime._kept._factors
    assert len(rebuilt) == len(kept) and all(a is not b for a, b in zip(rebuilt, kept, strict=True))
    reparameterize(model, "eager")
    torch.testing.assert_close(decode_logits(model, tokens), merged, rtol=1e-4, atol=1e-4)
    reparameterize(model, "merge")
    set_skipped(model, [2])
    assert runtime._kept.nbytes == 0
    decode_logits(model, tokens)
    assert runtime._kept.nbytes > 0
    shapes = [tuple(f.shape) for f in runtime._kept._factors]
    assert shapes != [tuple(f.shape) for f in kept]  # 3 kept MHAs and 1 skipped, not 2 and 2


def test_float64_targets_merge_from_float64_factors():
    """The native merge takes float32/16/bf16; float64 goes to the reference, from float64
    factors: the merged decode equals the eager one to float64 rounding."""
    model = merged_model(dtype=torch.float64)
    tokens = torch.tensor(random_sequences([4], 97, seed=5))
    merged = decode_logits(model, tokens)
    factors = runtime_of(model)._kept._factors
    assert factors and all(f.dtype == torch.float64 for f in factors)
    reparameterize(model, "eager")
    torch.testing.assert_close(decode_logits(model, tokens), merged, rtol=1e-10, atol=1e-10)


def test_the_merge_gets_contiguous_float32_factors_per_target_and_the_state(monkeypatch):
    """Each site's merge arguments: its targets' kept ``Fᵀ`` ``(out, 2r + 2)`` and the
    frozen state ``(α₁, α₂, c)``, contiguous float32, and no ``(W_u, β)``; each prompt's
    run reads that prompt's states."""
    prepared = []
    real_init = kept_module.PreparedMerge.__init__

    def spy(self, sites, **options):
        prepared.append(sites)
        real_init(self, sites, **options)

    monkeypatch.setattr(kept_module.PreparedMerge, "__init__", spy)
    model = merged_model(dtype=torch.bfloat16)
    runtime = runtime_of(model)
    for seed in (6, 7):
        decode_logits(model, torch.tensor(random_sequences([4 + seed], 97, seed=seed)), steps=2)
        assert len(prepared) == 1  # the second prompt reuses the prepared call
        sites = runtime.reparameterizable_sites
        for site, argument in zip(sites, prepared[0], strict=True):
            assert argument.up_mix is None and argument.beta is None
            assert argument.mix.dtype == torch.float32 and argument.mix.is_contiguous()
            state = site.state
            expected = torch.cat([state.alpha[0], state.c[0]]).float()
            assert torch.equal(argument.mix, expected)
            for linear, f in zip(site.targets, argument.factors, strict=True):
                assert f.dtype == torch.float32 and f.is_contiguous()
                assert tuple(f.shape) == (linear.weight.shape[0], 2 * site.pia.rank + 2)


def count_preparations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    real_init = kept_module.PreparedMerge.__init__

    def spy(self, sites, **options):
        made.append(1)
        real_init(self, sites, **options)

    monkeypatch.setattr(kept_module.PreparedMerge, "__init__", spy)
    return made


@pytest.mark.parametrize(
    "change",
    ["in place", "replaced parameter", "new storage", "target bias added", "down projection"],
)
def test_the_prepared_merge_is_made_again_when_a_source_changes(monkeypatch, change):
    """The prepared call holds addresses: any change of a source's values, identity or
    storage makes it again, and the merged decode then equals the eager decode of the new
    weights; otherwise it is made once."""
    made = count_preparations(monkeypatch)
    model = merged_model()
    tokens = torch.tensor(random_sequences([5], 97, seed=8))
    for _ in range(3):
        decode_logits(model, tokens)
    assert len(made) == 1
    runtime_of(model).restore_weights()  # the pristine weights back in their Parameters
    layer = model.layers[0]  # a kept MHA: its PIA reads wq, wk, wv
    with torch.no_grad():
        if change == "in place":
            layer.attention.wq.weight.mul_(1.5)
        elif change == "replaced parameter":
            layer.attention.wk.weight = torch.nn.Parameter(layer.attention.wk.weight * 0.5)
        elif change == "new storage":
            layer.attention.wv.weight.data = layer.attention.wv.weight.data * 2
        elif change == "target bias added":
            out = layer.attention.wq.weight.shape[0]
            layer.attention.wq.bias = torch.nn.Parameter(torch.randn(out))
        else:
            model.layers[2].skip_pia.down1.weight.mul_(-1)
    merged = decode_logits(model, tokens)
    assert len(made) == 2
    reparameterize(model, "eager")
    torch.testing.assert_close(decode_logits(model, tokens), merged, rtol=1e-4, atol=1e-4)


def test_prompts_in_turn_each_merge_their_own_states():
    """Prompts decoded in turn through one prepared call give each prompt's merged logits
    alone (a fresh model), bitwise, and the weights come back bitwise after each."""
    prompts = [torch.tensor(random_sequences([n], 97, seed=n)) for n in (3, 6, 4)]
    alone = [decode_logits(merged_model(), tokens) for tokens in prompts]
    model = merged_model()
    snapshot = weights_snapshot(model)
    for _ in range(2):
        for tokens, expected in zip(prompts, alone, strict=True):
            assert torch.equal(decode_logits(model, tokens), expected)
            runtime_of(model).restore_weights()
            assert_bitwise(model, snapshot)


def test_a_refused_merge_keeps_the_prepared_call_usable():
    """A merge refused for overflow (a state whose merged weights hold Inf) writes
    nothing; the next prompt merges through the same prepared call."""
    model = merged_model()
    snapshot = weights_snapshot(model)
    tokens = torch.tensor(random_sequences([5], 97, seed=9))
    expected = decode_logits(model, tokens)
    runtime = runtime_of(model)
    with torch.no_grad():
        model(tokens, start_pos=0)
        site = runtime.reparameterizable_sites[0]
        huge = PIAState(torch.full_like(site.state.c, 3e38), site.state.alpha * 1e30)
        site.state = huge  # finite, but (W W_uᵀ) cᵀ overflows float32
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(torch.tensor([[1]]), start_pos=tokens.shape[1])
    assert_bitwise(model, snapshot)
    assert torch.equal(decode_logits(model, tokens), expected)


def test_a_prepared_merge_refuses_to_run_where_gradients_are_needed():
    """The native kernels record no gradients: a prepared merge run with grad enabled on
    tensors that require it raises, whatever held when it was made."""
    model = merged_model()
    decode_logits(model, torch.tensor(random_sequences([4], 97, seed=10)))
    runtime = runtime_of(model)
    runtime.restore_weights()
    prepared = runtime._kept._prepared
    assert prepared is not None
    with pytest.raises(RuntimeError, match="no_grad"):
        prepared.run()


def test_a_deep_copy_of_a_merged_model_prepares_its_own_merge():
    """``copy.deepcopy`` of a model that has merged copies no prepared call (it holds the
    original's addresses): the copy decodes as the original, merging into its own
    weights, and the original's weights stay bitwise."""
    import copy

    model = merged_model()
    tokens = torch.tensor(random_sequences([5], 97, seed=11))
    expected = decode_logits(model, tokens)
    runtime_of(model).restore_weights()
    snapshot = weights_snapshot(model)
    clone = copy.deepcopy(model)
    assert runtime_of(clone)._kept._prepared is None
    assert torch.equal(decode_logits(clone, tokens), expected)
    assert runtime_of(clone)._kept._prepared is not None
    assert_bitwise(model, snapshot)
    assert torch.equal(decode_logits(model, tokens), expected)
