"""Per-example routing (RoE, ROE_SPEC.md): each example skips its own units.

* :mod:`.plan`     — :class:`RoutePlan`: routed layers, unit (``mha`` / ``block``), ``ρ``;
* :mod:`.control`  — :class:`RouteControl`: the mode (hard / soft / random), ``τ``, keep
  bias and the records of the last call (``ρ̂``, routes), shared by a model's routed layers;
* :mod:`.forward`  — :class:`RoutedForward`: one routed block (gather, compute, scatter;
  frozen routes; the batch-1 merge of a skipped MHA's PIA, its low-rank path at batch > 1);
* :mod:`.patch`    — :func:`patch_routes` / :func:`unpatch_routes` and the switches;
* :mod:`.hf`       — Hugging Face decoder layers: the routed forward, a cache slot per
  layer holding the examples that keep it, ``generate()`` (beam search, sampling);
* :mod:`.hf_trainer` — :class:`~.hf_trainer.RouteTrainer` (``transformers.Trainer``;
  imported from its module, as it needs ``transformers``);
* :mod:`.schedule` — :class:`RouteSchedule` (RoE's three stages) and :func:`route_loss`;
* :mod:`.checkpoint` — :func:`save_routes` / :func:`load_routes` (plan + weights).
"""

from .checkpoint import load_routes, save_routes
from .control import BATCH_RULES, ROUTING_MODES, RouteControl
from .forward import LayerRoute, RoutedForward
from .patch import (
    force_routes,
    patch_routes,
    route_control,
    routes_of,
    set_routing,
    unpatch_routes,
)
from .plan import UNITS, RoutePlan
from .schedule import RouteSchedule, RouteStage, route_loss

__all__ = [
    "BATCH_RULES",
    "ROUTING_MODES",
    "UNITS",
    "LayerRoute",
    "RouteControl",
    "RoutePlan",
    "RouteSchedule",
    "RouteStage",
    "RoutedForward",
    "force_routes",
    "load_routes",
    "patch_routes",
    "route_control",
    "route_loss",
    "routes_of",
    "save_routes",
    "set_routing",
    "unpatch_routes",
]
