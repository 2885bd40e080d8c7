"""Merge a frozen PIA into the linear layer that reads ``u + PIA(u)`` (EAS_SPEC §4).

For a linear layer ``y = z Wᵀ + b`` (``W``: ``out × d``) fed ``z = u + PIA(u)`` with the
example's frozen state, ``z = u (I + W_d1ᵀ W_u) + β`` and so

    W' = W + (W W_uᵀ) W_d1          rank-r update, O(out · d · r) — never the d × d matrix
    b' = b + W βᵀ                   from the *pristine* W (the public code's bug used W')

``W_u`` (``r × d``) and ``β`` (``d``) come from :meth:`eas_kernels.PIA.mixed_up_projection`.
"""

from __future__ import annotations

import torch


def merged_linear(
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
