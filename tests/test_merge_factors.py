"""The merge's factors, kept across prompts (eas_kernels.merge_factors, EAS_SPEC §4)."""

from __future__ import annotations

import pytest
import torch

import eas_kernels.merge_factors as factors_module
import eas_kernels.runtime as runtime_module
from eas_kernels import PIA, reparameterize, set_skipped
from eas_kernels.merge_factors import MergeFactors
from eas_kernels.ops import products_from_factors
from eas_kernels.patch import runtime_of
from eas_kernels.pia import PIAState
from tests.helpers import decode_logits, patched, random_sequences


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
    real_build = MergeFactors._build
    monkeypatch.setattr(
        MergeFactors, "_build", staticmethod(lambda group: built.append(1) or real_build(group))
    )
    model = merged_model()
    tokens = torch.tensor(random_sequences([6], 97, seed=3))
    first = decode_logits(model, tokens)
    groups = len(built)
    assert groups == 2  # the kept layers' wq/wk/wv, the skipped layers' w1/w3
    for _ in range(3):
        assert torch.equal(decode_logits(model, tokens), first)
    assert len(built) == groups
    assert runtime_of(model)._factors.nbytes > 0


def test_the_factors_follow_the_weights_and_the_skip_set():
    """A change of a PIA's up projection or of a target's weight rebuilds F (the merge
    then matches the eager decode of the new weights); a new skip set drops them."""
    model = merged_model(search=True)
    set_skipped(model, [1, 2])
    tokens = torch.tensor(random_sequences([5], 97, seed=4))
    decode_logits(model, tokens)
    runtime = runtime_of(model)
    kept = dict(runtime._factors._factors)
    with torch.no_grad():
        model.layers[1].skip_pia.up1.weight.add_(0.25)  # an optimizer step would do this
    merged = decode_logits(model, tokens)
    assert runtime._factors._factors.keys() == kept.keys()
    assert any(runtime._factors._factors[k][1] is not kept[k][1] for k in kept)
    reparameterize(model, "eager")
    torch.testing.assert_close(decode_logits(model, tokens), merged, rtol=1e-4, atol=1e-4)
    reparameterize(model, "merge")
    set_skipped(model, [2])
    assert runtime._factors.nbytes == 0
    decode_logits(model, tokens)
    assert set(runtime._factors._factors) != set(kept)


def test_float64_targets_merge_without_factors():
    """The native merge takes float32/16/bf16; float64 goes to the reference, which
    computes its own products from ``(W_u, β)``: no factors are built."""
    model = merged_model(dtype=torch.float64)
    decode_logits(model, torch.tensor(random_sequences([4], 97, seed=5)))
    assert runtime_of(model)._factors.nbytes == 0


def test_the_merge_gets_contiguous_float32_factors_per_target_and_the_state(monkeypatch):
    """Each site's merge arguments: its targets' kept ``Fᵀ`` ``(out, 2r + 2)`` and the
    frozen state ``(α₁, α₂, c)``, contiguous float32, and no ``(W_u, β)``."""
    captured = []
    real = factors_module.MergeFactors.factors

    def spy(self, group):
        result = real(self, group)
        captured.append((group, result))
        return result

    monkeypatch.setattr(factors_module.MergeFactors, "factors", spy)
    merges = []
    real_merge = runtime_module.merge_sites
    monkeypatch.setattr(
        runtime_module, "merge_sites", lambda sites: merges.append(sites) or real_merge(sites)
    )
    model = merged_model(dtype=torch.bfloat16)
    decode_logits(model, torch.tensor(random_sequences([4], 97, seed=6)), steps=2)
    assert captured and merges
    for group, result in captured:
        assert len(result) == len(group)
        for site, per_target in zip(group, result, strict=True):
            for linear, f in zip(site.targets, per_target, strict=True):
                assert f.dtype == torch.float32 and f.is_contiguous()
                assert tuple(f.shape) == (linear.weight.shape[0], 2 * site.pia.rank + 2)
    sites = runtime_of(model).reparameterizable_sites
    for site, argument in zip(sites, merges[-1], strict=True):
        assert argument.up_mix is None and argument.beta is None
        assert argument.mix.dtype == torch.float32 and argument.mix.is_contiguous()
        state = site.state
        expected = torch.cat([state.alpha[0], state.c[0]]).float()
        assert torch.equal(argument.mix, expected)
