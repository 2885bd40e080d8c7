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
with distinct states works. Both accumulate in float32 and round once; ``F`` is kept in
the layer's dtype for float16/bfloat16 layers (half the bytes to read per step, rounded
once from its float32 accumulation), else in float32 (float64). The native kernels
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


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``F`` for a layer of ``dtype``: float16/bfloat16 as the layer, else at
    least float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else _compute_dtype(dtype)


def _rounded_factors(factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``factor`` (accumulated in float32) in the factor dtype of ``dtype``; refuses
    factors that do not fit."""
    rounded = factor.to(_factor_dtype(dtype)).contiguous()
    if rounded.dtype != factor.dtype and not bool(torch.isfinite(rounded).all()):
        raise ValueError(
            f"the low-rank factors U Wᵀ hold NaN or Inf in {rounded.dtype} (an overflow, or "
            "non-finite weights); use the merge, eager mode or a wider dtype"
        )
    return rounded


def lowrank_factors(
    weight: torch.Tensor,
    up_basis: torch.Tensor,
    *,
    backend: str | None = None,
    rounded: bool = True,
) -> torch.Tensor:
    """``F = U Wᵀ`` accumulated in float32, contiguous, in the factor dtype: the weight's
    dtype for float16/bfloat16, else float32 (float64 for a float64 weight).
    ``rounded=False`` returns the float32 (float64) accumulation itself, for every weight
    dtype (the factors a merge reads, :mod:`eas_kernels.kept_merge`).

    Args:
        weight: ``W`` ``(out, d)``, unit stride along ``d``.
        up_basis: ``U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]`` ``(2r + 2, d)`` (:meth:`PIA.up_basis`),
            any floating dtype, ``weight``'s device.
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (None: ``EAS_BACKEND`` or auto).

    Returns ``F`` ``(2r + 2, out)``: what :func:`add_lowrank` takes for every example of a
    batch, whatever their states. Raises ValueError if ``F`` does not fit in float16 or
    bfloat16.
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
        factor = lowrank_factors_reference(weight.to(compute), up_basis.to(compute))
        return _rounded_factors(factor, weight.dtype) if rounded else factor.contiguous()
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
    return _rounded_factors(dst, weight.dtype) if rounded else dst


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
        mix: each example's state ``[α₁, α₂, c]`` ``(B, r + 2)`` (:meth:`PIA.state_mix`),
            float32 (float64 for a float64 output), contiguous.
        factor: ``F`` ``(2r + 2, out)`` as returned by :func:`lowrank_factors`: contiguous,
            in the factor dtype of ``output``'s dtype.
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
    check_tensor(factor, "factor", ndim=2, dtype=_factor_dtype(dtype), device=device)
    if tuple(factor.shape) != (2 * rank + 2, out):
        raise ValueError(
            f"factor must have shape ({2 * rank + 2}, {out}), got {tuple(factor.shape)}"
        )
    grad = _native.needs_grad(output, projected, mix, factor)
    if not _native.use_native("add_lowrank", backend, device, dtype, grad):
        result = add_lowrank_reference(
            output.to(compute), projected.to(compute), mix, factor.to(compute)
        )
        return result.to(dtype)
    _native.check_rows(output, "output", dtype=dtype, device=device, shape=(batch, tokens, out))
    _native.check_no_overlap(output, "output")
    named = [("output", output), ("projected", projected), ("mix", mix), ("factor", factor)]
    _native.check_disjoint(named, written=1)
    _check_contiguous(mix, factor)
    return _launch_add(
        _native.module(device).lowrank_add,
        output,
        projected,
        (mix.data_ptr(), factor.data_ptr()),
        output.stride()[:2],
        projected.stride(),
    )


def _check_contiguous(mix: torch.Tensor, factor: torch.Tensor) -> None:
    for name, tensor in (("mix", mix), ("factor", factor)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _launch_add(
    kernel,
    output: torch.Tensor,
    projected: torch.Tensor,
    pointers: tuple[int, int],
    output_strides: tuple[int, ...],
    projected_strides: tuple[int, ...],
) -> torch.Tensor:
    """The native add on arguments already checked: ``pointers`` are those of ``mix`` and
    ``factor``; strides in elements, ``(b, t)`` of ``output`` and ``(b, t, k)`` of
    ``projected``."""
    batch, tokens, out = output.shape
    kernel(
        output.data_ptr(),
        _native.DTYPE_CODES[output.dtype],
        batch,
        tokens,
        out,
        projected.shape[2],
        *output_strides,
        projected.data_ptr(),
        *projected_strides,
        *pointers,
        *_native.launch_args(output.device),
    )
    return _native.bumped(output)


class LowrankAdd:
    """:func:`add_lowrank` bound to one target's ``mix`` and ``factor``, checked once.

    The low-rank path's forward hooks call it at every decode step. Right after the layer's
    product has streamed its weight through the caches, the per-call checks of
    :func:`add_lowrank` take about as long as its kernel (≈ 130 µs of Python per call
    measured at LLaMA-7B shapes on a 2-core CPU, against 15 µs in a hot loop). A call whose
    ``output`` and ``projected`` are contiguous and of the bound dtype, device and shapes,
    and record no gradient, goes straight to the kernel; any other call is
    :func:`add_lowrank` with all its checks.

    Args:
        mix: ``[α₁, α₂, c]`` ``(B, r + 2)`` and ``factor``: ``F`` ``(2r + 2, out)``, as for
            :func:`add_lowrank` (``factor``'s dtype is the layer's: see
            :func:`lowrank_factors`).
        backend: as for :func:`add_lowrank`, resolved now.

    Calling it with ``(output, projected)`` returns ``add_lowrank(output, projected, mix,
    factor)``.
    """

    def __init__(
        self, mix: torch.Tensor, factor: torch.Tensor, *, backend: str | None = None
    ) -> None:
        check_tensor(factor, "factor", ndim=2, floating=True)
        device, dtype = factor.device, factor.dtype  # the layer's dtype
        rows, out = factor.shape
        if rows < 4 or rows % 2:
            raise ValueError(f"factor must have shape (2r + 2, out) with r >= 1, got {(rows, out)}")
        check_tensor(mix, "mix", ndim=2, dtype=_compute_dtype(dtype), device=device)
        if mix.shape[1] != rows // 2 + 1:
            raise ValueError(f"mix must have shape (B, {rows // 2 + 1}), got {tuple(mix.shape)}")
        _check_contiguous(mix, factor)
        self.mix, self.factor, self.backend = mix, factor, backend
        self._dtype, self._device = dtype, device
        self._shape = (mix.shape[0], rows // 2 - 1, out)  # B, r, out
        native = _native.use_native("add_lowrank", backend, device, dtype, False)
        self._kernel = _native.module(device).lowrank_add if native else None
        self._pointers = (mix.data_ptr(), factor.data_ptr())  # alive as long as self
        self._spans = (_native.memory_span(mix), _native.memory_span(factor))

    def __call__(self, output: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        dtype, device = self._dtype, self._device
        if (
            self._kernel is not None
            and output.dtype is dtype
            and projected.dtype is dtype
            and output.device == device
            and projected.device == device
            and output.is_contiguous()
            and projected.is_contiguous()
            and not (torch.is_grad_enabled() and (output.requires_grad or projected.requires_grad))
        ):
            batch, rank, out = self._shape
            shape = output.shape
            if (
                len(shape) == 3
                and shape[0] == batch
                and shape[2] == out
                and projected.shape == (batch, shape[1], rank)
                and _apart(output, projected, *self._spans)
            ):
                tokens = shape[1]  # contiguous: strides (tokens·out, out, 1), (tokens·r, r, 1)
                return _launch_add(
                    self._kernel,
                    output,
                    projected,
                    self._pointers,
                    (tokens * out, out),
                    (tokens * rank, rank, 1),
                )
        return add_lowrank(output, projected, self.mix, self.factor, backend=self.backend)


def _apart(output: torch.Tensor, *others: torch.Tensor | tuple[int, int]) -> bool:
    """Whether contiguous ``output`` shares no memory with ``others`` (tensors, or their
    :func:`~eas_kernels._native.memory_span`)."""
    start = output.data_ptr()
    span = (start, start + output.numel() * output.element_size())  # contiguous
    return not any(
        _native.spans_overlap(
            span, _native.memory_span(other) if isinstance(other, torch.Tensor) else other
        )
        for other in others
    )
