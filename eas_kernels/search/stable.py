"""``stable``: the ``portfolio`` search whose statistical ties go to the untuned model's prior.

Three warm-ups of one model on one data set leave three different supernets, and each
ranks the arms differently: within one supernet the cheapest arms lie within one or two
standard errors of the held-out batch's noise of each other (``benchmarks/RESULTS.md``,
search quality), so which of them greedy removal picks is decided by noise and by the
seed's warm-up, and plans of different seeds share few arms. ``stable`` breaks those
ties with a ranking that is the same for every seed, and leaves every choice that the
held-out batch does decide as ``portfolio`` (:mod:`.portfolio`) makes it:

1. **Before any training step** it measures the cosine prior (:mod:`.prior`) of the
   untuned model (:meth:`~.estimator.Estimator.untuned_probes`, one pass): ``c_a``, the
   mean cosine of arm ``a``'s input and residual output. The untuned model is the same
   for every tuning seed (the PIAs' up projections start at zero), so is ``c``.
2. Its skip sets are measured per example (:data:`~.estimator.EXAMPLES`). For two sets
   ``A`` and ``B`` scored on the same ``n`` examples, with ``m_i`` example ``i``'s mean
   loss, the **paired standard error** of their difference is
   ``se(A, B) = std_i(m_i(A) − m_i(B)) / √n``; ``A`` **ties** the lowest set ``B`` when
   ``loss(A) − loss(B) ≤ z · se(A, B)``, ``z`` = :attr:`SearchSettings.tie_se
   <.estimator.SearchSettings>` (default 1: the one-standard-error rule).
3. Each greedy round adds, among the arms that tie the round's lowest, the one the
   prior calls least important (highest ``c_a``; then the lower loss, then the lower
   index); when a later round can score only some arms (greedy's narrowing), the arms
   that tied come first, in the prior's order, then the others by loss.
4. The check (:mod:`.portfolio`) scores one more rival, the untuned prior's plan (the
   ``k`` arms of highest ``c_a``, the same for every seed), and keeps, among the scored
   plans that tie the lowest, the one of highest ``Σ_{a∈plan} c_a`` (then the lower
   loss, then the lexicographically first set): the untuned prior's plan whenever it ties.

With ``z = 0`` it is ``portfolio`` with one more rival. Budget: ``portfolio``'s, of which
the untuned probe and the fourth rival use one pass each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_layer_indices
from .estimator import (
    COSINE,
    EXAMPLES,
    Measurement,
    loss_of,
    lowest,
    register_estimator,
)
from .portfolio import GreedyPortfolio


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """The paired standard error of ``loss(a) − loss(b)`` for two :data:`EXAMPLES`
    results of the same examples (0 with fewer than 2 examples that have counts)."""
    if a.shape != b.shape or not torch.equal(a[1], b[1]):
        raise ValueError("paired results must be of the same examples (shape and counts)")
    real = a[1] > 0
    n = int(real.sum())
    if n < 2:
        return 0.0
    differences = a[0, real] / a[1, real] - b[0, real] / b[1, real]
    return float(differences.std()) / math.sqrt(n)


@register_estimator
class StablePortfolio(GreedyPortfolio):
    """``stable`` (module docstring)."""

    name = "stable"
    summary = "portfolio, its statistical ties broken by the untuned model's cosine prior"
    measures_per_example = True

    def __init__(self, num_arms: int, k: int, **kwargs: Any) -> None:
        super().__init__(num_arms, k, **kwargs)
        self.untuned: torch.Tensor | None = None  # (num_arms,) the untuned model's cosines
        self.tied = torch.zeros(num_arms, dtype=torch.bool)  # tied in its latest round

    def min_budget(self) -> int:
        return super().min_budget() + 1

    def _held_back(self) -> int:
        return super()._held_back() + 1  # the untuned prior's plan

    def _rivals(self) -> list[tuple[int, ...]]:
        """Portfolio's rivals and the untuned prior's plan."""
        return [*super()._rivals(), lowest((-self.untuned).tolist(), self.k)]

    def untuned_probes(self) -> list[Measurement]:
        return [Measurement(COSINE)] if self.untuned is None else []

    def _observe_untuned(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        self.untuned = results[0]

    def _propose(self, remaining: int) -> list[Measurement]:
        if self.untuned is None:
            raise RuntimeError(
                "the stable estimator needs the untuned model's probe first: measure "
                "untuned_probes() before any training step and give it to tell_untuned()"
            )
        return super()._propose(remaining)

    def _measure(self, arms: Sequence[int]) -> Measurement:
        return Measurement(EXAMPLES, check_layer_indices(arms, "arms", self.num_arms))

    def _ties(self, results: dict[Any, torch.Tensor]) -> list[Any]:
        """The keys whose result ties the lowest loss's (module docstring, 2.)."""
        best = min(results, key=lambda key: (loss_of(results[key]), key))
        z, floor = self.settings.tie_se, loss_of(results[best])
        return [
            key
            for key, result in results.items()
            if loss_of(result) - floor <= z * paired_se(result, results[best])
        ]

    def _choose(self, scored: dict[int, Any]) -> int:
        ties = self._ties(scored)
        self.tied[list(scored)] = False
        self.tied[ties] = True
        return min(ties, key=lambda a: (-float(self.untuned[a]), loss_of(scored[a]), a))

    def _ranking(self) -> list[int]:
        """Unchosen arms: those of the latest round that tied first, the prior's least
        important first; then greedy's ranking."""
        greedy = super()._ranking()
        position = {arm: i for i, arm in enumerate(greedy)}
        latest = max((int(self.scored_in[a]) for a in greedy), default=-1)

        def key(arm: int) -> tuple[int, float, int]:
            if self.tied[arm] and int(self.scored_in[arm]) == latest:
                return (0, -float(self.untuned[arm]), position[arm])
            return (1, 0.0, position[arm])

        return sorted(greedy, key=key)

    def _best_plan(self) -> tuple[int, ...]:
        plans, prior = self.scored_plans, self.untuned
        return min(
            self._ties(plans),
            key=lambda arms: (-float(prior[list(arms)].sum()), loss_of(plans[arms]), arms),
        )

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "untuned": None if self.untuned is None else self.untuned.clone(),
            "tied": self.tied.clone(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        untuned = None if state.get("untuned") is None else self._scores_entry(state, "untuned")
        tied = state.get("tied")
        if not (
            isinstance(tied, torch.Tensor)
            and tied.dtype == torch.bool
            and tuple(tied.shape) == (self.num_arms,)
        ):
            raise ValueError(f"state['tied'] must be a bool tensor of shape ({self.num_arms},)")
        self.untuned, self.tied = untuned, tied.clone()
