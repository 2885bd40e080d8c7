"""The per-example low-rank path: a frozen PIA applied without changing weights (EAS_SPEC §4).

For example ``e`` with mixed up projection ``W_u^{(e)}`` (``r × d``) and ``β^{(e)}``, the
linear layer reading ``z = u + PIA(u)`` computes

    z Wᵀ + b = (u Wᵀ + b) + (u W_d1ᵀ) M_e + g_e,   M_e = W_u^{(e)} Wᵀ (r × out),  g_e = β^{(e)} Wᵀ

``M_e`` and ``g_e`` are built once per example after the prefill
(:func:`lowrank_factors`: ``B·(r+1)·out·d`` multiply-adds, one kernel for the batch); each
decoded token then costs ``d·r + r·out`` extra multiply-adds (:func:`add_lowrank`, which
adds ``(u W_d1ᵀ) M_e + g_e`` into ``u Wᵀ + b`` in place: one read and one write of the
layer's output, no extra pass over it), and any batch of examples with distinct states
works. Both accumulate in float32 and round once. The native kernels are in
``csrc/cpu/lowrank.h`` and ``csrc/cuda/lowrank.cu``; the ``*_reference`` functions are the
PyTorch references.
"""

from __future__ import annotations

import torch

from .. import _native
from .._checks import check_tensor


def lowrank_factors_reference(
    weight: torch.Tensor, up_mix: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, g)``: ``M = W_u Wᵀ`` ``(B, r, out)`` and ``g = β Wᵀ`` ``(B, out)``.

    ``weight`` ``(out, d)``; ``up_mix`` ``(B, r, d)``; ``beta`` ``(B, d)``. Same dtype as
    ``weight``.
    """
    return torch.matmul(up_mix, weight.t()), beta @ weight.t()


def add_lowrank_reference(
    output: torch.Tensor, projected: torch.Tensor, factor: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """``output + projected @ M + g`` per example.

    ``output`` ``(B, n, out)`` is ``u Wᵀ + b``; ``projected`` ``(B, n, r)`` is ``u W_d1ᵀ``;
    ``factor`` ``M`` ``(B, r, out)``; ``offset`` ``g`` ``(B, out)``.
    """
    return torch.baddbmm(output + offset.unsqueeze(1), projected, factor)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def lowrank_factors(
    weight: torch.Tensor,
    up_mix: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, g)`` of every example, in float32 (float64 for a float64 weight).

    Args:
        weight: ``W`` ``(out, d)``, unit stride along ``d``.
        up_mix: ``W_u^{(e)}`` of each example ``(B, r, d)``; ``beta``: ``β^{(e)}`` ``(B, d)``;
            any floating dtype, ``weight``'s device.
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (None: ``EAS_BACKEND`` or auto).

    Returns ``M = W_u Wᵀ`` ``(B, r, out)`` and ``g = β Wᵀ`` ``(B, out)``, both contiguous,
    accumulated in float32.
    """
    check_tensor(weight, "weight", ndim=2, floating=True)
    out, d = weight.shape
    device = weight.device
    check_tensor(up_mix, "up_mix", ndim=3, device=device, floating=True)
    batch, rank = up_mix.shape[:2]
    if batch == 0 or rank == 0 or up_mix.shape[2] != d:
        raise ValueError(f"up_mix must have shape (B >= 1, r >= 1, {d}), got {tuple(up_mix.shape)}")
    check_tensor(beta, "beta", ndim=2, device=device, floating=True)
    if tuple(beta.shape) != (batch, d):
        raise ValueError(f"beta must have shape ({batch}, {d}), got {tuple(beta.shape)}")
    grad = _native.needs_grad(weight, up_mix, beta)
    if not _native.use_native("lowrank_factors", backend, device, weight.dtype, grad):
        compute = _compute_dtype(weight.dtype)
        factor, offset = lowrank_factors_reference(
            weight.to(compute), up_mix.to(compute), beta.to(compute)
        )
        return factor.contiguous(), offset.contiguous()
    _native.check_matrix_rows(weight, "weight", device=device)
    up = _native.fp32_rows(torch.cat([up_mix.reshape(batch * rank, d), beta]))
    dst = torch.empty(batch * (rank + 1), out, dtype=torch.float32, device=device)
    args = (
        weight.data_ptr(),
        _native.DTYPE_CODES[weight.dtype],
        out,
        d,
        _native.row_stride(weight),
        up.data_ptr(),
        up.shape[0],
        dst.data_ptr(),
    )
    kernels = _native.module(device)
    kernels.lowrank_factors(*args, *_native.launch_args(device))
    return dst[: batch * rank].view(batch, rank, out), dst[batch * rank :]


def add_lowrank(
    output: torch.Tensor,
    projected: torch.Tensor,
    factor: torch.Tensor,
    offset: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``output + projected @ M_e + g_e`` per example, rounded once to ``output``'s dtype.

    Args:
        output: ``u Wᵀ + b`` ``(B, n, out)``, unit stride along ``out``. Consumed: the
            native kernels write the result into it.
        projected: ``u W_d1ᵀ`` ``(B, n, r)``, ``output``'s dtype.
        factor: ``M`` ``(B, r, out)`` and ``offset``: ``g`` ``(B, out)``, as returned by
            :func:`lowrank_factors` (float32, contiguous; float64 for a float64 output).
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (None: ``EAS_BACKEND`` or auto).
    """
    check_tensor(output, "output", ndim=3, floating=True)
    batch, tokens, out = output.shape
    device, dtype = output.device, output.dtype
    check_tensor(projected, "projected", ndim=3, dtype=dtype, device=device)
    rank = projected.shape[2]
    if tuple(projected.shape[:2]) != (batch, tokens) or rank == 0:
        raise ValueError(
            f"projected must have shape ({batch}, {tokens}, r >= 1), got {tuple(projected.shape)}"
        )
    compute = _compute_dtype(dtype)
    check_tensor(factor, "factor", ndim=3, dtype=compute, device=device)
    if tuple(factor.shape) != (batch, rank, out):
        raise ValueError(
            f"factor must have shape ({batch}, {rank}, {out}), got {tuple(factor.shape)}"
        )
    check_tensor(offset, "offset", ndim=2, dtype=compute, device=device)
    if tuple(offset.shape) != (batch, out):
        raise ValueError(f"offset must have shape ({batch}, {out}), got {tuple(offset.shape)}")
    grad = _native.needs_grad(output, projected, factor, offset)
    if not _native.use_native("add_lowrank", backend, device, dtype, grad):
        result = add_lowrank_reference(output.to(compute), projected.to(compute), factor, offset)
        return result.to(dtype)
    _native.check_rows(output, "output", dtype=dtype, device=device, shape=(batch, tokens, out))
    _native.check_no_overlap(output, "output")
    for name, tensor in (("factor", factor), ("offset", offset)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (as lowrank_factors returns it)")
    args = (
        output.data_ptr(),
        _native.DTYPE_CODES[dtype],
        batch,
        tokens,
        out,
        rank,
        *output.stride()[:2],
        projected.data_ptr(),
        *projected.stride(),
        factor.data_ptr(),
        offset.data_ptr(),
    )
    kernels = _native.module(device)
    kernels.lowrank_add(*args, *_native.launch_args(device))
    return _native.bumped(output)
