"""RouteControl: what the routed layers of one model share (mode, annealing, records)."""

from __future__ import annotations

import torch

from .._checks import check_positive_finite, check_tensor
from .plan import RoutePlan

ROUTING_MODES = ("hard", "soft", "random")
BATCH_RULES = ("per_example", "any_keeps")


class RouteControl:
    """The routing state of one routed model, shared by its routed layers.

    Attributes:
        plan: the :class:`RoutePlan` the model was patched with.
        mode: how a fresh call (training forward, prefill) routes (ROE_SPEC §4, §5):
            ``"hard"`` — keep a unit iff its keep logit beats its skip logit (inference;
            the default); ``"soft"`` — mix both branches with ``softmax((g + [b, 0]) / τ)``
            (training stages 2 and 3; refused at a prefill); ``"random"`` — skip each unit
            of each example with probability ``ρ`` (training stage 1).
        temperature: the route temperature ``τ`` of ``"soft"``.
        keep_bias: the bias ``b`` added to the keep logit in ``"soft"``.
        batch_rule: how a batch runs a unit under hard routes: ``"per_example"`` (each
            example takes its own branch: gather, compute, scatter; the default) or
            ``"any_keeps"`` (RoE's released inference: the unit runs for the whole batch when
            any example keeps it — every example then gets the kept branch; kept for
            comparisons).
        merge: at batch 1, re-parameterise the skipped MHAs' PIAs into ``W1/W3`` for the
            decode (EAS_SPEC §4; unit ``mha`` only); False decodes eagerly.
        lowrank: in decode calls that do not merge (batch > 1), add each skipped MHA's
            ``PIA_s`` to ``W1/W3``'s output by the per-example low-rank path (EAS_SPEC §4;
            :meth:`RoutedForward._lowrank_path`); False runs ``PIA_s`` eagerly.
        state_mask: the prompt mask of the next fresh call (the root hook sets it).
        generator: the source of ``"random"`` routes.
        random_ratio: the skip probability of ``"random"`` routes (default ``ρ``;
            :class:`~eas_kernels.routing.RouteSchedule` ramps it up with ``random_ramp``).
        skip_weights: per routed layer, ``w_skip`` ``(B,)`` of its last fresh call
            (a 0/1 float under hard routes; with gradients under ``"soft"``).
        forced: ``(B, len(plan.layers))`` bool routes (True = skip) that every fresh call
            uses instead of the routers', or None (:func:`~eas_kernels.routing.force_routes`).
    """

    def __init__(self, plan: RoutePlan) -> None:
        self.plan = plan
        self.mode = "hard"
        self.temperature = 1.0
        self.keep_bias = 0.0
        self.merge = True
        self.lowrank = True
        self.batch_rule = "per_example"
        self.state_mask: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.random_ratio = plan.ratio
        self.skip_weights: dict[int, torch.Tensor] = {}
        self.forced: torch.Tensor | None = None

    def set_mode(self, mode: str, *, temperature: float = 1.0, keep_bias: float = 0.0) -> None:
        """Route the next fresh calls by ``mode`` (one of :data:`ROUTING_MODES`)."""
        if not isinstance(mode, str) or mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
        self.temperature = check_positive_finite(temperature, "temperature")
        if isinstance(keep_bias, bool) or not isinstance(keep_bias, (int, float)):
            raise TypeError(f"keep_bias must be a float, got {type(keep_bias).__name__}")
        if not torch.isfinite(torch.tensor(float(keep_bias))):
            raise ValueError(f"keep_bias must be finite, got {keep_bias!r}")
        self.mode, self.keep_bias = mode, float(keep_bias)

    def set_batch_rule(self, rule: str) -> None:
        """Use ``rule`` (one of :data:`BATCH_RULES`) from the next call on."""
        if not isinstance(rule, str) or rule not in BATCH_RULES:
            raise ValueError(f"batch_rule must be one of {BATCH_RULES}, got {rule!r}")
        self.batch_rule = rule

    def force(self, routes: torch.Tensor | None) -> None:
        """Use ``routes`` (``(B, len(plan.layers))`` bool, True = skip) at every fresh call
        until called with None."""
        if routes is not None:
            check_tensor(routes, "routes", ndim=2, dtype=torch.bool)
            if routes.shape[1] != len(self.plan.layers):
                raise ValueError(
                    f"routes must have one column per routed layer ({len(self.plan.layers)}), "
                    f"got shape {tuple(routes.shape)}"
                )
        self.forced = routes

    def forced_route(self, column: int, batch: int, device: torch.device) -> torch.Tensor | None:
        """The forced route of the routed layer in ``column``, ``(B,)``, or None."""
        if self.forced is None:
            return None
        if self.forced.shape[0] != batch:
            raise ValueError(
                f"forced routes are for {self.forced.shape[0]} examples but the call has {batch}"
            )
        return self.forced[:, column].to(device)

    def random_route(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(B,)`` bool: each example skips with probability ``random_ratio`` (training
        stage 1)."""
        draws = torch.rand(batch, generator=self.generator)
        return (draws < self.random_ratio).to(device)

    def realized_ratio(self) -> torch.Tensor:
        """``ρ̂``: the mean of ``w_skip`` over the routed layers and the examples of the last
        fresh call (with gradients under ``"soft"``); ValueError before any fresh call."""
        if len(self.skip_weights) != len(self.plan.layers):
            raise ValueError("no fresh call has routed every routed layer yet")
        return torch.stack(
            [weights.float().mean() for weights in self.skip_weights.values()]
        ).mean()

    def routes(self) -> torch.Tensor:
        """``(B, len(plan.layers))`` bool: which units each example of the last fresh call
        skipped (hard, random or forced routes; ``w_skip > 0.5`` under ``"soft"``)."""
        if len(self.skip_weights) != len(self.plan.layers):
            raise ValueError("no fresh call has routed every routed layer yet")
        return torch.stack(
            [self.skip_weights[layer].detach() > 0.5 for layer in self.plan.layers], dim=1
        )
