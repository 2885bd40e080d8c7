"""``portfolio``: greedy removal, then its plan checked against two cheap rivals.

Greedy removal (:mod:`.greedy`) builds its plan one arm at a time, so an early choice
can lock it onto a worse path; leave-one-out and the cosine prior (:mod:`.prior`) pick
their ``k`` arms in one go from other evidence, and on some supernets their plans score
lower (measured in ``benchmarks/RESULTS.md``: easy-vqa k = 4, seed 1; iris, seed 2). The
``portfolio`` estimator runs all three on one budget and keeps the best plan:

1. the first round scores every arm alone (``num_arms`` passes, greedy's first round and
   the whole of ``loo``) and, when the budget allows, one :data:`~.estimator.COSINE` pass;
2. greedy's later rounds share the budget left after :data:`CHECK_PASSES` passes are held
   back;
3. the check: each of the plans — greedy's, leave-one-out's (the ``k`` arms cheapest
   alone) and the prior's (the ``k`` arms of highest cosine) — whose skip set no round
   has scored yet is scored on the held-out batch, one pass each;
4. the plan is the ``k``-arm skip set of lowest held-out loss among every one scored
   (greedy's last round scores several; ties: the lexicographically first set). Until a
   ``k``-arm set is scored the plan is greedy's.

So its plan is never worse on the held-out batch than greedy's, leave-one-out's or the
prior's (those that were scored), for at most 1 + :data:`CHECK_PASSES` passes of the
greedy rounds' budget. Default budget: greedy's. The comparison is exact when the rounds
run back to back on one supernet (the default schedule, no search epochs); rounds that
search epochs interleave with training steps score the plans on a supernet that moves
between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .estimator import COSINE, Measurement, loss_of, lowest, register_estimator
from .greedy import GreedyRemoval

CHECK_PASSES = 3  # greedy's plan (when its last round did not score it), loo's, the prior's


@register_estimator
class GreedyPortfolio(GreedyRemoval):
    """``portfolio`` (module docstring)."""

    name = "portfolio"
    summary = "greedy removal, then its plan, leave-one-out's and the cosine prior's compared"

    def __init__(self, num_arms: int, k: int, **kwargs: Any) -> None:
        super().__init__(num_arms, k, **kwargs)
        self.singles: torch.Tensor | None = None  # (num_arms,) loss of each arm alone
        self.cosines: torch.Tensor | None = None  # (num_arms,) the prior's probe
        # every k-arm set scored, with its checked result (a loss, or per example)
        self.scored_plans: dict[tuple[int, ...], Any] = {}

    def _held_back(self) -> int:
        return CHECK_PASSES  # asked only by greedy's rounds, which all come before the check

    def _rivals(self) -> list[tuple[int, ...]]:
        """The plans the check compares: greedy's, leave-one-out's, the prior's."""
        plans = [tuple(sorted(self.chosen))]
        if self.singles is not None:
            plans.append(lowest(self.singles.tolist(), self.k))
        if self.cosines is not None:
            plans.append(lowest((-self.cosines).tolist(), self.k))
        return plans

    def _propose(self, remaining: int) -> list[Measurement]:
        if self.rounds == 0:
            round = super()._propose(remaining)
            return round + [Measurement(COSINE)] if remaining > len(round) else round
        if len(self.chosen) < self.k:
            return super()._propose(remaining)
        # the check: [] once it has run, since the rivals are fixed once greedy's are chosen
        unscored = list(dict.fromkeys(p for p in self._rivals() if p not in self.scored_plans))
        return [self._measure(plan) for plan in unscored[:remaining]]

    def _observe(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        for measurement, result in zip(round, results, strict=True):
            if measurement.kind == COSINE:
                self.cosines = result
            elif len(measurement.arms) == self.k:
                self.scored_plans[measurement.arms] = result
        if len(self.chosen) >= self.k:  # the check's round
            return
        super()._observe(round, results)
        if self.singles is None:
            self.singles = self.latest.clone()

    def _best_plan(self) -> tuple[int, ...]:
        """The scored ``k``-arm set of lowest loss (ties: the lexicographically first)."""
        return min(self.scored_plans, key=lambda arms: (loss_of(self.scored_plans[arms]), arms))

    def importance(self) -> torch.Tensor:
        """The best scored plan's arms first (its arms are the ``k`` least important),
        then greedy's order (:meth:`GreedyRemoval.importance`)."""
        greedy = super().importance()
        if not self.scored_plans or len(self.chosen) < self.k:
            return greedy
        best = self._best_plan()
        order = [*best, *sorted(set(range(self.num_arms)) - set(best), key=lambda a: greedy[a])]
        values = torch.empty(self.num_arms, dtype=torch.float64)
        values[order] = torch.arange(self.num_arms, dtype=torch.float64)
        return values

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "singles": None if self.singles is None else self.singles.clone(),
            "cosines": None if self.cosines is None else self.cosines.clone(),
            "scored_plans": [
                [list(arms), result.clone() if isinstance(result, torch.Tensor) else result]
                for arms, result in self.scored_plans.items()
            ],
        }

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        singles = None if state.get("singles") is None else self._scores_entry(state, "singles")
        cosines = None if state.get("cosines") is None else self._scores_entry(state, "cosines")
        entries = state.get("scored_plans")
        if not isinstance(entries, list):
            raise ValueError("state['scored_plans'] must be a list of [arms, result] pairs")
        scored: dict[tuple[int, ...], Any] = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError(f"state['scored_plans'] holds {entry!r}, not [arms, result]")
            measurement = self._measure(entry[0])
            if len(measurement.arms) != self.k:
                raise ValueError(f"state['scored_plans'] holds a set of {entry[0]!r}, not k arms")
            try:
                (scored[measurement.arms],) = self._checked([measurement], [entry[1]])
            except ValueError as error:
                raise ValueError(f"state['scored_plans'] for {entry[0]!r}: {error}") from None
        self.singles, self.cosines, self.scored_plans = singles, cosines, scored
