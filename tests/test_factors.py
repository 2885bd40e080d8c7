"""Factors kept across prompts (eas_kernels.factors): built once while the weights stay."""

from __future__ import annotations

import torch

import eas_kernels.factors as factors_module
from eas_kernels import reparameterize
from eas_kernels.factors import tensor_versions, weights_key
from eas_kernels.patch import runtime_of
from tests.helpers import decode_logits, patched, random_sequences


def test_the_lowrank_path_builds_its_factors_once_while_the_weights_stay(monkeypatch):
    """Prompt after prompt, the low-rank set-up reuses F; a changed up projection or target
    weight rebuilds it, and decoding then follows the new weights (= eager)."""
    calls = []
    real = factors_module.lowrank_factors
    monkeypatch.setattr(
        factors_module, "lowrank_factors", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = patched([1, 2])
    reparameterize(model, "lowrank")
    tokens = torch.tensor(random_sequences([5, 5], 97, seed=7))
    first = decode_logits(model, tokens)
    built = len(calls)
    assert built == sum(len(site.targets) for site in runtime_of(model).reparameterizable_sites)
    for _ in range(2):
        assert torch.equal(decode_logits(model, tokens), first)
    assert len(calls) == built
    with torch.no_grad():
        model.layers[2].skip_pia.up2.bias.add_(0.5)
        model.layers[0].attention.wk.weight.mul_(1.5)
    changed = decode_logits(model, tokens)
    assert len(calls) == built + 5  # w1, w3 of layer 2; wq, wk, wv of layer 0
    reparameterize(model, "eager")
    torch.testing.assert_close(decode_logits(model, tokens), changed, rtol=1e-4, atol=1e-4)


def test_an_inference_tensor_has_no_key_and_is_built_again():
    with torch.inference_mode():
        frozen = torch.ones(3)
    normal = torch.ones(3)
    assert tensor_versions([normal, frozen]) is None and weights_key([frozen]) is None
    key = weights_key([normal])
    assert key == weights_key([normal])
    normal.add_(1)  # an in-place change moves the version counter
    assert weights_key([normal]) != key
    moved = normal.clone()
    assert weights_key([moved]) != weights_key([normal])


def test_weights_made_in_inference_mode_decode_and_are_never_kept():
    """Parameters created under inference mode have no version counter: nothing is kept
    for them (the factors are built at every prompt), and decoding still equals eager."""
    with torch.inference_mode():
        model = patched([1])
    tokens = torch.tensor(random_sequences([4], 97, seed=8))
    with torch.inference_mode():
        reparameterize(model, "eager")
        eager = decode_logits(model, tokens)
        reparameterize(model, "lowrank")
        for _ in range(2):
            torch.testing.assert_close(decode_logits(model, tokens), eager, rtol=1e-4, atol=1e-4)
    assert all(site.factors._key is None for site in runtime_of(model).sites)
