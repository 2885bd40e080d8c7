"""The model side of a search: measuring what an estimator asks for, on one batch.

:class:`HeldOutScorer` answers :class:`~.estimator.Measurement` requests on a model
patched with ``search=<candidates>``: a :data:`~.estimator.LOSS` request sets the skip set
and returns ``loss_fn(model, batch)``; an :data:`~.estimator.EXAMPLES` request returns
``loss_fn(model, batch, per_example=True)``, a ``(2, B)`` tensor of each example's summed
loss terms and their counts (:func:`~eas_kernels.tuning.answer_loss` gives both); a
:data:`~.estimator.COSINE` request skips nothing
and returns every arm's input/output cosine (:func:`~.prior.residual_cosines`). Both run
in eval mode without gradients, one forward over the batch each, and leave the model in
eval mode with the last skip set. :func:`run_search` drives an estimator to its end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import takes_keyword
from ..patch import patch_of
from .candidates import Candidates
from .estimator import COSINE, EXAMPLES, Estimator, Measurement
from .prior import residual_cosines


class HeldOutScorer:
    """Measurements on ``batch`` (anything ``loss_fn`` takes; its ``attention_mask``, when
    it has one of shape ``(B, n)``, selects the tokens the cosines average over)."""

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        candidates: Candidates,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    ) -> None:
        self.model = model
        self.patch = patch_of(model)
        if self.patch.plan.num_layers != candidates.num_layers:
            raise ValueError(
                f"candidates are for {candidates.num_layers} layers, the model has "
                f"{self.patch.plan.num_layers}"
            )
        self.batch = batch
        self.candidates = candidates
        self.loss_fn = loss_fn

    def set_arms(self, arms: tuple[int, ...]) -> None:
        """Skip exactly ``arms`` (the candidates' MHAs / FFNs / blocks)."""
        mhas, ffns = self.candidates.skip_sets(arms)
        self.patch.set_skipped(mhas, ffns)

    @torch.no_grad()
    def loss(self, arms: tuple[int, ...]) -> float:
        """``loss_fn`` with ``arms`` skipped."""
        self.model.eval()
        self.set_arms(arms)
        return float(self.loss_fn(self.model, self.batch).item())

    @torch.no_grad()
    def examples(self, arms: tuple[int, ...]) -> torch.Tensor:
        """``(2, B)`` float64: ``loss_fn``'s summed loss terms and their counts per
        example, with ``arms`` skipped."""
        if not takes_keyword(self.loss_fn, "per_example"):
            raise TypeError(
                "an estimator that measures per example (e.g. 'stable') needs a loss_fn "
                "that takes per_example=True and returns a (2, B) tensor of summed losses "
                "and counts, as eas_kernels.tuning.answer_loss does"
            )
        self.model.eval()
        self.set_arms(arms)
        result = self.loss_fn(self.model, self.batch, per_example=True)
        if not isinstance(result, torch.Tensor) or tuple(result.shape) != (2, len(self)):
            raise ValueError(
                f"loss_fn(..., per_example=True) must return a tensor of shape (2, "
                f"{len(self)}), got {getattr(result, 'shape', type(result).__name__)}"
            )
        return result.detach().to("cpu", torch.float64)

    def __len__(self) -> int:
        """Examples of the batch."""
        return len(self.batch)

    @torch.no_grad()
    def cosines(self) -> torch.Tensor:
        """``(num_arms,)`` float64 input/output cosines, nothing skipped."""
        self.model.eval()
        self.set_arms(())
        table = residual_cosines(
            self.patch.blocks,
            self.patch.layout.attention,
            self.patch.layout.feed_forward,
            lambda: self.loss_fn(self.model, self.batch),
            getattr(self.batch, "attention_mask", None),
        )
        return self.candidates.arm_cosines(table)

    def __call__(self, measurement: Measurement) -> float | torch.Tensor:
        if measurement.kind == COSINE:
            return self.cosines()
        if measurement.kind == EXAMPLES:
            return self.examples(measurement.arms)
        return self.loss(measurement.arms)


def run_search(estimator: Estimator, scorer: HeldOutScorer) -> tuple[int, ...]:
    """Ask, measure and tell until ``estimator`` is finished; its plan."""
    while round := estimator.ask():
        estimator.tell(round, [scorer(measurement) for measurement in round])
    return estimator.plan()
