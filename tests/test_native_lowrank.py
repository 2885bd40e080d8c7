"""The native low-rank kernels (csrc/cpu/lowrank.h) against the PyTorch references (§4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import eas_kernels.ops.lowrank as lowrank_module
from eas_kernels.ops import (
    LowrankAdd,
    add_lowrank,
    add_lowrank_reference,
    lowrank_factors,
    lowrank_factors_reference,
)
from tests.native_helpers import (
    DTYPES,
    KERNELS,
    PoisonedTorch,
    assert_float32_accumulation,
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
    (7, 1, 200, 33, 3, "distinct"),  # out spans several column chunks and a partial one
]


def problem(batch, tokens, out, dim, rank, states, dtype, seed, device="cpu"):
    """A layer, a PIA's down projection and up basis, B states and the layer's input."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    alpha = torch.softmax(randn(batch, 2, scale=2.0), dim=-1)
    mix = torch.cat([alpha, randn(batch, rank, scale=0.3)], dim=1)  # [α₁, α₂, c]
    if states == "identical":
        mix = mix[:1].expand_as(mix).contiguous()

    def stored(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype)

    return dict(
        weight=stored(randn(out, dim, scale=0.3)),
        bias=stored(randn(out)),
        down=stored(randn(rank, dim, scale=0.3)),
        basis=stored(randn(2 * rank + 2, dim, scale=0.3)),  # [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]
        mix=mix.to(device),
        u=stored(randn(batch, tokens, dim)),
    )


def unmerged_layer(p) -> torch.Tensor:
    """The layer on ``z = u + PIA(u)`` in float64, straight from EAS_SPEC §4."""
    rank = p["down"].shape[0]
    u, weight, down, basis = (p[k].double() for k in ("u", "weight", "down", "basis"))
    mix = p["mix"].double()
    alpha1, alpha2, c = mix[:, 0, None], mix[:, 1, None], mix[:, 2:]
    up_mix = alpha1[..., None] * basis[:rank] + alpha2[..., None] * basis[rank : 2 * rank]
    beta = torch.bmm(c.unsqueeze(1), up_mix).squeeze(1)
    beta = beta + alpha1 * basis[2 * rank] + alpha2 * basis[2 * rank + 1]
    z = u + torch.baddbmm(beta.unsqueeze(1), u @ down.t(), up_mix)
    return z @ weight.t() + p["bias"].double()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_factors_match_the_reference_with_poisoned_outputs(kernels, monkeypatch, case, dtype):
    monkeypatch.setattr(lowrank_module, "torch", PoisonedTorch())
    with on_kernels(kernels) as device:
        p = problem(*case, dtype, seed=case[2], device=device)
        factor = lowrank_factors(p["weight"], p["basis"], backend="native")
    assert factor.dtype == dtype and factor.is_contiguous()  # fp32 accumulation, kept in dtype
    torch_own = lowrank_factors_reference(p["weight"], p["basis"])
    exact = lowrank_factors_reference(p["weight"].double(), p["basis"].double())
    magnitude = lowrank_factors_reference(p["weight"].double().abs(), p["basis"].double().abs())
    assert_float32_accumulation(factor, torch_own, exact, magnitude, case[3], "F")  # d terms
    if dtype == torch.float32:
        torch.testing.assert_close(factor.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_the_path_matches_the_unmerged_layer(kernels, case, dtype):
    """``x Wᵀ + b + κ F`` vs the layer on ``x + PIA(x)`` with each example's state."""
    with on_kernels(kernels) as device:
        p = problem(*case, dtype, seed=case[3], device=device)
        output = F.linear(p["u"], p["weight"], p["bias"])
        projected = F.linear(p["u"], p["down"])
        factor = lowrank_factors(p["weight"], p["basis"], backend="native")
        ours = add_lowrank(output.clone(), projected, p["mix"], factor, backend="native")
        last = slice(case[0] - 1, case[0])  # the last example, alone
        alone = add_lowrank(output[last].clone(), projected[last], p["mix"][last], factor)
    torch.testing.assert_close(ours[last], alone, rtol=0, atol=0)
    mix = p["mix"].to(dtype)
    torch_own = add_lowrank_reference(
        output, projected, mix, lowrank_factors_reference(p["weight"], p["basis"])
    )
    assert_within_twice_torch_error(ours, torch_own, unmerged_layer(p), "y")


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_add_writes_exactly_its_outputs_through_strides(kernels, dtype, tokens):
    """Output rows strided inside a NaN-filled buffer: only (B, n, out) is written."""
    batch, out, rank = 4, 45, 7
    generator = torch.Generator().manual_seed(3)
    with on_kernels(kernels) as device:

        def randn(*shape: int, to: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device=device, dtype=to)

        buffer = torch.full((batch, tokens + 2, out + 5), float("nan"), dtype=dtype, device=device)
        output = buffer[:, 1 : tokens + 1, 2 : out + 2]
        output.copy_(randn(batch, tokens, out))
        before = output.clone()
        projected = randn(batch, rank, tokens, to=dtype).transpose(1, 2)
        mix, factor = randn(batch, rank + 2), randn(2 * rank + 2, out, to=dtype)
        result = add_lowrank(output, projected, mix, factor, backend="native")
    assert result is output and output._version > 0
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, 1 : tokens + 1, 2 : out + 2] = False
    assert buffer[outside].isnan().all()
    inputs = (before, projected, mix, factor)
    exact = add_lowrank_reference(*(t.double() for t in inputs))
    magnitude = add_lowrank_reference(*(t.double().abs() for t in inputs))
    same_dtype = add_lowrank_reference(before, projected, mix.to(dtype), factor.to(dtype))
    # y + Σ_k κ_k F_k with κ = [α₁ p, α₂ p, α₁, α₂], p = proj + c (csrc/cpu/lowrank.h): one
    # rounding in p, one in κ, 2r + 2 in the sum, one adding y
    assert_float32_accumulation(result, same_dtype, exact, magnitude, 2 * rank + 5, "y")
    if dtype == torch.float32:
        torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=1e-5)


def test_fallbacks_and_backends_agree():
    p = problem(6, 2, 40, 24, 5, "distinct", torch.bfloat16, seed=4)
    output = F.linear(p["u"], p["weight"], p["bias"])
    projected = F.linear(p["u"], p["down"])
    results = {}
    for backend in ("torch", "native", "auto"):
        factor = lowrank_factors(p["weight"], p["basis"], backend=backend)
        assert factor.dtype == torch.bfloat16
        results[backend] = add_lowrank(output.clone(), projected, p["mix"], factor, backend=backend)
    assert torch.equal(results["native"], results["auto"])
    torch.testing.assert_close(results["native"], results["torch"], rtol=0.02, atol=0.02)


def test_float64_and_autograd_calls_run_the_reference_under_auto():
    p = problem(2, 1, 12, 8, 3, "distinct", torch.float64, seed=5)
    factor = lowrank_factors(p["weight"], p["basis"])
    assert factor.dtype == torch.float64
    torch.testing.assert_close(factor, lowrank_factors_reference(p["weight"], p["basis"]))
    y = add_lowrank(
        F.linear(p["u"], p["weight"], p["bias"]),
        F.linear(p["u"], p["down"]),
        p["mix"].double(),
        factor,
    )
    torch.testing.assert_close(y, unmerged_layer(p), rtol=1e-10, atol=1e-10)
    p32 = problem(2, 1, 12, 8, 3, "distinct", torch.float32, seed=6)
    down = p32["down"].requires_grad_()
    factor = lowrank_factors(p32["weight"], p32["basis"])
    output = F.linear(p32["u"], p32["weight"])
    projected = F.linear(p32["u"], down)
    result = add_lowrank(output, projected, p32["mix"], factor)  # auto: the reference
    result.sum().backward()
    assert down.grad is not None
    with pytest.raises(RuntimeError, match="do not record gradients"):
        add_lowrank(output, projected, p32["mix"], factor, backend="native")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_bound_add_equals_add_lowrank_on_every_path(dtype):
    """Contiguous calls take the bound fast path, strided ones and calls that record
    gradients take add_lowrank; all give add_lowrank's result."""
    p = problem(5, 3, 70, 40, 6, "distinct", dtype, seed=9)
    output = F.linear(p["u"], p["weight"], p["bias"])
    projected = F.linear(p["u"], p["down"])
    factor = lowrank_factors(p["weight"], p["basis"])
    bound = LowrankAdd(p["mix"], factor)
    expected = add_lowrank(output.clone(), projected, p["mix"], factor)
    fast = output.clone()
    assert bound(fast, projected) is fast and torch.equal(fast, expected)
    strided = torch.full((5, 3, 75), float("nan"), dtype=dtype)[:, :, :70]
    strided.copy_(output)
    assert torch.equal(
        bound(strided, projected.transpose(1, 2).contiguous().transpose(1, 2)), expected
    )
    with_torch = LowrankAdd(p["mix"], factor, backend="torch")(output.clone(), projected)
    torch.testing.assert_close(with_torch, expected, rtol=0.02, atol=0.02)
    if dtype == torch.float32:
        down = p["down"].clone().requires_grad_()
        traced = bound(output.clone(), F.linear(p["u"], down))  # the reference, with autograd
        traced.sum().backward()
        assert down.grad is not None
        torch.testing.assert_close(traced.detach(), expected, rtol=1e-5, atol=1e-5)


def test_the_bound_add_checks_its_factors_once():
    p = problem(2, 1, 12, 8, 3, "distinct", torch.float32, seed=10)
    factor = lowrank_factors(p["weight"], p["basis"])
    mix = p["mix"]
    cases = [
        (lambda: LowrankAdd(mix, factor[:3]), ValueError, "factor must have shape"),
        (lambda: LowrankAdd(mix[:, :-1], factor), ValueError, "mix must have shape"),
        (lambda: LowrankAdd(mix.double(), factor), TypeError, "mix must have dtype"),
        (lambda: LowrankAdd(mix, factor.t().contiguous().t()), ValueError, "contiguous"),
        (lambda: LowrankAdd(mix, factor, backend="fast"), ValueError, "backend"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    bound = LowrankAdd(mix, factor)
    y = F.linear(p["u"], p["weight"])
    with pytest.raises(ValueError, match="mix must have shape"):
        bound(y[:1], F.linear(p["u"], p["down"])[:1])  # another batch size: add_lowrank's check


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_factors_that_overflow_float16_are_refused(backend):
    p = problem(2, 1, 12, 8, 3, "distinct", torch.float16, seed=8)
    basis = p["basis"].clone()
    basis[0] = 60.0  # F[0, :] = 60 Σ_j W[:, j]: beyond float16's 65504 with W = 200
    with pytest.raises(ValueError, match="NaN or Inf in torch.float16"):
        lowrank_factors(torch.full_like(p["weight"], 200.0), basis, backend=backend)


def test_bad_input_is_refused_with_a_clear_error():
    p = problem(2, 1, 12, 8, 3, "distinct", torch.float32, seed=7)
    w, basis, mix = p["weight"], p["basis"], p["mix"]
    factor = lowrank_factors(w, basis)
    y = F.linear(p["u"], w)
    proj = F.linear(p["u"], p["down"])
    native = dict(backend="native")
    cases = [
        (lambda: lowrank_factors(w.t(), basis, **native), ValueError, "up_basis must have shape"),
        (lambda: lowrank_factors(w, basis[:-1]), ValueError, "up_basis must have shape"),
        (lambda: lowrank_factors(w, basis[:2]), ValueError, r"r >= 1"),
        (lambda: lowrank_factors(w[:, ::2], basis[:, ::2], **native), ValueError, "unit stride"),
        (lambda: lowrank_factors(w, basis[0]), ValueError, "2 dimensions"),
        (lambda: lowrank_factors(w.double(), basis, **native), TypeError, "native kernels take"),
        (lambda: lowrank_factors(w, basis.to("meta")), ValueError, "device"),
        (lambda: add_lowrank(y, proj, mix, factor.half()), TypeError, "factor must have dtype"),
        (lambda: add_lowrank(y, proj, mix.half(), factor), TypeError, "mix must have dtype"),
        (lambda: add_lowrank(y, proj, mix[:1], factor), ValueError, "mix must have shape"),
        (lambda: add_lowrank(y, proj, mix[:, :-1], factor), ValueError, "mix must have shape"),
        (lambda: add_lowrank(y, proj, mix, factor[:-2]), ValueError, "factor must have shape"),
        (lambda: add_lowrank(y, proj[:, :, :2], mix, factor), ValueError, "mix must have"),
        (lambda: add_lowrank(y, proj.half(), mix, factor), TypeError, "projected"),
        (
            lambda: add_lowrank(y[:, :, :1].expand(2, 1, 12), proj, mix, factor, **native),
            ValueError,
            "unit stride",
        ),
        (
            lambda: add_lowrank(y, proj, mix, factor.t().contiguous().t(), **native),
            ValueError,
            "contiguous",
        ),
        (
            lambda: add_lowrank(y[:1].expand(2, 1, 12), proj, mix, factor, **native),
            ValueError,
            "overlapping",
        ),
        (lambda: add_lowrank(y, proj, mix, factor, backend="fast"), ValueError, "backend"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_an_output_that_shares_memory_with_another_argument_is_refused():
    """The native add writes ``output`` in place while it reads ``projected``, ``mix`` and
    ``factor``: an overlap is refused by add_lowrank and by the bound add's fast path."""
    p = problem(2, 3, 8, 10, 2, "distinct", torch.float32, seed=4)
    factor = lowrank_factors(p["weight"], p["basis"])
    storage = torch.randn(2 * 3 * 8)
    output = storage.view(2, 3, 8)
    projected = storage[: 2 * 3 * 2].view(2, 3, 2)  # the first elements of output
    before = storage.clone()
    with pytest.raises(ValueError, match="output and projected share memory"):
        add_lowrank(output, projected, p["mix"], factor, backend="native")
    with pytest.raises(ValueError, match="output and projected share memory"):
        LowrankAdd(p["mix"], factor)(output, projected)
    with pytest.raises(ValueError, match="output and factor share memory"):
        add_lowrank(
            factor[:6].view(2, 3, 8),
            F.linear(p["u"], p["down"]),
            p["mix"],
            factor,
            backend="native",
        )
    assert torch.equal(storage, before)
