"""``bandit``: the variance-reduced bandit, warm-started from the cosine prior (issue 14).

Same policy and sampling as the paper's search (Eq. 14–15: ``π = softmax(s / τ)``,
``π̃_i ~ U(0, π_i)``, skip the ``k`` arms of lowest ``π̃``; higher ``s`` = more important),
with three changes that the policy-gradient literature uses against noise:

1. **Prior.** The first round is one :data:`~.estimator.COSINE` pass; with ``c_i`` the
   input/output cosine of arm ``i``, ``s = z(1 − c)`` (``z``: standardise over the arms,
   0 when all are equal), so that arms whose output barely turns their input start as
   the least important.
2. **Rewards and advantages.** A round scores ``m`` distinct skip sets ``ρ_j`` (default 8,
   at most the number of distinct sets) on the same held-out batch; with losses ``l_j``,
   the advantage is the per-round z-score ``A_j = (l_j − mean l) / std l`` (0 when all
   losses are equal): the scale of the losses (1 nat or 8) no longer sets the step.
3. **Every arm moves**, by the score-function update with a baseline::

       s_i ← s_i + (η / m) Σ_j A_j (1[i ∈ ρ_j] − π_i)

   Because ``Σ_j A_j = 0`` the baseline term cancels exactly, so the step is
   ``(η / m) Σ_j A_j 1[i ∈ ρ_j]``: an arm skipped in subnets that did worse than the
   round's mean becomes more important, one skipped in better ones less; no
   ``π_i (1 − π_i)`` factor shrinks it near a uniform policy.

Default budget: one pass for the prior plus the search phase's rounds of ``m``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .bandit import distinct_skip_sets, sample_skip_set
from .estimator import COSINE, LOSS, Estimator, Measurement, register_estimator


def standardize(values: torch.Tensor) -> torch.Tensor:
    """``(v − mean v) / std v`` (population std); zeros when ``v`` is constant."""
    centred = values - values.mean()
    scale = centred.pow(2).mean().sqrt()
    return centred / scale if scale > 0 else torch.zeros_like(values)


@register_estimator
class VarianceReducedBandit(Estimator):
    """``bandit`` (module docstring)."""

    name = "bandit"
    summary = "bandit with z-scored rewards -loss, all-arm updates, cosine warm start"

    def __init__(self, num_arms: int, k: int, **kwargs: Any) -> None:
        super().__init__(num_arms, k, **kwargs)
        self.scores = torch.zeros(num_arms, dtype=torch.float64)
        self.prior_done = False

    def _subnets(self) -> int:
        return self.settings.num_subnets or 8

    def min_budget(self) -> int:
        return 1  # the cosine warm start; with nothing the plan is the first k arms

    def default_budget(self) -> int:
        return 1 + self.settings.scheduled_rounds * self._subnets()

    def _sample(self) -> tuple[int, ...]:
        return sample_skip_set(self.scores, self.settings.temperature, self.k, self.generator)

    def _propose(self, remaining: int) -> list[Measurement]:
        if not self.prior_done:
            return [Measurement(COSINE)] if remaining >= 1 else []
        count = min(self._subnets(), remaining, math.comb(self.num_arms, self.k))
        if count < 2:
            return []
        sets = distinct_skip_sets(self._sample, lambda: self.random_arms(self.k), count)
        return [Measurement(LOSS, arms) for arms in sets]

    def _observe(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        if round[0].kind == COSINE:
            self.scores = standardize(1.0 - results[0])
            self.prior_done = True
            return
        advantages = standardize(torch.tensor(results, dtype=torch.float64))
        step = torch.zeros_like(self.scores)
        for measurement, advantage in zip(round, advantages, strict=True):
            step[list(measurement.arms)] += advantage
        self.scores += self.settings.lr / len(round) * step

    def training_arms(self) -> tuple[int, ...]:
        return self._sample()

    def importance(self) -> torch.Tensor:
        return self.scores.clone()

    def _state(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "prior_done": self.prior_done}

    def _load(self, state: dict[str, Any]) -> None:
        scores = self._scores_entry(state, "scores")
        if type(state.get("prior_done")) is not bool:
            raise ValueError("state['prior_done'] must be a bool")
        self.scores, self.prior_done = scores, state["prior_done"]
