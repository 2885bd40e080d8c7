"""One interface for every redundancy estimator of a search (EAS_SPEC §5; issue 14).

An :class:`Estimator` decides which ``k`` of ``num_arms`` arms (MHAs, FFNs or blocks:
:class:`~eas_kernels.search.Candidates`) a task needs least. It never touches a model: it
**asks** for measurements on the held-out batch and is **told** their results, round by
round, and the tuner (:class:`~eas_kernels.tuning.EASTuner`) does the measuring:

=========================== ========================================================
``Measurement(LOSS, arms)``  held-out loss with exactly ``arms`` skipped (eval mode,
                             the supernet's PIAs): one float, one held-out pass
``Measurement(EXAMPLES,      the same loss per held-out example: a ``(2, n)`` tensor,
arms)``                      row 0 each example's summed loss terms (e.g. answer-token
                             cross-entropies), row 1 their counts; the loss is
                             ``row0.sum() / row1.sum()`` (:func:`loss_of`). One pass
``Measurement(COSINE)``      nothing skipped; for every arm the mean over real tokens
                             of ``cos(input, residual output)`` of its MHA, FFN or
                             block: a ``(num_arms,)`` tensor, one held-out pass
=========================== ========================================================

An estimator may also ask for measurements of the **untuned** model, before any
training step (:meth:`Estimator.untuned_probes`, answered through
:meth:`Estimator.tell_untuned`): they are the same for every tuning seed.

Every estimator has a **budget** in held-out passes that no round exceeds (``passes``
counts what it used), a seeded generator for every random draw, and
``state_dict``/``load_state_dict`` so that a tuning run killed at any point resumes to the
same plan. Its :meth:`Estimator.importance` ranks the arms (higher = more important =
kept); :meth:`Estimator.plan` skips the ``k`` least important ones.

Estimators (:data:`ESTIMATORS`): ``paper`` (Eq. 16, :mod:`.bandit`), ``bandit`` (the
variance-reduced bandit, :mod:`.vr_bandit`), ``greedy`` and ``loo`` (:mod:`.greedy`),
``cosine`` (:mod:`.prior`), ``portfolio`` (:mod:`.portfolio`), ``stable``
(:mod:`.stable`). A new one is a subclass plus :func:`register_estimator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any, ClassVar

import torch

from .._checks import check_layer_indices, check_positive_finite, check_positive_int, check_seed

LOSS = "loss"
EXAMPLES = "examples"
COSINE = "cosine"


@dataclass(frozen=True)
class Measurement:
    """What an estimator asks for: ``kind`` :data:`LOSS` or :data:`EXAMPLES` with the skip
    set ``arms`` (sorted arm indices, any size), or :data:`COSINE` (``arms`` empty)."""

    kind: str
    arms: tuple[int, ...] = ()


@dataclass(frozen=True)
class SearchSettings:
    """Knobs some estimators read (each ignores the others).

    Args:
        num_subnets: skip sets per bandit round (None: the estimator's own default).
        lr: the bandits' step size ``η``.
        temperature: the bandits' ``π = softmax(s / temperature)``.
        scheduled_rounds: rounds the tuner's search phase offers between training steps
            (``search steps // eval_every``): the bandits' default budget.
        tie_se: ``stable``'s tie: a loss within this many paired standard errors of
            the lowest of its comparison (:mod:`.stable`); 0 breaks no ties.
    """

    num_subnets: int | None = None
    lr: float = 1.0
    temperature: float = 1.0
    scheduled_rounds: int = 0
    tie_se: float = 2.0

    def validate(self) -> SearchSettings:
        if self.num_subnets is not None:
            check_positive_int(self.num_subnets, "num_subnets")
            if self.num_subnets < 2:
                raise ValueError(f"num_subnets must be at least 2, got {self.num_subnets}")
        check_positive_finite(self.lr, "policy_lr")
        check_positive_finite(self.temperature, "policy_temperature")
        rounds = self.scheduled_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"scheduled_rounds must be an int >= 0, got {rounds!r}")
        tie = self.tie_se
        if isinstance(tie, bool) or not isinstance(tie, Real) or not 0 <= tie < math.inf:
            raise ValueError(f"tie_se must be a finite number >= 0, got {tie!r}")
        return self


class Estimator:
    """Base of the estimators (module docstring). Subclasses implement
    :meth:`default_budget`, :meth:`_propose`, :meth:`_observe`, :meth:`importance` and
    their state (:meth:`_state`, :meth:`_load`); they may refine :meth:`training_arms`
    and :meth:`min_budget`.

    Args:
        num_arms: ``L``, the candidates.
        k: arms a plan skips, ``0 < k < num_arms``.
        budget: held-out passes it may use (None: :meth:`default_budget`).
        seed: seeds its generator (None: non-deterministic).
        settings: :class:`SearchSettings`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    measures_per_example: ClassVar[bool] = False  # asks for EXAMPLES measurements

    def __init__(
        self,
        num_arms: int,
        k: int,
        *,
        budget: int | None = None,
        seed: int | None = None,
        settings: SearchSettings | None = None,
    ) -> None:
        self.num_arms, self.k = check_arms(num_arms, k)
        if settings is None:
            settings = SearchSettings()
        if not isinstance(settings, SearchSettings):
            raise TypeError(f"settings must be a SearchSettings, got {type(settings).__name__}")
        self.settings = settings.validate()
        defaulted = budget is None
        if budget is None:
            budget = self.default_budget()
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"search_budget must be an int >= 0 (held-out passes), got {budget!r}")
        if budget < self.min_budget():
            hint = (
                f" (its default budget, {budget}, counts the search epochs' rounds: give "
                "search_epochs >= 1 or a search_budget)"
                if defaulted
                else ""
            )
            raise ValueError(
                f"the {self.name} estimator needs a search_budget of at least "
                f"{self.min_budget()} held-out passes for {num_arms} arms and k={k}, "
                f"got {budget}{hint}"
            )
        self.budget = budget
        self.passes = 0
        self.rounds = 0
        self.generator = seeded_generator(seed)

    # ------------------------------------------------------------------ to implement
    def default_budget(self) -> int:
        """Passes it uses when no budget is given."""
        raise NotImplementedError

    def min_budget(self) -> int:
        """The smallest budget that gives a plan that is not arbitrary."""
        return 0

    def _propose(self, remaining: int) -> list[Measurement]:
        """The next round, costing at most ``remaining`` passes ([] when finished)."""
        raise NotImplementedError

    def _observe(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        """Update from the checked results of a round of :meth:`_propose`."""
        raise NotImplementedError

    def importance(self) -> torch.Tensor:
        """``(num_arms,)`` float64: higher = more important (kept)."""
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_state`'s entries (ValueError when malformed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the protocol
    def ask(self) -> list[Measurement]:
        """The next round of measurements; [] when the estimator is finished (its plan is
        final or its budget spent). Draws from the generator: call it only to measure."""
        round = self._propose(self.budget - self.passes)
        if len(round) > self.budget - self.passes:  # an estimator's bug, not the caller's
            raise RuntimeError(f"{self.name} proposed {len(round)} passes beyond its budget")
        return round

    def tell(self, round: Sequence[Measurement], results: Sequence[object]) -> None:
        """Give the results of the round :meth:`ask` returned (same order)."""
        self._observe(round, self._checked(round, results))
        self.passes += len(round)
        self.rounds += 1

    def untuned_probes(self) -> list[Measurement]:
        """Measurements of the untuned model it still needs (default: none). The caller
        measures them before any training step and gives them to :meth:`tell_untuned`;
        they count in the budget."""
        return []

    def tell_untuned(self, round: Sequence[Measurement], results: Sequence[object]) -> None:
        """Give the results of :meth:`untuned_probes` (same order)."""
        if list(round) != self.untuned_probes():
            raise ValueError(
                f"round must be untuned_probes() ({self.untuned_probes()}), got {list(round)}"
            )
        self._observe_untuned(round, self._checked(round, results))
        self.passes += len(round)

    def _observe_untuned(self, round: Sequence[Measurement], results: Sequence[Any]) -> None:
        raise NotImplementedError  # only an estimator with untuned probes receives any

    def _checked(self, round: Sequence[Measurement], results: Sequence[object]) -> list[Any]:
        if len(round) != len(results) or not round:
            raise ValueError(
                f"results must hold one result per measurement ({len(round)}), got {len(results)}"
            )
        checked: list[Any] = []
        for measurement, result in zip(round, results, strict=True):
            if measurement.kind == LOSS:
                checked.append(check_loss(result))
            elif measurement.kind == EXAMPLES:
                checked.append(check_examples(result))
            elif measurement.kind == COSINE:
                checked.append(self._check_cosines(result))
            else:
                raise ValueError(f"unknown measurement kind {measurement.kind!r}")
        return checked

    def training_arms(self) -> tuple[int, ...]:
        """The skip set of a search-phase training step (default: uniformly random)."""
        return self.random_arms(self.k)

    def random_arms(self, size: int, *, keep: Sequence[int] = ()) -> tuple[int, ...]:
        """``keep`` plus uniformly random other arms, ``size`` in all, sorted."""
        kept = set(keep)
        rest = [a for a in range(self.num_arms) if a not in kept]
        order = torch.randperm(len(rest), generator=self.generator).tolist()
        chosen = list(keep) + [rest[i] for i in order[: size - len(keep)]]
        return tuple(sorted(chosen))

    def plan(self) -> tuple[int, ...]:
        """The ``k`` least important arms (ties: lower index first), sorted."""
        return lowest(self.importance().tolist(), self.k)

    def _check_cosines(self, result: object) -> torch.Tensor:
        if not isinstance(result, torch.Tensor) or tuple(result.shape) != (self.num_arms,):
            raise ValueError(f"a cosine result must be a tensor of shape ({self.num_arms},)")
        values = result.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("a cosine result holds NaN or Inf")
        return values

    def loss_set(self, arms: Sequence[int]) -> Measurement:
        """A :data:`LOSS` measurement of the skip set ``arms`` (checked, sorted)."""
        return Measurement(LOSS, check_layer_indices(arms, "arms", self.num_arms))

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        return {
            "estimator": self.name,
            "num_arms": self.num_arms,
            "k": self.k,
            "budget": self.budget,
            "settings": asdict(self.settings),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._config(),
            "passes": self.passes,
            "rounds": self.rounds,
            "generator": self.generator.get_state(),
            **self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of an estimator configured as this one.

        Raises ``ValueError`` for another configuration or a malformed state; load into a
        copy (the tuner does) when nothing may change on failure.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        for name, value in self._config().items():
            if state.get(name) != value:
                raise ValueError(
                    f"state is for {name}={state.get(name)!r}, this search has {value!r}"
                )
        for name in ("passes", "rounds"):
            value = state.get(name)
            if type(value) is not int or value < 0 or (name == "passes" and value > self.budget):
                raise ValueError(f"state[{name!r}] must be an int in range, got {value!r}")
        generator = torch.Generator()
        try:
            generator.set_state(state.get("generator"))
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"state['generator'] is not a generator state: {error}") from None
        self._load(state)
        self.passes, self.rounds = state["passes"], state["rounds"]
        self.generator = generator

    def _scores_entry(self, state: dict[str, Any], name: str) -> torch.Tensor:
        """``state[name]``: a finite float64-convertible tensor of shape (num_arms,)."""
        value = state.get(name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.num_arms,):
            raise ValueError(f"state[{name!r}] must be a tensor of shape ({self.num_arms},)")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"state[{name!r}] holds NaN or Inf")
        return value.to(torch.float64).clone()


def lowest(scores: Sequence[float], k: int) -> tuple[int, ...]:
    """The indices of the ``k`` lowest ``scores`` (ties: lower index first), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return tuple(sorted(order[:k]))


def check_arms(num_arms: object, k: object) -> tuple[int, int]:
    """``(num_arms, k)`` after checking ``0 < k < num_arms`` (ints)."""
    num_arms, k = check_positive_int(num_arms, "num_arms"), check_positive_int(k, "k")
    if k >= num_arms:
        raise ValueError(f"k must be smaller than num_arms ({num_arms}), got {k}")
    return num_arms, k


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (checked), or non-deterministically (None)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(check_seed(seed))
    return generator


def check_examples(value: object) -> torch.Tensor:
    """An :data:`EXAMPLES` result as a float64 ``(2, n)`` CPU tensor: finite sums (row 0)
    and counts >= 0 (row 1) with at least one count."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != 2:
        raise ValueError("an examples result must be a tensor of shape (2, n)")
    values = value.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("an examples result holds NaN or Inf")
    if bool((values[1] < 0).any()) or not float(values[1].sum()) > 0:
        raise ValueError("an examples result needs counts >= 0 (row 1), not all zero")
    return values


def loss_of(result: float | torch.Tensor) -> float:
    """The loss of a checked :data:`LOSS` or :data:`EXAMPLES` result."""
    if isinstance(result, torch.Tensor):
        return float(result[0].sum() / result[1].sum())
    return result


def check_loss(value: object) -> float:
    """A finite loss as a float (a one-element tensor is read)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"losses must be finite numbers, got {value!r}")
    return float(value)


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Add an estimator class under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise TypeError(f"an estimator must be an Estimator subclass, got {cls!r}")
    if cls.name in ESTIMATORS and ESTIMATORS[cls.name] is not cls:
        raise ValueError(f"an estimator named {cls.name!r} is already registered")
    ESTIMATORS[cls.name] = cls
    return cls


def estimator_class(name: object) -> type[Estimator]:
    """The registered estimator ``name`` (ValueError naming the choices otherwise)."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name]
