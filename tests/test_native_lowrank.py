"""The native low-rank kernels (csrc/cpu/lowrank.h) against the PyTorch references (§4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import eas_kernels.ops.lowrank as lowrank_module
from eas_kernels.ops import (
    add_lowrank,
    add_lowrank_reference,
    lowrank_factors,
    lowrank_factors_reference,
)
from tests.native_helpers import (
    DTYPES,
    KERNELS,
    PoisonedTorch,
    assert_within_twice_torch_error,
    on_kernels,
    requires_cpu_kernels,
)

pytestmark = requires_cpu_kernels

CASES = [  # (B, n tokens, out, d, r, states): odd shapes, ranks 1..64, batch 1..33
    (1, 1, 9, 7, 1, "distinct"),
    (3, 2, 31, 24, 6, "distinct"),
    (5, 1, 131, 77, 17, "identical"),
    (8, 3, 64, 48, 32, "distinct"),
    (33, 1, 16, 16, 64, "distinct"),
    (33, 1, 70, 40, 8, "identical"),
]


def problem(batch, tokens, out, dim, rank, states, dtype, seed, device="cpu"):
    """Weights, per-example PIA projections and the layer's input, all in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    up_mix, beta = randn(batch, rank, dim, scale=0.3), randn(batch, dim, scale=0.3)
    if states == "identical":
        up_mix, beta = up_mix[:1].expand_as(up_mix), beta[:1].expand_as(beta)
    return dict(
        weight=randn(out, dim, scale=0.3),
        bias=randn(out),
        down=randn(rank, dim, scale=0.3),
        up_mix=up_mix,
        beta=beta,
        u=randn(batch, tokens, dim),
    )


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_factors_match_the_reference_with_poisoned_outputs(kernels, monkeypatch, case, dtype):
    monkeypatch.setattr(lowrank_module, "torch", PoisonedTorch())
    with on_kernels(kernels) as device:
        p = problem(*case, dtype, seed=case[2], device=device)
        factor, offset = lowrank_factors(p["weight"], p["up_mix"], p["beta"], backend="native")
    assert factor.dtype == offset.dtype == torch.float32
    assert factor.is_contiguous() and offset.is_contiguous()
    same_dtype = lowrank_factors_reference(p["weight"], p["up_mix"], p["beta"])
    exact = lowrank_factors_reference(
        p["weight"].double(), p["up_mix"].double(), p["beta"].double()
    )
    for ours, torch_own, exact_one, name in zip(
        (factor, offset), same_dtype, exact, ("M", "g"), strict=True
    ):
        assert_within_twice_torch_error(ours, torch_own, exact_one, name)
        torch.testing.assert_close(ours.double(), exact_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_the_path_matches_the_unmerged_layer(kernels, case, dtype):
    """``x Wᵀ + b + (x W_d1ᵀ) M_e + g_e`` vs the layer on ``x + PIA(x)``, in float64."""
    with on_kernels(kernels) as device:
        p = problem(*case, dtype, seed=case[3], device=device)
        output = F.linear(p["u"], p["weight"], p["bias"])
        projected = F.linear(p["u"], p["down"])
        factor, offset = lowrank_factors(p["weight"], p["up_mix"], p["beta"], backend="native")
        ours = add_lowrank(output.clone(), projected, factor, offset, backend="native")
    torch_own = add_lowrank_reference(
        output, projected, *lowrank_factors_reference(p["weight"], p["up_mix"], p["beta"])
    )
    u, w, down = p["u"].double(), p["weight"].double(), p["down"].double()
    z = u + torch.baddbmm(p["beta"].double().unsqueeze(1), u @ down.t(), p["up_mix"].double())
    exact = z @ w.t() + p["bias"].double()
    assert_within_twice_torch_error(ours, torch_own, exact, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_add_writes_exactly_its_outputs_through_strides(kernels, dtype):
    """Output rows strided inside a NaN-filled buffer: only (B, n, out) is written."""
    batch, tokens, out, rank = 4, 3, 45, 7
    generator = torch.Generator().manual_seed(3)
    with on_kernels(kernels) as device:

        def randn(*shape: int, to: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device=device, dtype=to)

        buffer = torch.full((batch, tokens + 2, out + 5), float("nan"), dtype=dtype, device=device)
        output = buffer[:, 1 : tokens + 1, 2 : out + 2]
        output.copy_(randn(batch, tokens, out))
        before = output.clone()
        projected = randn(batch, rank, tokens, to=dtype).transpose(1, 2)
        factor, offset = randn(batch, rank, out), randn(batch, out)
        result = add_lowrank(output, projected, factor, offset, backend="native")
    assert result is output and output._version > 0
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, 1 : tokens + 1, 2 : out + 2] = False
    assert buffer[outside].isnan().all()
    exact = torch.baddbmm(
        before.double() + offset.double().unsqueeze(1), projected.double(), factor.double()
    )
    same_dtype = add_lowrank_reference(before, projected, factor.to(dtype), offset.to(dtype))
    assert_within_twice_torch_error(result, same_dtype, exact, "y")
    if dtype == torch.float32:
        torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=1e-5)


def test_fallbacks_and_backends_agree():
    p = problem(6, 2, 40, 24, 5, "distinct", torch.bfloat16, seed=4)
    output = F.linear(p["u"], p["weight"], p["bias"])
    projected = F.linear(p["u"], p["down"])
    results = {}
    for backend in ("torch", "native", "auto"):
        factor, offset = lowrank_factors(p["weight"], p["up_mix"], p["beta"], backend=backend)
        assert factor.dtype == torch.float32
        results[backend] = add_lowrank(output.clone(), projected, factor, offset, backend=backend)
    assert torch.equal(results["native"], results["auto"])
    torch.testing.assert_close(results["native"], results["torch"], rtol=0.02, atol=0.02)


def test_float64_and_autograd_calls_run_the_reference_under_auto():
    p = problem(2, 1, 12, 8, 3, "distinct", torch.float64, seed=5)
    factor, offset = lowrank_factors(p["weight"], p["up_mix"], p["beta"])
    assert factor.dtype == torch.float64
    torch.testing.assert_close(
        factor, lowrank_factors_reference(p["weight"], p["up_mix"], p["beta"])[0]
    )
    p32 = problem(2, 1, 12, 8, 3, "distinct", torch.float32, seed=6)
    down = p32["down"].requires_grad_()
    factor, offset = lowrank_factors(p32["weight"], p32["up_mix"], p32["beta"])
    output = F.linear(p32["u"], p32["weight"])
    projected = F.linear(p32["u"], down)
    result = add_lowrank(output, projected, factor, offset)  # auto: the reference
    result.sum().backward()
    assert down.grad is not None
    with pytest.raises(RuntimeError, match="do not record gradients"):
        add_lowrank(output, projected, factor, offset, backend="native")


def test_bad_input_is_refused_with_a_clear_error():
    p = problem(2, 1, 12, 8, 3, "distinct", torch.float32, seed=7)
    w, up, beta = p["weight"], p["up_mix"], p["beta"]
    factor, offset = lowrank_factors(w, up, beta)
    y = F.linear(p["u"], w)
    proj = F.linear(p["u"], p["down"])
    native = dict(backend="native")
    cases = [
        (lambda: lowrank_factors(w.t(), up, beta, **native), ValueError, "up_mix must have shape"),
        (
            lambda: lowrank_factors(w[:, ::2], up[..., ::2], beta[:, ::2], **native),
            ValueError,
            "unit stride",
        ),
        (lambda: lowrank_factors(w, up[0], beta), ValueError, "3 dimensions"),
        (lambda: lowrank_factors(w, up, beta[:1]), ValueError, "beta must have shape"),
        (lambda: lowrank_factors(w.double(), up, beta, **native), TypeError, "native kernels take"),
        (lambda: lowrank_factors(w, up.to("meta"), beta), ValueError, "device"),
        (lambda: add_lowrank(y, proj, factor.half(), offset), TypeError, "factor must have dtype"),
        (lambda: add_lowrank(y, proj, factor, offset[:1]), ValueError, "offset must have shape"),
        (lambda: add_lowrank(y, proj[:, :, :2], factor, offset), ValueError, "factor must have"),
        (lambda: add_lowrank(y, proj.half(), factor, offset), TypeError, "projected"),
        (
            lambda: add_lowrank(y[:, :, :1].expand(2, 1, 12), proj, factor, offset, **native),
            ValueError,
            "unit stride",
        ),
        (
            lambda: add_lowrank(
                y, proj, factor.transpose(1, 2).contiguous().transpose(1, 2), offset, **native
            ),
            ValueError,
            "contiguous",
        ),
        (
            lambda: add_lowrank(y[:1].expand(2, 1, 12), proj, factor, offset, **native),
            ValueError,
            "overlapping",
        ),
        (lambda: add_lowrank(y, proj, factor, offset, backend="fast"), ValueError, "backend"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
