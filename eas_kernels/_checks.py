"""Argument validation shared by the public API.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
wrong value) with a message naming the argument and what was expected, so that bad
input never reaches a kernel or changes a model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any, TypeVar

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Key = TypeVar("Key")


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int after checking it is a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; derived seeds stay below this


def check_seed(value: object, name: str = "seed") -> int:
    """Return ``value`` after checking it is an int in ``[0, 2**63)`` (a torch seed)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return int(value)


def check_positive_finite(value: object, name: str) -> float:
    """Return ``value`` as a float after checking it is a finite positive real number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite positive number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_tensor(
    value: object,
    name: str,
    *,
    ndim: int,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    floating: bool = False,
) -> torch.Tensor:
    """Check a tensor's type, rank, dtype and device; return it unchanged."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({FLOAT_DTYPES}), got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on device {device}, got {value.device}")
    return value


def check_layer_indices(value: object, name: str, num_layers: int) -> tuple[int, ...]:
    """Sorted tuple of distinct layer indices in ``[0, num_layers)`` from an iterable of ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an iterable of ints, got {type(value).__name__}")
    indices = list(value)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, Integral):
            raise TypeError(f"{name} must hold ints, got {type(index).__name__} {index!r}")
        if not 0 <= index < num_layers:
            raise ValueError(f"{name}: layer index {index} is out of range [0, {num_layers})")
    if len(set(indices)) != len(indices):
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"{name} has duplicate indices {duplicates}")
    return tuple(sorted(int(i) for i in indices))


def check_token_mask(
    mask: object,
    name: str,
    *,
    shape: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check a ``(B, n)`` bool mask that must select at least one token per example."""
    check_tensor(mask, name, ndim=2, dtype=torch.bool, device=device)
    assert isinstance(mask, torch.Tensor)
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, n), got {tuple(mask.shape)}")
    covered = mask.any(dim=1)
    if not bool(covered.all()):  # one host sync when the mask is good
        empty = (~covered).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} selects no token in example(s) {empty}: every example needs at least one "
            "prompt token to average over"
        )
    return mask


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2-sharded ``DTensor`` parameter; any other tensor as is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def first_non_finite(named: Sequence[tuple[Key, torch.Tensor]]) -> Key | None:
    """The key of the first tensor of ``named`` that holds NaN or Inf, or None: one
    ``_foreach_norm`` pass (max |x|, which keeps NaN and Inf) and one host sync per device.
    A ``DTensor`` (FSDP2) is checked by its local shard: each rank checks its own."""
    by_device: dict[torch.device, list[tuple[Key, torch.Tensor]]] = {}
    for key, tensor in named:
        tensor = local_part(tensor.detach())
        by_device.setdefault(tensor.device, []).append((key, tensor))
    for entries in by_device.values():
        largest = torch._foreach_norm([tensor for _, tensor in entries], float("inf"))
        finite = torch.isfinite(torch.stack(largest))
        if not bool(finite.all()):
            return entries[int((~finite).nonzero()[0, 0])][0]
    return None


def takes_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name`` (True when it has no
    signature to read: the call decides)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY)
        for p in parameters
    )
