"""Public control of the re-parameterisation of frozen PIA states (EAS_SPEC §4)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
        ``"auto"``: per prompt, the cheapest of the three for the expected answer
            length (:mod:`eas_kernels.auto`: costs measured once on this machine); when
            the length is unknown, ``merge`` for batch 1 and ``lowrank`` otherwise.

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


@contextlib.contextmanager
def expected_new_tokens(model: nn.Module, count: int | None) -> Iterator[nn.Module]:
    """Tell ``auto`` (:func:`reparameterize`) how many tokens the prompts prefilled in the
    body will generate: ``count - 1`` decode steps follow each prefill. ``None``: unknown.

    :func:`eas_kernels.greedy_generate` and ``generate()`` of a
    :func:`~eas_kernels.patch_hf` model do this themselves; use it around a decode loop of
    your own. The previous value is back on exit.
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be an int >= 1 or None, got {count!r}")
    runtime = runtime_of(model)
    previous = runtime.decode_steps
    runtime.decode_steps = None if count is None else count - 1
    try:
        yield model
    finally:
        runtime.decode_steps = previous
