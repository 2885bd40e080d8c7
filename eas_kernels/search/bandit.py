"""The k-armed bandit that finds redundant MHAs (EAS_SPEC §5, paper Eq. 14–16).

One arm per candidate (an MHA of each layer). Preferences ``s ∈ R^L`` start at 0;
**higher s = more important = kept**. With ``π = softmax(s / temperature)``:

    π̃_i ~ U(0, π_i)                            (Eq. 14)
    ρ    = the k arms with the lowest π̃         (Eq. 15: the skip set of one subnet)

After evaluating m distinct skip sets ρ_1..ρ_m with losses l_j (same held-out batch),
rewards ``r_j = exp(−l_j)`` and ``r̄ = mean_j r_j``, every arm ``i ∈ ρ_j`` moves by

    s_i ← s_i + η (r̄ − r_j) π_i (1 − π_i)      (Eq. 16; π taken before the update)

so skipping ``i`` in a subnet that did better than average lowers ``s_i`` (``i`` looks
redundant). The plan skips the k arms with the lowest ``s``. The public code uses
``π = softmax(10 s)``, ``η = 2`` and the opposite sign; here both are parameters and the
sign convention is the one above. Pure PyTorch, seeded, and unaware of any model.

:class:`PaperBandit` is this search as the ``paper`` :class:`~.estimator.Estimator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import (
    check_layer_indices,
    check_positive_finite,
    check_positive_int,
)
from .estimator import (
    LOSS,
    Estimator,
    Measurement,
    check_arms,
    check_loss,
    lowest,
    register_estimator,
    seeded_generator,
)


def sample_skip_set(
    scores: torch.Tensor, temperature: float, k: int, generator: torch.Generator
) -> tuple[int, ...]:
    """Eq. 14–15: ``π = softmax(scores / temperature)``, ``π̃_i ~ U(0, π_i)``; the ``k``
    arms of lowest ``π̃``, sorted."""
    pi = torch.softmax(scores / temperature, dim=0)
    noise = torch.rand(scores.shape[0], generator=generator, dtype=torch.float64)
    return tuple(sorted(torch.argsort(noise * pi)[:k].tolist()))


def distinct_skip_sets(
    draw: Callable[[], tuple[int, ...]], fallback: Callable[[], tuple[int, ...]], count: int
) -> list[tuple[int, ...]]:
    """``count`` distinct sets from ``draw``; when the policy is too peaked to give them
    within ``100 * count`` draws, the rest come from ``fallback`` (uniform)."""
    chosen: list[tuple[int, ...]] = []
    for _ in range(100 * count):
        candidate = draw()
        if candidate not in chosen:
            chosen.append(candidate)
        if len(chosen) == count:
            return chosen
    while len(chosen) < count:
        candidate = fallback()
        if candidate not in chosen:
            chosen.append(candidate)
    return chosen


class BanditSearch:
    """Policy over skip sets of size ``k`` among ``num_arms`` arms.

    Args:
        num_arms: number of candidates ``L`` (e.g. the model's layers).
        k: how many arms a skip set holds, ``0 < k < num_arms``.
        num_subnets: ``m``, the skip sets :meth:`propose` returns (paper: 3).
        lr: ``η`` of Eq. 16 (paper: 1).
        temperature: ``π = softmax(s / temperature)``.
        seed: seeds the generator of every random draw (None: non-deterministic).
    """

    def __init__(
        self,
        num_arms: int,
        k: int,
        *,
        num_subnets: int = 3,
        lr: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.num_arms, self.k = check_arms(num_arms, k)
        self.num_subnets = check_positive_int(num_subnets, "num_subnets")
        if math.comb(self.num_arms, self.k) < self.num_subnets:
            raise ValueError(
                f"num_subnets={num_subnets} exceeds the {math.comb(num_arms, k)} distinct "
                f"skip sets of size {k} among {num_arms} arms"
            )
        self.lr = check_positive_finite(lr, "lr")
        self.temperature = check_positive_finite(temperature, "temperature")
        self.generator = seeded_generator(seed)
        self._scores = torch.zeros(self.num_arms, dtype=torch.float64)

    @property
    def scores(self) -> torch.Tensor:
        """Preferences ``s`` (float64, a copy): higher = more important."""
        return self._scores.clone()

    def policy(self) -> torch.Tensor:
        """``π = softmax(s / temperature)``."""
        return torch.softmax(self._scores / self.temperature, dim=0)

    def sample(self) -> tuple[int, ...]:
        """One skip set from the policy (Eq. 14–15), sorted."""
        return sample_skip_set(self._scores, self.temperature, self.k, self.generator)

    def warmup_sample(self) -> tuple[int, ...]:
        """A uniformly random skip set (the warm-up epochs)."""
        chosen = torch.randperm(self.num_arms, generator=self.generator)[: self.k]
        return tuple(sorted(chosen.tolist()))

    def propose(self) -> list[tuple[int, ...]]:
        """``num_subnets`` distinct skip sets drawn from the policy.

        When the policy is too peaked to give distinct sets within a bounded number of
        draws, the remaining ones are drawn uniformly (still distinct).
        """
        return distinct_skip_sets(self.sample, self.warmup_sample, self.num_subnets)

    def update(self, skip_sets: Sequence[Sequence[int]], losses: Sequence[float]) -> None:
        """Apply Eq. 16 for the evaluated ``skip_sets`` and their ``losses``."""
        if isinstance(skip_sets, (str, bytes)) or not isinstance(skip_sets, Sequence):
            raise TypeError("skip_sets must be a sequence of skip sets")
        if len(skip_sets) < 2 or len(skip_sets) != len(losses):
            raise ValueError(
                f"update needs at least 2 skip sets and one loss each, got {len(skip_sets)} "
                f"sets and {len(losses)} losses"
            )
        sets = []
        for skip_set in skip_sets:
            indices = check_layer_indices(skip_set, "skip set", self.num_arms)
            if len(indices) != self.k:
                raise ValueError(f"every skip set must hold k={self.k} arms, got {list(indices)}")
            sets.append(indices)
        values = [check_loss(loss) for loss in losses]
        rewards = torch.exp(-torch.tensor(values, dtype=torch.float64))
        mean = rewards.mean()
        pi = self.policy()
        step = torch.zeros_like(self._scores)
        for indices, reward in zip(sets, rewards, strict=True):
            index = torch.tensor(indices)
            step[index] += self.lr * (mean - reward) * pi[index] * (1 - pi[index])
        self._scores += step

    def plan(self) -> tuple[int, ...]:
        """The k arms with the lowest preference (ties: lower index first), sorted."""
        return lowest(self._scores.tolist(), self.k)

    def state_dict(self) -> dict[str, object]:
        return {
            "num_arms": self.num_arms,
            "k": self.k,
            "num_subnets": self.num_subnets,
            "lr": self.lr,
            "temperature": self.temperature,
            "scores": self._scores.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore scores and generator; the configuration must match this search.

        Raises ``ValueError`` (nothing changed) for a state of another search or a
        malformed one.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        config = ("num_arms", "k", "num_subnets", "lr", "temperature")
        for name in config:
            if state.get(name) != getattr(self, name):
                raise ValueError(
                    f"state is for {name}={state.get(name)!r}, this search has "
                    f"{getattr(self, name)!r}"
                )
        scores = state.get("scores")
        if not isinstance(scores, torch.Tensor) or scores.shape != (self.num_arms,):
            raise ValueError(f"state['scores'] must be a tensor of shape ({self.num_arms},)")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("state['scores'] holds NaN or Inf")
        generator = torch.Generator()
        try:
            generator.set_state(state.get("generator"))
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"state['generator'] is not a generator state: {error}") from None
        self._scores = scores.to(torch.float64).clone()
        self.generator = generator


@register_estimator
class PaperBandit(Estimator):
    """``paper``: :class:`BanditSearch` (Eq. 14–16) exactly; rounds of ``m`` subnets
    (default 3), training steps on sets drawn from its policy.

    Default budget: the rounds of the search phase (``scheduled_rounds * m`` passes), so
    that with the default every update happens between training steps, as in the paper.
    """

    name = "paper"
    summary = "the paper's bandit (Eq. 16, rewards exp(-loss))"

    def __init__(self, num_arms: int, k: int, **kwargs: Any) -> None:
        super().__init__(num_arms, k, **kwargs)
        self.search = BanditSearch(
            num_arms,
            k,
            num_subnets=self._subnets(),
            lr=self.settings.lr,
            temperature=self.settings.temperature,
        )
        self.search.generator = self.generator

    def _subnets(self) -> int:
        return self.settings.num_subnets or 3

    def default_budget(self) -> int:
        return self.settings.scheduled_rounds * self._subnets()

    def min_budget(self) -> int:
        return self._subnets()  # one update: with none the plan is the first k arms

    def _propose(self, remaining: int) -> list[Measurement]:
        if remaining < self.search.num_subnets:
            return []
        return [Measurement(LOSS, arms) for arms in self.search.propose()]

    def _observe(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        self.search.update([m.arms for m in round], results)

    def training_arms(self) -> tuple[int, ...]:
        return self.search.sample()

    def importance(self) -> torch.Tensor:
        return self.search.scores

    def _state(self) -> dict[str, Any]:
        return {"scores": self.search.scores}

    def _load(self, state: dict[str, Any]) -> None:
        self.search._scores = self._scores_entry(state, "scores")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.search.generator = self.generator
