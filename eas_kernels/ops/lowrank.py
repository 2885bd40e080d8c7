"""The batched low-rank path: a frozen PIA applied without changing weights (EAS_SPEC §4).

For example ``e`` with state ``(α₁, α₂, c)``, the linear layer reading ``z = u + PIA(u)``
computes

    z Wᵀ + b = (u Wᵀ + b) + (u W_d1ᵀ) M_e + g_e,   M_e = W_u^{(e)} Wᵀ (r × out),  g_e = β^{(e)} Wᵀ

with ``W_u^{(e)} = α₁ W_u1ᵀ + α₂ W_u2ᵀ`` and ``β^{(e)} = c W_u^{(e)} + α₁ b_u1 + α₂ b_u2``.
Both are combinations of four state-free factors, ``F = U Wᵀ`` with the PIA's up basis
``U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]`` (:meth:`eas_kernels.PIA.up_basis`):

    F = [A; C; a₁; a₂]  ((2r + 2) × out),   M_e = α₁ A + α₂ C,   g_e = c M_e + α₁ a₁ + α₂ a₂

so per row of the layer's output, with ``p = u W_d1ᵀ + c`` and ``κ = [α₁ p, α₂ p, α₁, α₂]``,

    z Wᵀ + b = (u Wᵀ + b) + κ F.

:func:`lowrank_factors` builds ``F`` once for a batch (``(2r + 2)·out·d`` multiply-adds,
whatever the number of examples B); :func:`add_lowrank` adds ``κ F`` into ``u Wᵀ + b`` in
place for each decoded token: ``(2r + 2)·out`` multiply-adds per example, one read and one
write of the layer's output, and ``F`` read once per step for the whole batch (per-example
factors ``M_e`` would be read B times: ``B·r·out`` floats per step). Any batch of examples
with distinct states works. Both accumulate in float32 and round once. The native kernels
are in ``csrc/cpu/lowrank.h`` and ``csrc/cuda/lowrank.cu``; the ``*_reference`` functions
are the PyTorch references (the reference add builds ``M_e`` and ``g_e`` of every example,
the form EAS_SPEC §4 states).
"""

from __future__ import annotations

import torch

from .. import _native
from .._checks import check_tensor


def lowrank_factors_reference(weight: torch.Tensor, up_basis: torch.Tensor) -> torch.Tensor:
    """``F = U Wᵀ``: ``weight`` ``(out, d)``, ``up_basis`` ``U`` ``(2r + 2, d)``; ``(2r + 2, out)``
    in their common dtype."""
    return up_basis @ weight.t()


def add_lowrank_reference(
    output: torch.Tensor, projected: torch.Tensor, mix: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """``output + projected @ M_e + g_e`` per example, ``M_e`` and ``g_e`` built from ``F``.

    ``output`` ``(B, n, out)`` is ``u Wᵀ + b``; ``projected`` ``(B, n, r)`` is ``u W_d1ᵀ``;
    ``mix`` ``(B, r + 2)`` is each example's ``[α₁, α₂, c]``; ``factor`` ``F`` ``(2r + 2, out)``.
    """
    rank = projected.shape[-1]
    alpha1, alpha2, c = mix[:, 0, None, None], mix[:, 1, None, None], mix[:, 2:]
    m = alpha1 * factor[:rank] + alpha2 * factor[rank : 2 * rank]  # (B, r, out)
    g = (
        (c.unsqueeze(1) @ m).squeeze(1)
        + alpha1[:, 0] * factor[2 * rank]
        + alpha2[:, 0] * factor[2 * rank + 1]
    )
    return torch.baddbmm(output + g.unsqueeze(1), projected, m)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def lowrank_factors(
    weight: torch.Tensor, up_basis: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """``F = U Wᵀ`` in float32 (float64 for a float64 weight), contiguous.

    Args:
        weight: ``W`` ``(out, d)``, unit stride along ``d``.
        up_basis: ``U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]`` ``(2r + 2, d)`` (:meth:`PIA.up_basis`),
            any floating dtype, ``weight``'s device.
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (None: ``EAS_BACKEND`` or auto).

    Returns ``F`` ``(2r + 2, out)``, accumulated in float32: what :func:`add_lowrank` takes
    for every example of a batch, whatever their states.
    """
    check_tensor(weight, "weight", ndim=2, floating=True)
    out, d = weight.shape
    device = weight.device
    check_tensor(up_basis, "up_basis", ndim=2, device=device, floating=True)
    rows = up_basis.shape[0]
    if rows < 4 or rows % 2 or up_basis.shape[1] != d:
        raise ValueError(
            f"up_basis must have shape (2r + 2, {d}) with r >= 1, got {tuple(up_basis.shape)}"
        )
    grad = _native.needs_grad(weight, up_basis)
    if not _native.use_native("lowrank_factors", backend, device, weight.dtype, grad):
        compute = _compute_dtype(weight.dtype)
        return lowrank_factors_reference(weight.to(compute), up_basis.to(compute)).contiguous()
    _native.check_matrix_rows(weight, "weight", device=device)
    up = _native.fp32_rows(up_basis)
    dst = torch.empty(rows, out, dtype=torch.float32, device=device)
    args = (
        weight.data_ptr(),
        _native.DTYPE_CODES[weight.dtype],
        out,
        d,
        _native.row_stride(weight),
        up.data_ptr(),
        rows,
        dst.data_ptr(),
    )
    kernels = _native.module(device)
    kernels.lowrank_factors(*args, *_native.launch_args(device))
    return dst


def add_lowrank(
    output: torch.Tensor,
    projected: torch.Tensor,
    mix: torch.Tensor,
    factor: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``output + projected @ M_e + g_e`` per example, rounded once to ``output``'s dtype.

    Args:
        output: ``u Wᵀ + b`` ``(B, n, out)``, unit stride along ``out``. Consumed: the
            native kernels write the result into it.
        projected: ``u W_d1ᵀ`` ``(B, n, r)``, ``output``'s dtype.
        mix: each example's state ``[α₁, α₂, c]`` ``(B, r + 2)`` (:meth:`PIA.state_mix`) and
        factor: ``F`` ``(2r + 2, out)`` as returned by :func:`lowrank_factors`; both float32
            (float64 for a float64 output), contiguous.
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
    check_tensor(mix, "mix", ndim=2, dtype=compute, device=device)
    if tuple(mix.shape) != (batch, rank + 2):
        raise ValueError(f"mix must have shape ({batch}, {rank + 2}), got {tuple(mix.shape)}")
    check_tensor(factor, "factor", ndim=2, dtype=compute, device=device)
    if tuple(factor.shape) != (2 * rank + 2, out):
        raise ValueError(
            f"factor must have shape ({2 * rank + 2}, {out}), got {tuple(factor.shape)}"
        )
    grad = _native.needs_grad(output, projected, mix, factor)
    if not _native.use_native("add_lowrank", backend, device, dtype, grad):
        result = add_lowrank_reference(output.to(compute), projected.to(compute), mix, factor)
        return result.to(dtype)
    _native.check_rows(output, "output", dtype=dtype, device=device, shape=(batch, tokens, out))
    _native.check_no_overlap(output, "output")
    for name, tensor in (("mix", mix), ("factor", factor)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
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
        mix.data_ptr(),
        factor.data_ptr(),
    )
    kernels = _native.module(device)
    kernels.lowrank_add(*args, *_native.launch_args(device))
    return _native.bumped(output)
