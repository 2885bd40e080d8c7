"""Public control of the re-parameterisation of frozen PIA states (EAS_SPEC §4)."""

from __future__ import annotations

from torch import nn

from .patch import runtime_of


def reparameterize(model: nn.Module, mode: str = "auto") -> nn.Module:
    """Choose how decode steps apply the frozen PIAs of a patched ``model``; return it.

    Modes:
        ``"eager"``: compute ``u + PIA(u; S)`` every step from the frozen state ``S``.
        ``"merge"``: after the prefill, write each PIA into the weights that read it —
            ``W1``/``W3`` of skipped layers, ``wq``/``wk``/``wv`` of kept layers — with the
            rank-r update ``W' = W + (W W_uᵀ) W_d1``, ``b' = b + W βᵀ``; batch size 1.
        ``"lowrank"``: no weight change; each target adds ``(u W_d1ᵀ) M_e + g_e`` per
            example (any batch size), as ``κ F`` with factors ``F`` shared by the batch.
        ``"auto"``: ``merge`` for batch 1, ``lowrank`` otherwise.

    Takes effect at once when the model holds frozen states (after a prefill), else at
    the first decode step after the next prefill. Merged weights go back bitwise at the
    next training forward or prefill, or on :func:`restore`. A merge that would put NaN
    or Inf into a weight raises ``ValueError`` and changes nothing.
    """
    runtime_of(model).set_mode(mode)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Put every merged weight of ``model`` back, bitwise, and drop low-rank hooks.

    The mode stays: a later decode step re-applies it to the still-frozen states.
    """
    runtime_of(model).unrealize()
    return model
