"""The per-example low-rank path: a frozen PIA applied without changing weights (EAS_SPEC §4).

For example ``e`` with mixed up projection ``W_u^{(e)}`` (``r × d``) and ``β^{(e)}``, the
linear layer reading ``z = u + PIA(u)`` computes

    z Wᵀ + b = (u Wᵀ + b) + (u W_d1ᵀ) M_e + g_e,   M_e = W_u^{(e)} Wᵀ (r × out),  g_e = β^{(e)} Wᵀ

``M_e`` and ``g_e`` are built once per example after the prefill
(:func:`lowrank_factors`); each decoded token then costs ``d·r + r·out`` extra
multiply-adds (:func:`add_lowrank`), and any batch of examples with distinct states works.
"""

from __future__ import annotations

import torch


def lowrank_factors(
    weight: torch.Tensor, up_mix: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, g)``: ``M = W_u Wᵀ`` ``(B, r, out)`` and ``g = β Wᵀ`` ``(B, out)``.

    ``weight`` ``(out, d)``; ``up_mix`` ``(B, r, d)``; ``beta`` ``(B, d)``. Same dtype as
    ``weight``.
    """
    return torch.matmul(up_mix, weight.t()), beta @ weight.t()


def add_lowrank(
    output: torch.Tensor, projected: torch.Tensor, factor: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """``output + projected @ M + g`` per example.

    ``output`` ``(B, n, out)`` is ``u Wᵀ + b``; ``projected`` ``(B, n, r)`` is ``u W_d1ᵀ``;
    ``factor`` ``M`` ``(B, r, out)``; ``offset`` ``g`` ``(B, out)``.
    """
    return torch.baddbmm(output + offset.unsqueeze(1), projected, factor)
