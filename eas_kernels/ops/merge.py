"""Merge a frozen PIA into the linear layers that read ``u + PIA(u)`` (EAS_SPEC §4).

For a linear layer ``y = z Wᵀ + b`` (``W``: ``out × d``) fed ``z = u + PIA(u)`` with the
example's frozen state, ``z = u (I + W_d1ᵀ W_u) + β`` and so

    W' = W + (W W_uᵀ) W_d1          rank-r update, O(out · d · r) — never the d × d matrix
    b' = b + W βᵀ                   from the *pristine* W (the public code's bug used W')

``W_u`` (``r × d``) and ``β`` (``d``) come from :meth:`eas_kernels.PIA.mixed_up_projection`.

:func:`merge_sites` computes ``W'`` for all the layers of many sites (``wq, wk, wv`` or
``w1, w3`` of every adapter site of a model) in one native call, into each weight's
*merged buffer*, and never writes the weights: a merge whose result would hold NaN or Inf
is refused (:class:`MergeRefused`, naming the site) with nothing to undo;
:func:`merged_linear` is the same for one site. The caller then
swaps the buffers in with :func:`install_merged` (``weight.data = W'``: the Parameter
stays the same object) and back with :func:`restore_merged`, which moves no bytes and is
bitwise by construction — the pristine storage was never written. Per weight, the native
kernels (``csrc/cpu/merge.h``, ``csrc/cuda/merge.cu``) read ``W`` once from memory and
write ``W'`` once: ``4·out·d·r`` flops, fp32 accumulation, one rounding, every entry
checked finite. :func:`merged_linear_reference` is the PyTorch reference.

The merged buffers are allocated once per weight and kept for its next merge (a fresh
allocation of 180 MB costs more than the merge itself on a CPU: page faults):
:func:`merge_buffer_bytes` reports their memory and :func:`free_merge_buffers` releases
those not swapped in.
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
    products = torch.cat([projected, (w @ beta.to(compute)).unsqueeze(1)], dim=1)
    return _merged_from_products(weight, bias, down_weight, products)


class SiteMerge(NamedTuple):
    """One PIA and the layers that read it, as :func:`merge_sites` takes them: the
    arguments of :func:`merged_linear`, optionally with each target's factors.

    ``factors``: per weight, ``Fᵀ = W Uᵀ`` ``(out, 2r + 2)`` contiguous float32, with
    ``U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]`` the PIA's up basis (:meth:`eas_kernels.PIA.up_basis`)
    — independent of the state, so the runtime keeps them across prompts
    (:mod:`eas_kernels.kept_merge`) — and ``mix``: the frozen state ``(α₁, α₂, c)``
    ``(r + 2,)`` contiguous float32. The kernels then take ``Q = [W W_uᵀ | W βᵀ]`` from them
    (:func:`products_from_factors`, ``O(out · r)``) instead of from ``W``
    (``2·out·d·r`` flops instead of ``4·out·d·r``), and still check every entry of ``Q``,
    ``W'`` and ``b'`` finite. With factors, ``up_mix`` and ``beta`` may be None (nothing
    reads them then); the torch backend computes its own ``Q`` from them when they are
    given, else from the factors.
    """

    weights: Sequence[torch.Tensor]
    biases: Sequence[torch.Tensor | None]
    down_weight: torch.Tensor
    up_mix: torch.Tensor | None
    beta: torch.Tensor | None
    factors: Sequence[torch.Tensor] | None = None
    mix: torch.Tensor | None = None


def products_from_factors(factors: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``Q = [P | P cᵀ + α₁ a₁ + α₂ a₂]`` ``(out, r + 1)`` with ``P = α₁ A + α₂ C``, from
    the factors ``Fᵀ = [A | C | a₁ | a₂]`` ``(out, 2r + 2)`` and ``mix = (α₁, α₂, c)``
    ``(r + 2,)``: equal to ``W [W_u; β]ᵀ`` for ``W_u`` and ``β`` mixed from that state
    (:func:`eas_kernels.pia.mix_up`), since ``W_u = α₁ W_u1ᵀ + α₂ W_u2ᵀ`` and
    ``β = c W_u + α₁ b_u1 + α₂ b_u2``. In the inputs' dtype."""
    rank = mix.shape[0] - 2
    a1, a2, c = mix[0], mix[1], mix[2:]
    p = a1 * factors[:, :rank] + a2 * factors[:, rank : 2 * rank]
    bias = p @ c + a1 * factors[:, 2 * rank] + a2 * factors[:, 2 * rank + 1]
    return torch.cat([p, bias.unsqueeze(1)], dim=1)


class MergeRefused(ValueError):
    """A merge whose result would hold NaN or Inf; ``site`` indexes the refused site."""

    def __init__(self, message: str, site: int) -> None:
        super().__init__(message)
        self.site = site


class MergedTarget(NamedTuple):
    """What :func:`merged_linear` computes for one weight."""

    merged: torch.Tensor  # W' (out, d), contiguous, the weight's dtype: its merged buffer
    bias: torch.Tensor  # b' = b + W βᵀ (out,), the weight's dtype


_buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> its merged buffer
_prepared_merges: weakref.WeakSet[PreparedMerge] = weakref.WeakSet()  # they hold buffers too


def _merge_buffer(weight: torch.Tensor) -> torch.Tensor:
    """The buffer that receives ``weight``'s merged values: the one kept for it, unless it
    does not fit or is swapped in (then ``weight`` itself holds it), else a new one — an
    inference tensor exactly when ``weight`` is one, so that it can be swapped into the
    weight's Parameter whatever the grad mode of the call."""
    buffer = _buffers.get(weight)
    layout = (weight.shape, weight.dtype, weight.device)
    if (
        buffer is None
        or (buffer.shape, buffer.dtype, buffer.device) != layout
        or buffer.data_ptr() == weight.data_ptr()
    ):
        with torch.inference_mode(weight.is_inference()):
            buffer = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        _buffers[weight] = buffer
    return buffer


def install_merged(weight: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Swap ``merged`` (from :func:`merged_linear`) in as ``weight``'s values, in O(1):
    ``weight.data = merged``, the Parameter object unchanged. Returns the pristine storage,
    for :func:`restore_merged`."""
    pristine = weight.data
    weight.data = merged  # not recorded by autograd: no grad mode needed
    return pristine


def restore_merged(weight: torch.Tensor, pristine: torch.Tensor) -> None:
    """Put a merged weight back, bitwise and in O(1): swap in the storage
    :func:`install_merged` returned (the merge never wrote it). A model converted while
    merged (``.to(dtype)``, ``.double()``, ``.to(device)``) converted the merged values
    only: the pristine values take the same element-wise conversion here, which is what
    the weight would hold had it been converted unmerged."""
    if (pristine.dtype, pristine.device) != (weight.dtype, weight.device):
        pristine = pristine.to(dtype=weight.dtype, device=weight.device)
    weight.data = pristine


def merge_buffer_bytes() -> int:
    """Bytes of the merged buffers held for weights: one per merged weight, swapped in or
    kept for its next merge."""
    return sum(buffer.nbytes for buffer in list(_buffers.values()))


def free_merge_buffers() -> int:
    """Release the merged buffers that no weight holds now; return the bytes freed. Each
    :class:`PreparedMerge` lets go of its buffers too and allocates them again at its
    next run."""
    freed = 0
    for weight, buffer in list(_buffers.items()):
        if buffer.data_ptr() != weight.data_ptr():
            freed += buffer.nbytes
            del _buffers[weight]
    for prepared in list(_prepared_merges):
        prepared.release()
    return freed


def _check_site(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    down_weight: torch.Tensor,
    up_mix: torch.Tensor | None,
    beta: torch.Tensor | None,
    factors: Sequence[torch.Tensor] | None = None,
    mix: torch.Tensor | None = None,
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
    if up_mix is None or beta is None:
        if up_mix is not None or beta is not None or factors is None:
            raise ValueError("up_mix and beta are both needed, unless factors are given")
    else:
        check_tensor(up_mix, "up_mix", ndim=2, device=device, floating=True)
        if tuple(up_mix.shape) != (rank, d):
            raise ValueError(f"up_mix must have shape ({rank}, {d}), got {tuple(up_mix.shape)}")
        check_tensor(beta, "beta", ndim=1, device=device, floating=True)
        if tuple(beta.shape) != (d,):
            raise ValueError(f"beta must have shape ({d},), got {tuple(beta.shape)}")
    if factors is None:
        if mix is not None:
            raise ValueError("mix is given without factors")
        return d, rank
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError("factors must be a sequence of (out, 2r + 2) tensors or None")
    if len(factors) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(factors)} factors")
    compute = torch.promote_types(dtype, torch.float32)  # float64 stays float64
    checks = [
        (f"factors[{index}]", factor, (weight.shape[0], 2 * rank + 2))
        for index, (weight, factor) in enumerate(zip(weights, factors, strict=True))
    ]
    for name, tensor, shape in [*checks, ("mix", mix, (rank + 2,))]:
        if tensor is None:
            raise ValueError(f"{name} is needed with factors: the state (α₁, α₂, c)")
        _native.check_rows(tensor, name, dtype=compute, device=device, shape=shape)
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    return d, rank


def _refusal(weight: torch.Tensor, site: int) -> MergeRefused:
    return MergeRefused(
        f"merging into a {tuple(weight.shape)} weight gives NaN or Inf in {weight.dtype}; "
        "refusing to merge",
        site,
    )


def merged_linear(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    down_weight: torch.Tensor,
    up_mix: torch.Tensor | None,
    beta: torch.Tensor | None,
    factors: Sequence[torch.Tensor] | None = None,
    mix: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> list[MergedTarget]:
    """The merged weights and biases of the layers that read one PIA (EAS_SPEC §4).

    Args:
        weights: the targets' weights ``W`` ``(out_i, d)``, one dtype and device, unit
            stride along ``d``; read only.
        biases: per weight, ``b`` ``(out_i,)`` or None (zero); read only.
        down_weight: ``W_d1`` ``(r, d)``; ``up_mix``: ``W_u`` ``(r, d)``; ``beta``: ``β``
            ``(d,)`` — any floating dtype, same device.
        factors, mix: per weight, ``Fᵀ = W Uᵀ`` ``(out_i, 2r + 2)`` float32, and the
            state ``(α₁, α₂, c)`` ``(r + 2,)`` float32, when the caller keeps them
            (:class:`SiteMerge`; ``up_mix`` and ``beta`` may then be None), else None.
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (None: ``EAS_BACKEND`` or auto).

    Returns, per weight, ``W' = W + (W W_uᵀ) W_d1`` in the weight's merged buffer (kept
    for the weight; swap it in with :func:`install_merged`) and ``b' = b + W βᵀ``. fp32
    accumulation, one rounding to the weight's dtype.

    Raises ValueError (:class:`MergeRefused`), naming the weight's shape, when a ``W'`` or
    ``b'`` would hold NaN or Inf in the weight's dtype; no weight is ever written.
    """
    site = SiteMerge(weights, biases, down_weight, up_mix, beta, factors, mix)
    return merge_sites([site], backend=backend)[0]


def merge_sites(
    sites: Sequence[SiteMerge], *, backend: str | None = None
) -> list[list[MergedTarget]]:
    """:func:`merged_linear` of every site at once — one native call for all of them (every
    adapter site of a model): per site, its targets' merged buffers and biases.

    All weights share their width ``d``, dtype and device; no weight appears twice. A
    refusal raises :class:`MergeRefused` whose ``site`` is the index of the first refused
    site; nothing is written to any weight, whatever the outcome.
    """
    return PreparedMerge(sites, backend=backend).run()


class PreparedMerge:
    """A checked :func:`merge_sites` call that can run again: the argument checks, the
    native argument records, the merged buffers, the new biases and the scratch are made
    once, and each :meth:`run` writes the same buffers.

    Each run reads the current *values* of ``weights``, ``biases``, ``factors`` and ``mix``
    (the runtime writes each prompt's state into the same ``mix`` rows,
    :mod:`eas_kernels.kept_merge`); ``down_weight``, ``up_mix`` and ``beta`` may be read
    only once, when prepared (the native path takes float32 copies of them). No tensor may
    change its storage, shape or strides between runs: the native records hold their
    addresses.
    Whoever keeps a prepared merge keys it on the tensors' identities, version counters and
    storages (:func:`eas_kernels.factors.weights_key`). A run returns the same
    :class:`MergedTarget` objects every time (until :func:`free_merge_buffers` releases
    them); swap them out (:func:`restore_merged`) before the next run.
    """

    def __init__(self, sites: Sequence[SiteMerge], *, backend: str | None = None) -> None:
        if isinstance(sites, SiteMerge) or not isinstance(sites, Sequence) or not sites:
            raise TypeError("sites must be a non-empty sequence of SiteMerge")
        shapes = [_check_site(*site) for site in sites]
        weight0 = sites[0].weights[0]
        layout = (weight0.shape[1], weight0.dtype, weight0.device)
        seen: dict[int, tuple[int, int]] = {}
        for index, site in enumerate(sites):
            first = site.weights[0]
            if (first.shape[1], first.dtype, first.device) != layout:
                raise ValueError(
                    f"sites[{index}] has weights of width, dtype and device "
                    f"{(first.shape[1], first.dtype, first.device)}, sites[0] {layout}: one "
                    "call merges weights that share them"
                )
            for position, weight in enumerate(site.weights):
                earlier = seen.setdefault(id(weight), (index, position))
                if earlier != (index, position):
                    raise ValueError(
                        f"sites[{earlier[0]}].weights[{earlier[1]}] and sites[{index}]."
                        f"weights[{position}] are the same tensor: each target gets its own "
                        "merged buffer"
                    )
        self._sites = list(sites)
        self._tensors = [t for site in sites for t in _tensors_of(site) if t is not None]
        grad = _native.needs_grad(*self._tensors)
        self._native = _native.use_native(
            "merged_linear", backend, weight0.device, weight0.dtype, grad
        )
        self._shapes = shapes
        self._scratch: torch.Tensor | None = None  # None: not prepared (or released)
        if self._native:
            self._prepare_native()
            _prepared_merges.add(self)

    def release(self) -> None:
        """Let go of the merged buffers, new biases and scratch (:func:`free_merge_buffers`
        calls it); the next run makes them again. Results already returned stay valid."""
        self._results, self._keep_alive = [], []
        self._site_args, self._target_args, self._scratch = [], [], None

    def _prepare_native(self) -> None:
        weight0 = self._sites[0].weights[0]
        device, d = weight0.device, weight0.shape[1]
        self._results: list[list[MergedTarget]] = []
        self._site_args, self._target_args, self._keep_alive = [], [], []
        self._owners: list[tuple[int, int]] = []  # (site, position in it) of each target
        q_floats = rows = ranks = 0
        for index, (site, (_, rank)) in enumerate(zip(self._sites, self._shapes, strict=True)):
            down = _native.fp32_rows(site.down_weight)
            self._keep_alive.append(down)
            up_address = 0  # no rows: every target gives its factors
            if site.up_mix is not None and site.beta is not None:
                up = _up_rows(site.up_mix, site.beta)  # (r + 1, d) fp32
                self._keep_alive.append(up)
                up_address = up.data_ptr()
            mix = 0 if site.mix is None else site.mix.data_ptr()
            self._site_args.append(
                _native.merge_site(up=up_address, down=down.data_ptr(), rank=rank, mix=mix)
            )
            ranks += rank
            merged_targets = []
            for position, (weight, bias) in enumerate(zip(site.weights, site.biases, strict=True)):
                self._owners.append((index, position))
                merged = _merge_buffer(weight)
                with torch.inference_mode(weight.is_inference()):  # swappable into a Parameter
                    new_bias = torch.empty(weight.shape[0], dtype=weight.dtype, device=device)
                factors = site.factors
                self._target_args.append(
                    _native.merge_target(
                        weight=weight.data_ptr(),
                        out=weight.shape[0],
                        ld=_native.row_stride(weight),
                        merged=merged.data_ptr(),
                        bias=0 if bias is None else bias.data_ptr(),
                        new_bias=new_bias.data_ptr(),
                        site=index,
                        factors=0 if factors is None else factors[position].data_ptr(),
                    )
                )
                merged_targets.append(MergedTarget(merged, new_bias))
                q_floats += weight.shape[0] * (rank + 1)
                rows += weight.shape[0]
            self._results.append(merged_targets)
        self._kernels = _native.module(device)
        size = self._kernels.merge_scratch_floats(q_floats, rows, ranks, len(self._target_args))
        self._scratch = torch.empty(size, dtype=torch.float32, device=device)
        self._call = (_native.DTYPE_CODES[weight0.dtype], d, self._scratch.data_ptr())

    def run(self) -> list[list[MergedTarget]]:
        """Merge every site now: per site, its targets' merged buffers and new biases.

        Raises :class:`MergeRefused` (the first refused site) with no weight written.
        """
        if not self._native:
            return [_merge_with_torch(index, site) for index, site in enumerate(self._sites)]
        if _native.needs_grad(*self._tensors):
            raise RuntimeError(
                "merged_linear: the native kernels do not record gradients; run the merge "
                "under torch.no_grad()"
            )
        if self._scratch is None:
            self._prepare_native()
        device = self._sites[0].weights[0].device
        refused = self._kernels.merge(
            self._target_args, self._site_args, *self._call, *_native.launch_args(device)
        )
        if refused >= 0:
            index, position = self._owners[refused]
            raise _refusal(self._sites[index].weights[position], index)
        return self._results


def _up_rows(up_mix: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``[W_u; β]`` ``(r + 1, d)``, contiguous float32: read in place when ``β`` is the row
    that follows ``W_u`` in one float32 buffer (a caller's layout; the runtime now passes
    factors instead), else copied."""
    rank, dim = up_mix.shape
    storage = up_mix.untyped_storage()
    adjacent = (
        up_mix.dtype == beta.dtype == torch.float32
        and up_mix.is_contiguous()
        and beta.is_contiguous()
        and beta.untyped_storage().data_ptr() == storage.data_ptr()
        and beta.storage_offset() == up_mix.storage_offset() + rank * dim
    )
    if adjacent:
        return up_mix.as_strided((rank + 1, dim), (dim, 1))
    return _native.fp32_rows(torch.cat([up_mix, beta.unsqueeze(0)]))


def _merged_from_products(
    weight: torch.Tensor, bias: torch.Tensor | None, down_weight: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W + Q[:, :r] W_d1`` and ``b + Q[:, r]`` with float32 accumulation (float64 stays
    float64), one rounding: the second half of :func:`merged_linear_reference`, and what
    the torch backend computes from the products of given factors."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    rank = down_weight.shape[0]
    new_weight = torch.addmm(weight.to(compute), q[:, :rank].to(compute), down_weight.to(compute))
    new_bias = q[:, rank].to(compute)
    if bias is not None:
        new_bias = new_bias + bias.to(compute)
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _tensors_of(site: SiteMerge) -> list[torch.Tensor | None]:  # None where absent
    return [
        *site.weights, *site.biases, site.down_weight, site.up_mix, site.beta,
        *(site.factors or ()), site.mix,
    ]  # fmt: skip


def _merge_with_torch(index: int, site: SiteMerge) -> list[MergedTarget]:
    if site.up_mix is not None and site.beta is not None:  # the reference's own products
        merged = [
            merged_linear_reference(w, b, site.down_weight, site.up_mix, site.beta)
            for w, b in zip(site.weights, site.biases, strict=True)
        ]
    else:
        assert site.factors is not None and site.mix is not None
        merged = [
            _merged_from_products(w, b, site.down_weight, products_from_factors(f, site.mix))
            for w, b, f in zip(site.weights, site.biases, site.factors, strict=True)
        ]
    for weight, (new_weight, new_bias) in zip(site.weights, merged, strict=True):
        if not (bool(torch.isfinite(new_weight).all()) and bool(torch.isfinite(new_bias).all())):
            raise _refusal(weight, index)
    results = []
    for weight, (new_weight, new_bias) in zip(site.weights, merged, strict=True):
        buffer = _merge_buffer(weight)
        with torch.inference_mode(weight.is_inference()), torch.no_grad():  # as the weight
            buffer.copy_(new_weight)
            results.append(MergedTarget(buffer, new_bias.clone()))
    return results
