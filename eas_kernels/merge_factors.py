"""The factors a whole-model merge reads, kept across prompts (EAS_SPEC §4).

A merge of a target ``W`` (``out × d``) with the frozen state ``(α₁, α₂, c)`` of its PIA
needs ``Q = [W W_uᵀ | W βᵀ]`` (``out × (r + 1)``), with ``W_u = α₁ W_u1ᵀ + α₂ W_u2ᵀ`` and
``β = c W_u + α₁ b_u1 + α₂ b_u2``. Both are combinations of the state-free factors of the
low-rank path, ``F = U Wᵀ = [A; C; a₁; a₂]`` (``(2r + 2) × out``, :func:`eas_kernels.ops.
lowrank_factors`, ``U`` = :meth:`eas_kernels.PIA.up_basis`)::

    P = Q[:, :r] = (α₁ A + α₂ C)ᵀ = W W_uᵀ,     Q[:, r] = P cᵀ + α₁ a₁ + α₂ a₂ = W βᵀ

(:func:`eas_kernels.ops.products_from_factors`). ``F`` depends on the weights only, so
:class:`MergeFactors` keeps ``Fᵀ`` (float32, ``out × (2r + 2)`` per target) for every
group of sites that merge alike (same rank, dtype, device and target shapes), and a merge
passes it with the state (:attr:`eas_kernels.ops.SiteMerge.factors` and ``mix``): the
native kernels form each block's rows of ``Q`` from the factors' rows, ``O(out · r)``
flops, and do the rank-r update alone, half the flops of a merge from ``W``, with no
per-prompt tensor operation besides gathering the states. ``F`` is built by the first
merge that finds new weights (the targets' and the PIAs' up projections, by identity,
version counter and storage): that merge costs about 2.3 times a later one (47 against
20 ms for 32 sites at d = 512 on a 2-core CPU), and a prompt merges with the same
arithmetic whichever prompt it is (the same logits, bitwise). ``F`` takes
``(2r + 2)·Σ out`` float32 per site: about 2 % of the targets' bytes for EAS-12 at
LLaMA-7B shapes in bf16 (87 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import _native
from .factors import factor_sources, weights_key
from .ops import lowrank_factors

if TYPE_CHECKING:
    from .runtime import AdapterSite


class MergeFactors:
    """``Fᵀ`` of each group of sites, kept while their weights stay."""

    def __init__(self) -> None:
        # group (ids of its sites) -> (weights key, Fᵀ of the group, per site per target)
        self._factors: dict[tuple, tuple[tuple | None, torch.Tensor, list[list[torch.Tensor]]]]
        self._factors = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the kept factors."""
        return sum(kept[1].nbytes for kept in self._factors.values())

    def clear(self) -> None:
        """Forget every factor (the skip set changed: other sites, other groups)."""
        self._factors.clear()

    def factors(self, group: Sequence[AdapterSite]) -> list[list[torch.Tensor]] | None:
        """Per site of ``group`` (one rank, dtype, device and target shapes), per target,
        ``Fᵀ`` ``(out, 2r + 2)`` contiguous float32 for the current weights (built now if
        they changed); None for a dtype the native merge does not take (it computes its
        own products)."""
        weight = group[0].targets[0].weight
        if weight.dtype not in _native.DTYPE_CODES:
            return None
        name = tuple(id(site) for site in group)
        key = weights_key([t for site in group for t in factor_sources(site.pia, site.targets)])
        kept = self._factors.get(name)
        if key is None or kept is None or kept[0] != key:
            factors_t = self._build(group)
            rows = [linear.weight.shape[0] for linear in group[0].targets]
            per_target = [list(factors_t[index].split(rows)) for index in range(len(group))]
            kept = self._factors[name] = (key, factors_t, per_target)
        return kept[2]

    @staticmethod
    @torch.no_grad()
    def _build(group: Sequence[AdapterSite]) -> torch.Tensor:
        """``Fᵀ`` of every site of ``group``: ``(S, Σ out, 2r + 2)`` float32, contiguous."""
        factors = torch.stack(
            [
                torch.cat(
                    [
                        lowrank_factors(linear.weight, site.pia.up_basis(), rounded=False)
                        for linear in site.targets
                    ],
                    dim=1,
                )
                for site in group
            ]
        )
        return factors.transpose(1, 2).contiguous()
