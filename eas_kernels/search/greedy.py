"""``greedy`` and ``loo``: skip sets built one arm at a time from held-out losses.

**Greedy removal** (SLEB, FinerCut): with ``S`` the arms chosen so far (empty at first),
a round scores ``S ∪ {a}`` for candidate arms ``a`` on the held-out batch and adds the
``a`` of lowest loss to ``S``; ``k`` rounds give the plan. The first round scores every
arm alone (``num_arms`` passes). A later round scores the ``w`` best-ranked remaining arms,
with ``w`` the remaining budget shared equally by the remaining rounds (all of them when
the budget allows); the ranking is by the most recent round that scored an arm, then its
loss there, then index. When a round could score fewer than 2 arms, the rest of ``S`` is
filled from the ranking without further passes. Default budget: ``2 · num_arms`` passes
(the first round, then ``num_arms`` passes shared by the other rounds: 60 for 30 arms), or
the full greedy ``Σ_{t<k} (num_arms − t)`` when that is less.

**Leave-one-out** (``loo``) is its first round only: each arm skipped alone, the ``k``
cheapest skipped (``num_arms`` passes).

Training steps of a search phase skip ``S`` plus random other arms, ``k`` in all, so the
PIAs train on sets close to the plan as it forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .estimator import COSINE, Estimator, Measurement, loss_of, register_estimator


@register_estimator
class GreedyRemoval(Estimator):
    """``greedy`` (module docstring)."""

    name = "greedy"
    summary = "greedy one-at-a-time removal scored by held-out loss"
    max_rounds: ClassVar[int | None] = None  # None: k rounds

    def __init__(self, num_arms: int, k: int, **kwargs: Any) -> None:
        super().__init__(num_arms, k, **kwargs)
        self.chosen: list[int] = []
        self.latest = torch.zeros(num_arms, dtype=torch.float64)  # loss of the last score
        self.scored_in = torch.full((num_arms,), -1, dtype=torch.int64)  # its round (-1: never)

    def default_budget(self) -> int:
        return min(2 * self.num_arms, sum(self.num_arms - t for t in range(self.k)))

    def min_budget(self) -> int:
        return self.num_arms

    def _ranking(self) -> list[int]:
        """Unchosen arms, best candidates for skipping first."""
        rest = [a for a in range(self.num_arms) if a not in self.chosen]
        return sorted(rest, key=lambda a: (-int(self.scored_in[a]), float(self.latest[a]), a))

    def _width(self, rounds_done: int, remaining: int) -> int:
        """How many candidates the round after ``rounds_done`` rounds may score."""
        rest = self.num_arms - len(self.chosen)
        if rounds_done == 0:
            return rest
        if self.max_rounds is not None and rounds_done >= self.max_rounds:
            return 0
        return min(rest, remaining // (self.k - len(self.chosen)))

    def _held_back(self) -> int:
        """Passes the greedy rounds leave unused (for a subclass's own rounds)."""
        return 0

    def _propose(self, remaining: int) -> list[Measurement]:
        if len(self.chosen) >= self.k:
            return []
        width = self._width(self.rounds, remaining - self._held_back())
        return [self._measure([*self.chosen, arm]) for arm in self._ranking()[:width]]

    def _measure(self, arms: Sequence[int]) -> Measurement:
        """The measurement of the skip set ``arms`` (a subclass may ask for more)."""
        return self.loss_set(arms)

    def _choose(self, scored: dict[int, Any]) -> int:
        """The arm a round adds, from each scored arm's result: the lowest loss (ties:
        lower index)."""
        return min(scored, key=lambda arm: (loss_of(scored[arm]), arm))

    def _observe(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        scored = {}
        for measurement, result in zip(round, results, strict=True):
            if measurement.kind == COSINE:  # a subclass's own measurement
                continue
            (arm,) = set(measurement.arms) - set(self.chosen)
            self.latest[arm] = loss_of(result)
            self.scored_in[arm] = self.rounds
            scored[arm] = result
        self.chosen.append(self._choose(scored))
        left = self.budget - self.passes - len(round) - self._held_back()
        while len(self.chosen) < self.k and self._width(self.rounds + 1, left) < 2:
            self.chosen.append(self._ranking()[0])

    def training_arms(self) -> tuple[int, ...]:
        return self.random_arms(self.k, keep=self.chosen)

    def importance(self) -> torch.Tensor:
        """The position of each arm in the order chosen-first, then the ranking."""
        order = [*self.chosen, *self._ranking()]
        values = torch.empty(self.num_arms, dtype=torch.float64)
        values[order] = torch.arange(self.num_arms, dtype=torch.float64)
        return values

    def _state(self) -> dict[str, Any]:
        return {
            "chosen": list(self.chosen),
            "latest": self.latest.clone(),
            "scored_in": self.scored_in.clone(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        chosen = state.get("chosen")
        if not (
            isinstance(chosen, list)
            and len(chosen) <= self.k
            and len(set(chosen)) == len(chosen)
            and all(type(a) is int and 0 <= a < self.num_arms for a in chosen)
        ):
            raise ValueError(f"state['chosen'] must list at most k distinct arms, got {chosen!r}")
        latest = self._scores_entry(state, "latest")
        scored_in = state.get("scored_in")
        if not (
            isinstance(scored_in, torch.Tensor)
            and scored_in.dtype == torch.int64
            and tuple(scored_in.shape) == (self.num_arms,)
        ):
            raise ValueError(
                f"state['scored_in'] must be an int64 tensor of shape ({self.num_arms},)"
            )
        self.chosen, self.latest, self.scored_in = list(chosen), latest, scored_in.clone()


@register_estimator
class LeaveOneOut(GreedyRemoval):
    """``loo``: each arm skipped alone on the held-out batch; the ``k`` cheapest skipped."""

    name = "loo"
    summary = "leave-one-out: each arm skipped alone, the k cheapest chosen"
    max_rounds = 1

    def default_budget(self) -> int:
        return self.num_arms
