"""Reading the ``.pt`` files of a run folder, which are not trusted.

Run folders and checkpoints travel between people, so a file a run reads may have been
written by anyone. Every ``.pt`` file is read with ``torch.load(weights_only=True)``: its
pickle may hold tensors and plain containers (dict, list, tuple, str, numbers, None) and
nothing else, so loading it cannot run code. Whatever cannot be read that way — a
truncated file, a foreign one, one whose pickle would call a function — is refused with a
``ValueError`` naming the file, before anything is changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


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
