"""What re-parameterisation keeps across prompts while the weights stay: version keys of
tensors, and the low-rank factors ``F = U Wᵀ`` of a PIA's targets (EAS_SPEC §4).

``F`` depends on the target weights and the PIA's up projections only, never on the
examples' states, so a model decoding prompt after prompt with fixed weights needs it once:
:class:`KeptFactors` builds it at the first low-rank set-up and again only when one of
those tensors changes (an optimizer step, a load, a new storage). The merge keeps its own
float32 layout of the same factors (:mod:`eas_kernels.kept_merge`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ops import lowrank_factors


def tensor_versions(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """Identity and version counter of each tensor (None: an inference tensor has none,
    and cannot be changed in place outside inference mode)."""
    try:
        return tuple((id(tensor), tensor._version) for tensor in tensors)
    except RuntimeError:
        return None


def weights_key(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """:func:`tensor_versions` and the storage of each tensor: what was built from the
    tensors is still theirs while the key is equal (None: no key, build again)."""
    versions = tensor_versions(tensors)
    if versions is None:
        return None
    return versions + tuple(tensor.data_ptr() for tensor in tensors)


def factor_sources(pia: nn.Module, linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """The tensors ``F`` of ``pia`` for ``linears`` is built from: the targets' weights and
    the up projections."""
    return [
        *(linear.weight for linear in linears),
        pia.up1.weight, pia.up2.weight, pia.up1.bias, pia.up2.bias,
    ]  # fmt: skip


class KeptFactors:
    """``F`` per target of one PIA (:func:`~eas_kernels.ops.lowrank_factors`, in the factor
    dtype), kept while :func:`weights_key` of their sources stays."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._factors: list[torch.Tensor] = []

    @property
    def kept(self) -> list[torch.Tensor]:
        """The factors kept now (empty before the first build)."""
        return self._factors

    @torch.no_grad()
    def of(self, pia: nn.Module, linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
        """``F`` ``(2r + 2, out)`` of each of ``linears`` for ``pia``, built if needed."""
        key = weights_key(factor_sources(pia, linears))
        if key is None or key != self._key:
            basis = pia.up_basis()
            self._factors = [lowrank_factors(linear.weight, basis) for linear in linears]
            self._key = key
        return self._factors
