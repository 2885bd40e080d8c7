"""Merge a frozen PIA into the linear layers that read ``u + PIA(u)`` (EAS_SPEC §4).

For a linear layer ``y = z Wᵀ + b`` (``W``: ``out × d``) fed ``z = u + PIA(u)`` with the
example's frozen state, ``z = u (I + W_d1ᵀ W_u) + β`` and so

    W' = W + (W W_uᵀ) W_d1          rank-r update, O(out · d · r) — never the d × d matrix
    b' = b + W βᵀ                   from the *pristine* W (the public code's bug used W')

``W_u`` (``r × d``) and ``β`` (``d``) come from :meth:`eas_kernels.PIA.mixed_up_projection`.

:func:`merged_linear` writes ``W'`` into the weights of all the layers of one site at once
(``wq, wk, wv`` or ``w1, w3``) and hands back bitwise copies of the pristine weights, which
restore them exactly (never ``W += Δ; W -= Δ``). Per weight, the native kernels
(``csrc/cpu/merge.h``, ``csrc/cuda/merge.cu``) compute ``P = W W_uᵀ`` and ``W βᵀ`` (one
read of ``W``, which also writes the pristine copy), check that no entry of the result can
be NaN/Inf, then update ``W`` in one streaming read-modify-write: ``4·out·d·r`` flops,
fp32 accumulation, one rounding. :func:`merged_linear_reference` is the PyTorch reference.

Pristine copies are buffers the size of the merged weights. Each is kept, after its
weight is restored, for that weight's next merge (a fresh allocation of 180 MB costs more
than the merge itself on a CPU: page faults); :func:`pristine_bytes` reports their memory
and :func:`free_pristine_buffers` releases those not in use. A weight put back with
:func:`restore_merged` is bitwise its buffer, so its next merge does not write the copy
again, as long as torch's version counters show that neither was modified in place since
(an edit through ``.data`` bypasses them: call :func:`free_pristine_buffers` after one).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _native
from .._checks import check_tensor


def merged_linear_reference(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    up_mix: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the merged ``(W', b')`` in ``weight``'s dtype; the inputs are not modified.

    Shapes: ``weight`` ``(out, d)``, ``bias`` ``(out,)`` or None (zero), ``down_weight``
    ``W_d1`` ``(r, d)``, ``up_mix`` ``W_u`` ``(r, d)``, ``beta`` ``(d,)``. Accumulates in
    float32 (float64 stays float64) and rounds once to the storage dtype.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(compute)
    projected = w @ up_mix.to(compute).t()  # (out, r) = W W_uᵀ
    new_weight = torch.addmm(w, projected, down_weight.to(compute))
    new_bias = w @ beta.to(compute)
    if bias is not None:
        new_bias = new_bias + bias.to(compute)
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


class MergedTarget(NamedTuple):
    """What :func:`merged_linear` leaves for one weight it wrote."""

    pristine: torch.Tensor  # bitwise copy of the weight before the merge, contiguous
    bias: torch.Tensor  # b' = b + W βᵀ (out,), the weight's dtype, for the caller to install


class _PristineBuffer:
    """A buffer kept for one weight, the view of it that is currently lent out, and what
    proves that the buffer holds the weight bitwise (set by :func:`restore_merged`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.base = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.lent: weakref.ref[torch.Tensor] | None = None
        self.synced: tuple[int, int, int, int] | None = None

    def sync_key(self, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
        """Both version counters, the weight's address and the current stream; None for
        inference tensors, which have no version counter.

        The stream is part of the key because "the buffer holds the weight" is true in the
        order of the stream that restored it: a merge on another stream must copy again.
        """
        if weight.is_inference() or self.base.is_inference():
            return None
        return (weight._version, self.base._version, weight.data_ptr(), _stream_of(weight))

    def fits(self, weight: torch.Tensor) -> bool:
        base = self.base
        return (base.shape, base.dtype, base.device) == (weight.shape, weight.dtype, weight.device)

    def in_use(self) -> bool:
        return self.lent is not None and self.lent() is not None

    def lend(self) -> torch.Tensor:
        view = self.base.view(self.base.shape)  # a distinct tensor object: dies with its holder
        self.lent = weakref.ref(view)
        self.synced = None
        return view


def _stream_of(tensor: torch.Tensor) -> int:
    """An id of the stream work on ``tensor`` is enqueued on now (0 on a CPU)."""
    if tensor.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(tensor.device).cuda_stream


_buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> _PristineBuffer


def _pristine_buffer(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A buffer for ``weight``'s pristine copy — its kept one when free, else a new one —
    and whether it already holds ``weight`` bitwise (then the merge need not copy it)."""
    buffer = _buffers.get(weight)
    if buffer is None or buffer.in_use() or not buffer.fits(weight):
        buffer = _PristineBuffer(weight)
        _buffers[weight] = buffer
    holds_weight = buffer.synced is not None and buffer.synced == buffer.sync_key(weight)
    return buffer.lend(), holds_weight


def restore_merged(weight: torch.Tensor, pristine: torch.Tensor) -> None:
    """Put a merged weight back bitwise: ``weight.copy_(pristine)``.

    ``pristine`` is the copy :func:`merged_linear` returned for ``weight``. Afterwards the
    buffer is known to hold ``weight``, so the next merge of ``weight`` skips writing the
    copy unless either tensor was modified in place in between, ``weight`` moved, or the
    merge runs on another CUDA stream than the restore.
    """
    with torch.no_grad():
        weight.copy_(pristine)
    buffer = _buffers.get(weight)
    if buffer is not None and buffer.fits(weight) and buffer.base.data_ptr() == pristine.data_ptr():
        buffer.synced = buffer.sync_key(weight)


def pristine_bytes() -> int:
    """Bytes of the pristine buffers held for merged weights: one per weight, in use by its
    merge or kept for the next one."""
    return sum(buffer.base.nbytes for buffer in list(_buffers.values()))


def free_pristine_buffers() -> int:
    """Release the kept pristine buffers that no merged weight uses; return the bytes freed."""
    freed = 0
    for weight, buffer in list(_buffers.items()):
        if not buffer.in_use():
            freed += buffer.base.nbytes
            del _buffers[weight]
    return freed


def _check_site(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    down_weight: torch.Tensor,
    up_mix: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[int, int]:
    """Validate a site's arguments; return ``(d, r)``."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or not weights:
        raise TypeError("weights must be a non-empty sequence of (out, d) tensors")
    if isinstance(biases, torch.Tensor) or not isinstance(biases, Sequence):
        raise TypeError("biases must be a sequence of (out,) tensors or None")
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases")
    first = check_tensor(weights[0], "weights[0]", ndim=2, floating=True)
    device, dtype, d = first.device, first.dtype, first.shape[1]
    for index, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        weight = _native.check_matrix_rows(weight, f"weights[{index}]", device=device)
        if weight.dtype != dtype:
            raise TypeError(
                f"weights[{index}] is {weight.dtype} but weights[0] is {dtype}: the targets of "
                "one site share their dtype"
            )
        if weight.shape[1] != d:
            raise ValueError(
                f"weights[{index}] has shape {tuple(weight.shape)} but weights[0] has d = {d}: "
                "the targets of one site share d"
            )
        if bias is not None:
            _native.check_rows(
                bias, f"biases[{index}]", dtype=dtype, device=device, shape=(weight.shape[0],)
            )
    check_tensor(down_weight, "down_weight", ndim=2, device=device, floating=True)
    rank = down_weight.shape[0]
    if rank == 0 or down_weight.shape[1] != d:
        raise ValueError(
            f"down_weight must have shape (r >= 1, {d}), got {tuple(down_weight.shape)}"
        )
    check_tensor(up_mix, "up_mix", ndim=2, device=device, floating=True)
    if tuple(up_mix.shape) != (rank, d):
        raise ValueError(f"up_mix must have shape ({rank}, {d}), got {tuple(up_mix.shape)}")
    check_tensor(beta, "beta", ndim=1, device=device, floating=True)
    if tuple(beta.shape) != (d,):
        raise ValueError(f"beta must have shape ({d},), got {tuple(beta.shape)}")
    named = [(f"weights[{i}]", weight) for i, weight in enumerate(weights)]
    named += [(f"biases[{i}]", bias) for i, bias in enumerate(biases) if bias is not None]
    named += [("down_weight", down_weight), ("up_mix", up_mix), ("beta", beta)]
    _native.check_disjoint(named, written=len(weights))
    return d, rank


def _refusal(weight: torch.Tensor) -> ValueError:
    return ValueError(
        f"merging into a {tuple(weight.shape)} weight gives NaN or Inf in {weight.dtype}; "
        "refusing to merge"
    )


def merged_linear(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    down_weight: torch.Tensor,
    up_mix: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: str | None = None,
) -> list[MergedTarget]:
    """Write one PIA into the weights of the layers that read it, in place (EAS_SPEC §4).

    Args:
        weights: the targets' weights ``W`` ``(out_i, d)``, one dtype and device, unit
            stride along ``d``; overwritten with ``W' = W + (W W_uᵀ) W_d1``.
        biases: per weight, ``b`` ``(out_i,)`` or None (zero); read only.
        down_weight: ``W_d1`` ``(r, d)``; ``up_mix``: ``W_u`` ``(r, d)``; ``beta``: ``β``
            ``(d,)`` — any floating dtype, same device.
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (None: ``EAS_BACKEND`` or auto).

    Returns, per weight, its pristine copy (restore with :func:`restore_merged`, or
    ``weight.copy_(pristine)``: bitwise) and ``b' = b + W βᵀ``. fp32 accumulation, one
    rounding to the weight's dtype.

    Raises ValueError, before writing any weight, when a ``W'`` or ``b'`` would hold NaN
    or Inf in the weight's dtype.
    """
    d, rank = _check_site(weights, biases, down_weight, up_mix, beta)
    weight0 = weights[0]
    grad = _native.needs_grad(*weights, *biases, down_weight, up_mix, beta)
    if not _native.use_native("merged_linear", backend, weight0.device, weight0.dtype, grad):
        return _merge_with_torch(weights, biases, down_weight, up_mix, beta)
    device = weight0.device
    up = _native.fp32_rows(torch.cat([up_mix, beta.unsqueeze(0)]))  # (r + 1, d)
    down = _native.fp32_rows(down_weight)
    results, targets = [], []
    for weight, bias in zip(weights, biases, strict=True):
        pristine, holds_weight = _pristine_buffer(weight)
        new_bias = torch.empty(weight.shape[0], dtype=weight.dtype, device=device)
        bias_pointer = 0 if bias is None else bias.data_ptr()
        targets.append(
            _native.merge_target(
                weight=weight.data_ptr(),
                out=weight.shape[0],
                ld=_native.row_stride(weight),
                pristine=pristine.data_ptr(),
                bias=bias_pointer,
                new_bias=new_bias.data_ptr(),
                copy_pristine=not holds_weight,
            )
        )
        results.append(MergedTarget(pristine, new_bias))
    rows = sum(weight.shape[0] for weight in weights)
    kernels = _native.module(device)
    scratch_size = kernels.merge_scratch_floats(rows, rank, len(weights))
    scratch = torch.empty(scratch_size, dtype=torch.float32, device=device)
    code = _native.DTYPE_CODES[weight0.dtype]
    kernel_args = (targets, code, d, rank, up.data_ptr(), down.data_ptr(), scratch.data_ptr())
    refused = kernels.merge(*kernel_args, *_native.launch_args(device))
    if refused >= 0:
        raise _refusal(weights[refused])
    for weight in weights:
        _native.bumped(weight)
    return results


def _merge_with_torch(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    down_weight: torch.Tensor,
    up_mix: torch.Tensor,
    beta: torch.Tensor,
) -> list[MergedTarget]:
    merged = [
        merged_linear_reference(w, b, down_weight, up_mix, beta)
        for w, b in zip(weights, biases, strict=True)
    ]
    for weight, (new_weight, new_bias) in zip(weights, merged, strict=True):
        if not (bool(torch.isfinite(new_weight).all()) and bool(torch.isfinite(new_bias).all())):
            raise _refusal(weight)
    results = []
    for weight, (new_weight, new_bias) in zip(weights, merged, strict=True):
        pristine, holds_weight = _pristine_buffer(weight)
        if not holds_weight:
            pristine.copy_(weight)
        weight.copy_(new_weight)
        results.append(MergedTarget(pristine, new_bias))
    return results
