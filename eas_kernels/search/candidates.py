"""What the arms of a redundancy search stand for (paper Table 3; DAS, EAS_SPEC §6).

A :class:`Candidates` maps bandit arms to the skip sets of :func:`eas_kernels.set_skipped`
for a model of ``num_layers`` blocks. Its kind is a key of
:data:`eas_kernels.roles.CANDIDATE_SETS`, which lists the roles of its arms: arm ``a``
gives block ``a % L`` the role ``arms[a // L]``:

========== ======== ==============================================================
kind       arms     arm ``i`` skips
========== ======== ==============================================================
mha        L        the MHA of block ``i`` (EAS)
ffn        L        the FFN of block ``i``
mha_or_ffn 2L       the MHA of block ``i`` (``i < L``) or the FFN of block ``i - L``
block      L        block ``i`` whole (DAS)
========== ======== ==============================================================

A block whose MHA and FFN are both chosen (``mha_or_ffn``) is skipped whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._checks import check_layer_indices, check_positive_int
from ..plan import SkipPlan
from ..roles import CANDIDATE_SETS


class Candidates:
    """The arms of one candidate kind (a key of ``CANDIDATE_SETS``: the patch's ``search``)."""

    def __init__(self, kind: str, num_layers: int) -> None:
        if not isinstance(kind, str) or kind not in CANDIDATE_SETS:
            raise ValueError(f"candidates must be one of {sorted(CANDIDATE_SETS)}, got {kind!r}")
        self.kind = kind
        self.roles = CANDIDATE_SETS[kind]  # the role of each group of L arms
        self.num_layers = check_positive_int(num_layers, "num_layers")

    @property
    def num_arms(self) -> int:
        return len(self.roles) * self.num_layers

    def arm_names(self) -> list[str]:
        """``"mha 3"``, ``"ffn 3"`` or ``"block 3"`` for each arm, in order."""
        return [f"{role.arm} {i}" for role in self.roles for i in range(self.num_layers)]

    def skip_sets(self, arms: Iterable[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(mhas, ffns)``: the blocks whose MHA / FFN the arms skip (sorted)."""
        chosen = check_layer_indices(arms, "arms", self.num_arms)
        mhas: set[int] = set()
        ffns: set[int] = set()
        for arm in chosen:
            role, layer = self.roles[arm // self.num_layers], arm % self.num_layers
            if role.skips_mha:
                mhas.add(layer)
            if role.skips_ffn:
                ffns.add(layer)
        return tuple(sorted(mhas)), tuple(sorted(ffns))

    def plan(self, arms: Iterable[int], base: SkipPlan) -> SkipPlan:
        """``base`` (ranks, temperature) with the skip sets of ``arms``."""
        if base.num_layers != self.num_layers:
            raise ValueError(
                f"plan is for {base.num_layers} layers, the candidates for {self.num_layers}"
            )
        mhas, ffns = self.skip_sets(arms)
        return base.replace(skipped=list(mhas), skipped_ffns=list(ffns))

    def arm_cosines(self, table: torch.Tensor) -> torch.Tensor:
        """``(num_arms,)``: each arm's column of :func:`~.prior.residual_cosines`'
        ``(num_layers, 3)`` table (MHA, FFN or whole block, by the arm's role)."""
        if tuple(table.shape) != (self.num_layers, 3):
            raise ValueError(
                f"table must have shape ({self.num_layers}, 3), got {tuple(table.shape)}"
            )
        columns = [
            2 if role.skips_mha and role.skips_ffn else 0 if role.skips_mha else 1
            for role in self.roles
        ]
        return torch.cat([table[:, column] for column in columns])
