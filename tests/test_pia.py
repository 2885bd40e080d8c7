"""PIA against the literal formulas of EAS_SPEC §1 (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from eas_kernels import PIA, PIAState
from tests.reference import pia_reference, pia_state_reference

SHAPES = [(1, 1, 8, 1), (3, 7, 37, 5), (2, 13, 64, 64), (4, 5, 16, 32)]


def random_pia(dim: int, rank: int, token_mixing: bool, dtype=torch.float64, seed: int = 0) -> PIA:
    torch.manual_seed(seed)
    pia = PIA(dim, rank, token_mixing=token_mixing, temperature=2.5)
    with torch.no_grad():
        for parameter in pia.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return pia.to(dtype)


def random_mask(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Each example keeps a different-length prefix, at least one token."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (batch,), generator=generator)
    lengths[0] = n
    return torch.arange(n)[None, :] < lengths[:, None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("token_mixing", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_forward_matches_reference(shape, token_mixing, masked):
    batch, n, dim, rank = shape
    pia = random_pia(dim, rank, token_mixing)
    u = torch.randn(batch, n, dim, dtype=torch.float64)
    mask = random_mask(batch, n) if masked else None
    torch.testing.assert_close(pia(u, mask), pia_reference(pia, u, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("token_mixing", [True, False])
def test_state_matches_reference(token_mixing):
    pia = random_pia(37, 5, token_mixing)
    u = torch.randn(3, 9, 37, dtype=torch.float64)
    mask = random_mask(3, 9, seed=3)
    state = pia.compute_state(u, mask)
    assert state.c.shape == (3, 5) and state.alpha.shape == (3, 2)
    for b in range(3):
        c, alpha = pia_state_reference(pia, u[b], mask[b])
        torch.testing.assert_close(state.c[b], c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.alpha[b], alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.alpha.sum(-1), torch.ones(3, dtype=torch.float64))


def test_mask_selects_the_averaged_tokens_only():
    pia = random_pia(16, 4, True)
    u = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    changed = u.clone()
    changed[~mask] = 1e3
    torch.testing.assert_close(pia.compute_state(u, mask).c, pia.compute_state(changed, mask).c)
    torch.testing.assert_close(pia(u, None), pia(u, torch.ones(2, 6, dtype=torch.bool)))


def test_frozen_state_replaces_the_computed_one():
    pia = random_pia(16, 4, True)
    prompt = torch.randn(2, 5, 16, dtype=torch.float64)
    later = torch.randn(2, 3, 16, dtype=torch.float64)
    state = pia.compute_state(prompt)
    expected = pia_reference(pia, later, state=(state.c, state.alpha))
    torch.testing.assert_close(pia(later, state=state), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(pia(later), expected)


def test_fresh_pia_is_an_exact_zero_and_has_nonzero_down_paths():
    pia = PIA(24, 8)
    u = torch.randn(2, 5, 24)
    assert torch.equal(pia(u), torch.zeros_like(u))
    assert pia.down1.weight.abs().sum() > 0 and pia.down2.weight.abs().sum() > 0
    assert PIA(24, 8, token_mixing=False).down2 is None


@pytest.mark.parametrize("token_mixing", [True, False])
def test_backward_matches_reference(token_mixing):
    pia = random_pia(21, 6, token_mixing)
    reference = random_pia(21, 6, token_mixing)
    reference.load_state_dict(pia.state_dict())
    u = torch.randn(3, 7, 21, dtype=torch.float64, requires_grad=True)
    u_ref = u.detach().clone().requires_grad_(True)
    mask = random_mask(3, 7, seed=5)
    weight = torch.randn(3, 7, 21, dtype=torch.float64)
    (pia(u, mask) * weight).sum().backward()
    (pia_reference(reference, u_ref, mask) * weight).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-10, atol=1e-12)
    pairs = zip(pia.named_parameters(), reference.named_parameters(), strict=True)
    for (name, got), (_, expected) in pairs:
        assert got.grad is not None and got.grad.abs().sum() > 0, name
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck():
    """Float64 gradcheck with respect to the input and every parameter."""
    pia = random_pia(6, 3, True)
    u = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 4, seed=2)
    names = [name for name, _ in pia.named_parameters()]

    def call(x, *weights):
        return torch.func.functional_call(pia, dict(zip(names, weights, strict=True)), (x, mask))

    weights = tuple(p.detach().clone().requires_grad_(True) for p in pia.parameters())
    assert torch.autograd.gradcheck(call, (u, *weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_pytorch_error(dtype):
    """NOTES.md rule: error vs float64 at most 2x the literal formula's own in ``dtype``."""
    pia64 = random_pia(64, 16, True)
    u64 = torch.randn(3, 11, 64, dtype=torch.float64)
    mask = random_mask(3, 11, seed=7)
    exact = pia_reference(pia64, u64, mask)
    low = random_pia(64, 16, True, dtype=dtype)
    low.load_state_dict({k: v.to(dtype) for k, v in pia64.state_dict().items()})
    u = u64.to(dtype)
    ours = (low(u, mask).double() - exact).abs().max()
    torch_own = (pia_reference(low, u, mask).double() - exact).abs().max()
    assert ours <= 2 * torch_own, (ours, torch_own)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(dim=0, rank=4), ValueError),
        (dict(dim=8, rank=-1), ValueError),
        (dict(dim=8.0, rank=4), TypeError),
        (dict(dim=8, rank=True), TypeError),
        (dict(dim=8, rank=4, temperature=0.0), ValueError),
        (dict(dim=8, rank=4, temperature=float("inf")), ValueError),
        (dict(dim=8, rank=4, token_mixing=1), TypeError),
    ],
)
def test_constructor_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        PIA(kwargs.pop("dim"), kwargs.pop("rank"), **kwargs)


def test_forward_refuses_bad_inputs():
    pia = PIA(8, 2)
    good = torch.randn(2, 3, 8)
    cases = [
        (torch.randn(3, 8), ValueError, "3 dimensions"),
        (torch.randn(2, 3, 9), ValueError, r"\(B, n, 8\)"),
        (torch.randn(2, 3, 8, dtype=torch.float64), TypeError, "dtype"),
        (torch.randint(0, 3, (2, 3, 8)), TypeError, "floating"),
        (torch.randn(2, 0, 8), ValueError, "no tokens"),
        (torch.randn(2, 3, 8, device="meta"), ValueError, "device"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ]
    for value, error, message in cases:
        with pytest.raises(error, match=message):
            pia(value)
    with pytest.raises(ValueError, match="shape"):
        pia(good, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        pia(good, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"example\(s\) \[1\]"):
        pia(good, torch.tensor([[True, False, False], [False, False, False]]))
    state = pia.compute_state(good)
    with pytest.raises(ValueError, match="state.c"):
        pia(torch.randn(3, 3, 8), state=state)
    with pytest.raises(TypeError, match="PIAState"):
        pia(good, state=(state.c, state.alpha))
    with pytest.raises(ValueError, match="state.alpha"):
        pia(good, state=PIAState(state.c, torch.ones(2, 3)))
