"""Save and load what routing trains: the route plan (JSON) and the routers' and adapters'
weights (safetensors), keys ``layers.{i}.router.*``, ``layers.{i}.route_pia.*``,
``layers.{i}.kept_adapter.*`` (a few MB; the base model is not written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_document, read_weights
from ..files import check_tensors
from .patch import ADAPTER_NAME, ROUTER_NAME, SHORTCUT_NAME, RoutePatch, patch_routes, routes_of
from .patch import unpatch_routes as _unpatch
from .plan import RoutePlan

PLAN_FILE = "route_plan.json"
WEIGHTS_FILE = "route_weights.safetensors"
_FORMAT = "eas_kernels.routes"
_VERSION = 1


def _route_tensors(patch: RoutePatch) -> dict[str, torch.Tensor]:
    """``layers.{i}.{attribute}.{key}`` → tensor of every router and adapter."""
    tensors = {}
    for forward in patch.forwards:
        modules = {ROUTER_NAME: forward.router, SHORTCUT_NAME: forward.pia}
        modules[ADAPTER_NAME] = forward.adapter
        for name, module in modules.items():
            if module is not None:
                for key, value in module.state_dict().items():
                    tensors[f"layers.{forward.layer}.{name}.{key}"] = value
    return tensors


def save_routes(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the route plan and the routing weights of a routed ``model`` into folder
    ``path`` (created); returns it."""
    from safetensors.torch import save_file

    patch = routes_of(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    document = {"format": _FORMAT, "version": _VERSION, "plan": patch.plan.to_dict()}
    (folder / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tensors = {k: v.detach().contiguous().cpu() for k, v in _route_tensors(patch).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": _FORMAT})
    return folder


def _read(folder: Path) -> tuple[RoutePlan, dict[str, torch.Tensor]]:
    document = read_document(
        folder, PLAN_FILE, WEIGHTS_FILE, _FORMAT, (_VERSION,), "a routing checkpoint"
    )
    try:
        plan = RoutePlan.from_dict(document.get("plan"))
    except (ValueError, TypeError) as error:
        raise type(error)(f"{folder / PLAN_FILE}: {error}") from None
    return plan, read_weights(folder / WEIGHTS_FILE)


def load_routes(base_model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Route ``base_model`` (:func:`~eas_kernels.routing.patch_routes`) with the plan saved
    in ``path`` and load its weights. A checkpoint whose plan, keys, shapes or values
    (NaN/Inf) do not fit raises ``ValueError`` (missing files ``FileNotFoundError``) and
    leaves ``base_model`` unrouted and unchanged."""
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
    plan, tensors = _read(Path(path))
    patch_routes(base_model, plan)
    try:
        targets = _route_tensors(routes_of(base_model))
        check_tensors(tensors, targets, "checkpoint does not fit the model's routes")
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(tensors[key])
    except BaseException:
        _unpatch(base_model)
        raise
    return base_model
