"""Reading the ``.pt`` files of a run folder, which are not trusted.

Run folders and checkpoints travel between people, so a file a run reads may have been
written by anyone. Every ``.pt`` file is read with ``torch.load(weights_only=True)``: its
pickle may hold tensors and plain containers (dict, list, tuple, str, numbers, None) and
nothing else, so loading it cannot run code. Whatever cannot be read that way — a
truncated file, a foreign one, one whose pickle would call a function — is refused with a
``ValueError`` naming the file, before anything is changed.

Files a run writes are written atomically (:func:`save_atomically`): a run killed while
writing leaves the previous file or none, never a truncated one that a resume would read.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_tensor_file(
    path: str | os.PathLike[str], what: str, keys: Iterable[str] = ()
) -> dict[str, Any]:
    """The dict saved in ``path`` by ``torch.save``, read weights-only.

    Args:
        path: the file.
        what: what the file should be, for error messages (``"tuner checkpoint"``).
        keys: the keys the dict must have.

    Raises ``ValueError`` naming ``path`` when the file cannot be read weights-only, is not
    a dict, or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a {what})")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a {what}: not a file written by torch.save (no zip archive; "
            "truncated or foreign)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same refusal
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} is not a {what} that can be read safely (weights only): {reason}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a {what}: it holds a {type(state).__name__}, not a dict")
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{path} is not a {what}: it lacks {missing}")
    return state


def check_tensors(values: object, targets: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse ``values`` (``ValueError`` starting with ``where``) unless it is a dict with
    exactly the keys of ``targets``, each a tensor of the target's shape, floating where the
    target is, and finite."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: it holds a {type(values).__name__}, not a dict")
    missing, unexpected = sorted(set(targets) - set(values)), sorted(set(values) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    for key, target in targets.items():
        value = values[key]
        if not isinstance(value, torch.Tensor) or value.shape != target.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{where}: {key} is {shape}, expected a tensor of shape {tuple(target.shape)}"
            )
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {value.dtype}, expected {target.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {key} holds NaN or Inf")


def load_module_state(
    module: nn.Module, state: object, path: str | os.PathLike[str], what: str
) -> None:
    """Load ``state`` (read from ``path``) into ``module`` after :func:`check_tensors`
    against its state dict; ``ValueError`` naming ``path`` before any change otherwise."""
    check_tensors(state, module.state_dict(), f"{path} is not a {what}")
    module.load_state_dict(state)


def save_atomically(state: object, path: str | os.PathLike[str]) -> Path:
    """``torch.save(state, path)`` through a temporary file and a rename: a reader sees the
    previous file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
