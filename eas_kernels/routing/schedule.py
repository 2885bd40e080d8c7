"""RoE's training schedule and its sparsity-regularised loss (ROE_SPEC §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_positive_finite, check_positive_int
from .patch import routes_of


@dataclass(frozen=True)
class RouteStage:
    """What one training step does: the routing mode, its temperature and keep bias, and
    which parameters train."""

    name: str  # "random", "routers" or "joint" (RouteTuner adds "pretune")
    mode: str  # RouteControl.mode
    temperature: float
    keep_bias: float
    train_routers: bool
    train_shortcuts: bool
    skip_probability: float | None = None  # stage 1: the share of ρ random routes skip

    def apply(self, model: nn.Module) -> None:
        """Set ``model``'s routing mode, and which of its routers and adapters train."""
        patch = routes_of(model)
        patch.control.set_mode(self.mode, temperature=self.temperature, keep_bias=self.keep_bias)
        if self.skip_probability is not None:
            patch.control.random_ratio = self.skip_probability * patch.plan.ratio
        for router in patch.routers():
            router.weight.requires_grad_(self.train_routers)
        for pia in patch.shortcuts():
            pia.requires_grad_(self.train_shortcuts)


class RouteSchedule:
    """The three stages of RoE's training over ``total_steps`` steps (fractions of them):

    1. ``[0, random_until)``: random hard routes (each unit skipped with probability ``ρ``);
       the shortcuts train, the routers do not.
    2. ``[random_until, routers_until)``: soft routes; only the routers train. ``τ`` starts
       at ``initial_temperature`` and the keep bias at ``initial_keep_bias``; every ``tick``
       of training ``τ`` is multiplied by ``decay`` and the bias by ``bias_decay``.
    3. ``[routers_until, 1]``: the bias is 0, ``τ`` keeps decaying; routers and shortcuts
       train (the base model stays frozen).

    RoE's defaults (0.3, 0.5, τ₀ = 10, ×0.95 and ×0.85 every 0.5 %: τ ends near 0.01).
    ``initial_keep_bias`` is ours (RoE's release does not state it): 5, so that a unit is
    kept with weight ``sigmoid(5 / 10) ≈ 0.62`` when the routers start. ``random_ramp``
    (ours; RoE skips with probability ρ from the first step) raises stage 1's skip
    probability linearly from ``ρ / n`` to ``ρ`` over its ``n`` steps, as EAS's warm-up
    ramp does (:class:`~eas_kernels.tuning.TuningConfig`).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        random_until: float = 0.3,
        routers_until: float = 0.5,
        initial_temperature: float = 10.0,
        decay: float = 0.95,
        initial_keep_bias: float = 5.0,
        bias_decay: float = 0.85,
        tick: float = 0.005,
        random_ramp: bool = False,
    ) -> None:
        self.total_steps = check_positive_int(total_steps, "total_steps")
        for name, value in (("random_until", random_until), ("routers_until", routers_until)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
        if not 0.0 <= random_until <= routers_until <= 1.0:
            raise ValueError(
                "need 0 <= random_until <= routers_until <= 1, got "
                f"random_until={random_until}, routers_until={routers_until}"
            )
        self.random_until, self.routers_until = float(random_until), float(routers_until)
        self.initial_temperature = check_positive_finite(initial_temperature, "initial_temperature")
        self.initial_keep_bias = float(initial_keep_bias)
        if not math.isfinite(self.initial_keep_bias):
            raise ValueError(f"initial_keep_bias must be finite, got {initial_keep_bias!r}")
        for name, value in (("decay", decay), ("bias_decay", bias_decay)):
            check_positive_finite(value, name)
            if value > 1:
                raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
        self.decay, self.bias_decay = float(decay), float(bias_decay)
        self.tick = check_positive_finite(tick, "tick")
        if not isinstance(random_ramp, bool):
            raise TypeError(f"random_ramp must be a bool, got {random_ramp!r}")
        self.random_ramp = random_ramp

    def stage(self, step: int) -> RouteStage:
        """The stage of step ``step`` (0-based, in ``[0, total_steps)``)."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.total_steps:
            raise ValueError(f"step must be an int in [0, {self.total_steps}), got {step!r}")
        progress = step / self.total_steps
        if progress < self.random_until:
            share = 1.0
            if self.random_ramp:
                steps = math.ceil(self.random_until * self.total_steps)
                share = (step + 1) / steps
            return RouteStage("random", "random", self.initial_temperature, 0.0, False, True, share)
        ticks = math.floor((progress - self.random_until) / self.tick + 1e-9)
        temperature = self.initial_temperature * self.decay**ticks
        if progress < self.routers_until:
            bias = self.initial_keep_bias * self.bias_decay**ticks
            return RouteStage("routers", "soft", temperature, bias, True, False)
        return RouteStage("joint", "soft", temperature, 0.0, True, True)

    def apply(self, model: nn.Module, step: int) -> RouteStage:
        """Set ``model``'s routing mode and which of its routers and shortcuts train, for
        step ``step``; returns the stage."""
        stage = self.stage(step)
        stage.apply(model)
        return stage


def route_loss(ce: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """RoE's objective of the last forward of a routed ``model`` (ROE_SPEC §4):
    ``L = CE + exp(−5·CE).detach() · max(0, ρ − ρ̂)``, with ``ρ̂`` the mean of ``w_skip``
    over the routed layers and the batch. Returns ``(L, ρ̂)``."""
    if not isinstance(ce, torch.Tensor) or ce.dim() != 0 or not ce.is_floating_point():
        raise TypeError("ce must be a scalar floating tensor (the batch's cross-entropy)")
    control = routes_of(model).control
    realized = control.realized_ratio()
    penalty = torch.relu(control.plan.ratio - realized)
    return ce + torch.exp(-5.0 * ce.detach()) * penalty.to(ce.dtype), realized.detach()
