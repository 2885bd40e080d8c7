"""``cosine``: the one-pass prior — how little each MHA, FFN or block turns its input.

"What Matters in Transformers? Not All Attention is Needed" (He et al., 2024) ranks a
sublayer by the cosine similarity between its input ``x`` and its residual output
``x + f(x)``: near 1, the sublayer barely changes the residual stream and can go. One
:data:`~.estimator.COSINE` pass with nothing skipped (:func:`residual_cosines`) gives
every arm's mean cosine ``c_i``; importance is ``1 − c_i`` and the plan skips the ``k``
arms of highest cosine. One held-out pass in all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .estimator import COSINE, Estimator, Measurement, register_estimator

COLUMNS = ("mha", "ffn", "block")  # the columns of residual_cosines


@register_estimator
class CosinePrior(Estimator):
    """``cosine`` (module docstring)."""

    name = "cosine"
    summary = "one pass: cosine of each candidate's input and residual output"

    def __init__(self, num_arms: int, k: int, **kwargs: Any) -> None:
        super().__init__(num_arms, k, **kwargs)
        self.cosines: torch.Tensor | None = None

    def default_budget(self) -> int:
        return 1

    def min_budget(self) -> int:
        return 1

    def _propose(self, remaining: int) -> list[Measurement]:
        return [] if self.cosines is not None else [Measurement(COSINE)]

    def _observe(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        self.cosines = results[0]

    def training_arms(self) -> tuple[int, ...]:
        return self.random_arms(self.k) if self.cosines is None else self.plan()

    def importance(self) -> torch.Tensor:
        if self.cosines is None:
            return torch.zeros(self.num_arms, dtype=torch.float64)
        return 1.0 - self.cosines

    def _state(self) -> dict[str, Any]:
        return {"cosines": self.cosines}

    def _load(self, state: dict[str, Any]) -> None:
        cosines = state.get("cosines")
        self.cosines = None if cosines is None else self._scores_entry(state, "cosines")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    value = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if not isinstance(value, torch.Tensor):
        raise RuntimeError("a block was called without its hidden states as first argument")
    return value


def _output(value: object) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _mean_cosine(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    cosine = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, n)
    if real is not None and real.shape == cosine.shape:
        return cosine[real.to(cosine.device)].mean().double().cpu()
    return cosine.mean().double().cpu()


@torch.no_grad()
def residual_cosines(
    blocks: Sequence[nn.Module],
    attention: str,
    feed_forward: str,
    forward: Callable[[], object],
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``forward()`` once and return ``(len(blocks), 3)`` float64 mean cosines.

    For a pre-norm block ``h = x + MHA(x)``, ``y = h + FFN(h)`` (EAS_SPEC §2), the columns
    (:data:`COLUMNS`) are ``cos(x, h)`` (the MHA), ``cos(h, y)`` (the FFN) and
    ``cos(x, y)`` (the block), each per token and averaged over the tokens where ``real``
    (``(B, n)`` bool, e.g. the attention mask) is True (all tokens when None or of
    another shape). ``attention``/``feed_forward`` name the blocks' submodules. Hooks are
    removed on return, also on error.
    """
    table = torch.full((len(blocks), 3), float("nan"), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    mids: dict[int, torch.Tensor] = {}
    handles = []

    def on_block(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = _hidden(args, kwargs)

        return hook

    def on_attention(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = inputs[index]
            mids[index] = x + _output(output)
            table[index, 0] = _mean_cosine(x, mids[index], real)

        return hook

    def on_ffn(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x, h = inputs.pop(index), mids.pop(index)
            y = h + _output(output)
            table[index, 1] = _mean_cosine(h, y, real)
            table[index, 2] = _mean_cosine(x, y, real)

        return hook

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(on_block(index), with_kwargs=True))
            handles.append(getattr(block, attention).register_forward_hook(on_attention(index)))
            handles.append(getattr(block, feed_forward).register_forward_hook(on_ffn(index)))
        forward()
    finally:
        for handle in handles:
            handle.remove()
    if bool(torch.isnan(table).any()):
        missing = sorted({int(i) for i in torch.isnan(table).any(dim=1).nonzero().flatten()})
        raise RuntimeError(f"blocks {missing} did not run their MHA and FFN during the probe")
    return table
