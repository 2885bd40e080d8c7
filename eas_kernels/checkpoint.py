"""Save and load only what EAS trains: the plan (JSON) and the PIA weights (safetensors).

A checkpoint folder holds ``eas_plan.json`` (the :class:`~eas_kernels.SkipPlan` of the
current skip sets, plus the search candidate set the PIAs were installed for, if any) and
``eas_pia.safetensors`` with keys ``layers.{i}.{pia}.*``, ``pia`` the PIA attribute of the
role (:attr:`Role.pia_name <eas_kernels.roles.Role.pia_name>`: ``attn_adapter``,
``skip_pia``, ``ffn_skip_pia``, ``block_adapter``) — indexed by block,
so a checkpoint moves between the LaVIN and the Hugging Face layouts of the same model.
A few MB instead of the base model's GB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .files import check_tensors
from .layout import HF_LLAMA, LAVIN
from .patch import EASPatch, check_search, patch_lavin, patch_of, unpatch
from .plan import SkipPlan, parse_json

PLAN_FILE = "eas_plan.json"
WEIGHTS_FILE = "eas_pia.safetensors"
_FORMAT = "eas_kernels.checkpoint"
_VERSION = 2  # v1 wrote "search" as a bool


def _pia_tensors(patch: EASPatch, active_only: bool = False) -> dict[str, torch.Tensor]:
    """``layers.{i}.{pia name}.{key}`` → tensor for every PIA (active ones only on request)."""
    tensors = {}
    for site in patch.runtime.sites:
        if site.active or not active_only:
            for key, value in site.pia.state_dict().items():
                tensors[f"layers.{site.layer}.{site.role.pia_name}.{key}"] = value
    return tensors


def save_pretrained(
    model: nn.Module, path: str | os.PathLike[str], *, active_only: bool = False
) -> Path:
    """Write the plan and the PIA weights of a patched ``model`` into folder ``path``.

    ``active_only=True`` keeps only the PIAs of the current skip sets (after a search: what
    deployment needs); :func:`from_pretrained` then patches without ``search``.
    """
    from safetensors.torch import save_file

    patch = patch_of(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "format": _FORMAT,
        "version": _VERSION,
        "search": None if active_only else patch.search,
        "plan": patch.current_plan().to_dict(),
    }
    (folder / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    pias = _pia_tensors(patch, active_only)
    tensors = {k: v.detach().contiguous().cpu() for k, v in pias.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": _FORMAT})
    return folder


def read_document(
    folder: Path, plan_file: str, weights_file: str, fmt: str, versions: tuple, kind: str
) -> dict:
    """The JSON document ``folder/plan_file`` of a checkpoint folder of format ``fmt`` (a
    ``version`` in ``versions``), both files present; ``FileNotFoundError`` /
    ``ValueError`` naming the file and ``kind`` ("an eas_kernels checkpoint") otherwise."""
    for name in (plan_file, weights_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not {kind}: no {name}")
    try:
        text = (folder / plan_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{folder / plan_file} is not valid JSON: {error}") from None
    document = parse_json(text, str(folder / plan_file))
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise ValueError(f"{folder / plan_file} is not {kind} plan")
    if document.get("version") not in versions:
        raise ValueError(f"{folder / plan_file}: unsupported version {document.get('version')!r}")
    return document


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file; ``ValueError`` when it is corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is corrupt: {error}") from error


def _read(folder: Path) -> tuple[SkipPlan, str | None, dict[str, torch.Tensor]]:
    document = read_document(
        folder, PLAN_FILE, WEIGHTS_FILE, _FORMAT, (1, _VERSION), "an eas_kernels checkpoint"
    )
    search = document.get("search")
    try:
        search = check_search(False if search is None else search)
    except ValueError as error:
        raise ValueError(f"{folder / PLAN_FILE}: bad 'search' field: {error}") from None
    try:
        plan = SkipPlan.from_dict(document.get("plan"))
    except (ValueError, TypeError) as error:
        raise type(error)(f"{folder / PLAN_FILE}: {error}") from None
    return plan, search, read_weights(folder / WEIGHTS_FILE)


def from_pretrained(base_model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Patch ``base_model`` with the plan saved in ``path`` and load its PIA weights.

    Uses :func:`eas_kernels.patch_hf` for Hugging Face LLaMA-family models and
    :func:`eas_kernels.patch_lavin` for LaVIN-style ones. A checkpoint whose plan, keys,
    shapes or values (NaN/Inf) do not fit the model raises ``ValueError`` (missing files
    ``FileNotFoundError``) and leaves ``base_model`` unpatched and unchanged.
    """
    from .hf import patch_hf

    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
    plan, search, tensors = _read(Path(path))
    if HF_LLAMA.find_blocks(base_model):
        patch_hf(base_model, plan, search=search or False)
    elif LAVIN.find_blocks(base_model):
        patch_lavin(base_model, plan, search=search or False)
    else:
        raise ValueError("base_model has neither Hugging Face LLaMA nor LaVIN-style blocks")
    try:
        _load_pias(patch_of(base_model), tensors)
    except BaseException:
        unpatch(base_model)
        raise
    return base_model


def _load_pias(patch: EASPatch, tensors: dict[str, torch.Tensor]) -> None:
    targets = _pia_tensors(patch)
    check_tensors(tensors, targets, "checkpoint does not fit the model's PIAs")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
