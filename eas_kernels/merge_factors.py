"""The products a whole-model merge reads, from factors kept across prompts (EAS_SPEC §4).

A merge of a target ``W`` (``out × d``) with the frozen state ``(α₁, α₂, c)`` of its PIA
needs ``Q = [W W_uᵀ | W βᵀ]`` (``out × (r + 1)``), with ``W_u = α₁ W_u1ᵀ + α₂ W_u2ᵀ`` and
``β = c W_u + α₁ b_u1 + α₂ b_u2``. Both are combinations of the state-free factors of the
low-rank path, ``F = U Wᵀ = [A; C; a₁; a₂]`` (``(2r + 2) × out``, :func:`eas_kernels.ops.
lowrank_factors`, ``U`` = :meth:`eas_kernels.PIA.up_basis`)::

    Q = Fᵀ M,   M = [[α₁ I, α₁ cᵀ], [α₂ I, α₂ cᵀ], [0, α₁], [0, α₂]]   ((2r + 2) × (r + 1))

that is ``P = Q[:, :r] = (α₁ A + α₂ C)ᵀ = W W_uᵀ`` and ``Q[:, r] = P cᵀ + α₁ a₁ + α₂ a₂ =
W βᵀ``, which is how it is computed: two scaled adds and a matrix-vector product on ``Fᵀ``
(kept transposed, ``Σ out × (2r + 2)``, so that every target's rows of ``Q`` come out
contiguous).

``F`` depends on the weights only, so :class:`MergeProducts` keeps it (float32) for every
group of sites that merge alike (same rank, dtype, device and target shapes) and a
merge then computes ``Q`` in ``O(Σ out · r)`` flops per site instead of ``2·out·d·r`` per
target: the native merge reads ``Q``
(:attr:`eas_kernels.ops.SiteMerge.products`) and does the rank-r update alone, half the
flops. ``F`` is built by the first merge that finds new weights (the targets' and the
PIAs' up projections, by identity, version counter and storage): that merge costs about
2.3 times a later one (47 against 20 ms for 32 sites at d = 512 on a 2-core CPU), and a
prompt merges with the same arithmetic whichever prompt it is (the same logits, bitwise).
``F`` takes ``(2r + 2)·Σ out`` float32 per site: about 2 % of the targets' bytes for EAS-12
at LLaMA-7B shapes in bf16 (87 MB).
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


def products_of(factors_t: torch.Tensor, alpha: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``Q = Fᵀ M`` ``(S, Σ out, r + 1)`` from ``Fᵀ`` ``(S, Σ out, 2r + 2)`` and the states
    ``alpha`` ``(S, 2)``, ``c`` ``(S, r)`` (one example per site), all float32:
    ``Q[..., :r] = α₁ Aᵀ + α₂ Cᵀ`` and ``Q[..., r] = Q[..., :r] cᵀ + α₁ a₁ + α₂ a₂``."""
    sites, total, width = factors_t.shape
    rank = (width - 2) // 2
    q = factors_t.new_empty(sites, total, rank + 1)
    p = q[..., :rank]
    a1, a2 = alpha[:, 0, None, None], alpha[:, 1, None, None]
    torch.mul(factors_t[..., :rank], a1, out=p)
    p.addcmul_(factors_t[..., rank : 2 * rank], a2)
    bias = torch.bmm(p, c.unsqueeze(-1))  # (S, Σ out, 1)
    bias.addcmul_(factors_t[..., 2 * rank : 2 * rank + 1], a1)
    bias.addcmul_(factors_t[..., 2 * rank + 1 :], a2)
    q[..., rank:] = bias
    return q


class MergeProducts:
    """``F`` of each group of sites, kept while their weights stay, and ``Q`` from it."""

    def __init__(self) -> None:
        self._factors: dict[tuple, tuple[tuple | None, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the kept factors."""
        return sum(factors.nbytes for _, factors in self._factors.values())

    def clear(self) -> None:
        """Forget every factor (the skip set changed: other sites, other groups)."""
        self._factors.clear()

    def products(
        self, group: Sequence[AdapterSite], alpha: torch.Tensor, c: torch.Tensor
    ) -> list[list[torch.Tensor]] | None:
        """Per site of ``group`` (one rank, dtype, device and target shapes), per
        target, ``Q`` ``(out, r + 1)`` contiguous float32 for the states ``alpha``
        ``(S, 2)`` and ``c`` ``(S, r)``; None for a dtype the native merge does not take
        (it computes its own)."""
        weight = group[0].targets[0].weight
        if weight.dtype not in _native.DTYPE_CODES:
            return None
        name = tuple(id(site) for site in group)
        key = weights_key([t for site in group for t in factor_sources(site.pia, site.targets)])
        kept = self._factors.get(name)
        if key is None or kept is None or kept[0] != key:
            kept = self._factors[name] = (key, self._build(group))
        q = products_of(kept[1], alpha.float(), c.float())
        result, rows = [], [linear.weight.shape[0] for linear in group[0].targets]
        for index in range(len(group)):
            result.append(list(q[index].split(rows)))
        return result

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
