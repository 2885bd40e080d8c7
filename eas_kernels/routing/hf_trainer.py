"""RoE's training with Hugging Face ``Trainer``: :class:`RouteTrainer` (needs the ``hf``
extra; import it from this module)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .hf import checkpointing_refusal
from .patch import routes_of
from .schedule import RouteSchedule, RouteStage, route_loss


class RouteTrainer(Trainer):
    """``transformers.Trainer`` for a model routed by :func:`~eas_kernels.routing.
    patch_routes` (ROE_SPEC §4).

    * Every optimisation step first applies its stage of ``route_schedule``
      (:class:`RouteSchedule`: random hard routes, then soft routes with annealed ``τ`` and
      keep bias, routers only, then routers and shortcuts). ``None`` builds RoE's default
      schedule over the run's ``max_steps`` when training starts. A stage freezes what it
      does not train by ``requires_grad``: the optimizer holds every router and adapter
      (created while all of them train), and a parameter without a gradient is not stepped.
    * The loss is :func:`route_loss`, ``CE + exp(−5·CE)·max(0, ρ − ρ̂)``, with ``CE`` the
      model's own loss of the batch: batches need ``labels`` (whose unlabelled first tokens
      are the prompt the routes read; :func:`~eas_kernels.hf.prompt_mask_from_labels`).
      ``CE`` is each batch's mean, so gradient accumulation averages the batches' losses.
    * Logs carry ``realized_ratio`` (``ρ̂``, the mean over the steps since the last log) and
      ``route_temperature``; :attr:`route_stage` is the stage of the last step.

    Other arguments are ``Trainer``'s. ``TypeError`` when the model is not routed.
    """

    def __init__(
        self, *args: Any, route_schedule: RouteSchedule | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        routes_of(self.model)
        refusal = checkpointing_refusal()
        if self.args.gradient_checkpointing and refusal is not None:
            raise ValueError(refusal)
        if route_schedule is not None and not isinstance(route_schedule, RouteSchedule):
            raise TypeError(
                "route_schedule must be an eas_kernels.routing.RouteSchedule or None, got "
                f"{type(route_schedule).__name__}"
            )
        self.route_schedule = route_schedule
        self.route_stage: RouteStage | None = None
        self._ratios: list[float] = []
        # the loss is a batch mean: Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any):
        if self.route_schedule is None:
            self.route_schedule = RouteSchedule(self.state.max_steps)
        step = min(self.state.global_step, self.route_schedule.total_steps - 1)
        self.route_stage = self.route_schedule.apply(self.model, step)
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        if "labels" not in inputs:
            raise ValueError(
                "RouteTrainer needs batches with labels: the loss is the model's "
                "cross-entropy plus RoE's sparsity term"
            )
        outputs = model(**inputs)
        loss, realized = route_loss(outputs.loss, self.model)
        if model.training:
            self._ratios.append(float(realized))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._ratios and "loss" in logs:
            logs["realized_ratio"] = sum(self._ratios) / len(self._ratios)
            self._ratios.clear()
        if self.route_stage is not None and "loss" in logs:
            logs["route_temperature"] = self.route_stage.temperature
        super().log(logs, *args, **kwargs)
