"""The search's estimators (eas_kernels.search): one contract, known answers, budgets.

Synthetic problems stand in for a model: the loss of a skip set is a known function of
its arms (additive costs plus noise; or costs with a penalty for adjacent pairs), and
the cosine probe returns the arms' costs as a noisy cosine (the untuned model's probe
too, unless a problem gives its own). Each estimator must recover the set a brute-force
search over all skip sets finds.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from eas_kernels.search import (
    COSINE,
    ESTIMATORS,
    EXAMPLES,
    LOSS,
    BanditSearch,
    Estimator,
    Measurement,
    SearchSettings,
    estimator_class,
    register_estimator,
)
from eas_kernels.search.estimator import loss_of

NAMES = sorted(ESTIMATORS)


class Problem:
    """``loss(S) = 1 + Σ_{i∈S} cost_i + penalty · #{adjacent pairs in S} + noise``.

    Per example (an :data:`EXAMPLES` measurement of ``EXAMPLE_COUNT`` examples), example
    ``i``'s loss is ``loss(S) + offset_i + √n · noise · ε_i``: fixed offsets, which paired
    differences cancel, and noise whose mean over the examples has the scale ``noise``.
    """

    EXAMPLE_COUNT = 16

    def __init__(
        self,
        costs: list[float],
        *,
        penalty: float = 0.0,
        noise: float = 0.0,
        seed: int = 0,
        untuned: list[float] | None = None,
    ) -> None:
        self.costs = torch.tensor(costs, dtype=torch.float64)
        self.penalty = penalty
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = 0.5 * torch.randn(self.EXAMPLE_COUNT, generator=self.generator).double()
        self.untuned = None if untuned is None else torch.tensor(untuned, dtype=torch.float64)
        self.passes = 0

    def measure_untuned(self, measurement: Measurement) -> torch.Tensor:
        """The untuned model's cosine probe (the problem's own probe when not given)."""
        assert measurement.kind == COSINE
        if self.untuned is None:
            return self.measure(measurement)
        self.passes += 1
        return self.untuned

    def expected(self, arms: tuple[int, ...]) -> float:
        pairs = sum(1 for a in arms if a + 1 in arms)
        return 1.0 + float(self.costs[list(arms)].sum()) + self.penalty * pairs

    def measure(self, measurement: Measurement) -> float | torch.Tensor:
        self.passes += 1
        noise = self.noise * torch.randn(1, generator=self.generator, dtype=torch.float64)
        if measurement.kind == COSINE:
            scale = self.costs.max()
            return (
                1.0
                - 0.5 * self.costs / scale
                + 0.1
                * self.noise
                * torch.randn(len(self.costs), generator=self.generator, dtype=torch.float64)
            )
        if measurement.kind == EXAMPLES:
            n = self.EXAMPLE_COUNT
            noise = self.noise * n**0.5 * torch.randn(n, generator=self.generator).double()
            losses = self.expected(measurement.arms) + self.offsets + noise
            return torch.stack([losses, torch.ones(n, dtype=torch.float64)])
        return self.expected(measurement.arms) + float(noise)

    def answer(self, k: int) -> tuple[int, ...]:
        sets = itertools.combinations(range(len(self.costs)), k)
        return min(sets, key=lambda s: (self.expected(s), s))


def untuned(estimator: Estimator, problem: Problem) -> Estimator:
    """Give ``estimator`` the untuned model's probes it asks for (as a tuner does before
    its first training step)."""
    if probes := estimator.untuned_probes():
        estimator.tell_untuned(probes, [problem.measure_untuned(m) for m in probes])
    return estimator


def run(estimator: Estimator, problem: Problem) -> tuple[int, ...]:
    untuned(estimator, problem)
    while round := estimator.ask():
        estimator.tell(round, [problem.measure(m) for m in round])
    return estimator.plan()


def make(name: str, num_arms: int, k: int, **kwargs: object) -> Estimator:
    """An estimator; the bandits, which have no training phase here to schedule rounds
    for, get 1,200 passes (400 rounds of the paper's 3 subnets, 150 of 8)."""
    subnets = 3 if name == "paper" else 8
    settings = SearchSettings(scheduled_rounds=kwargs.pop("rounds", 1200 // subnets))
    seed = kwargs.pop("seed", 0)
    return estimator_class(name)(num_arms, k, seed=seed, settings=settings, **kwargs)


ADDITIVE = [0.9, 0.2, 1.4, 0.05, 1.1, 0.7, 0.15, 1.3, 0.8, 0.1, 1.2, 0.6]
PAIRED = [0.9, 0.8, 1.0, 0.02, 0.25, 1.1, 0.27, 1.2, 0.9, 0.3, 1.0, 0.7]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_additive_costs_with_noise_are_recovered(name, seed):
    problem = Problem(ADDITIVE, noise=0.05, seed=seed)
    assert problem.answer(4) == (1, 3, 6, 9)
    assert run(make(name, 12, 4, seed=seed), problem) == (1, 3, 6, 9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["bandit", "greedy", "paper", "portfolio", "stable"])
def test_interactions_between_adjacent_arms_are_recovered(name, seed):
    # Arms 3 and 4 are the cheapest alone but cost 1.5 more together: the best set of
    # 3 takes arm 3 and the next cheapest arms after 4.
    problem = Problem(PAIRED, penalty=1.5, noise=0.01, seed=seed)
    assert problem.answer(3) == (3, 6, 9)
    assert run(make(name, 12, 3, seed=seed), problem) == (3, 6, 9)


def test_leave_one_out_and_the_prior_cannot_see_interactions():
    assert run(make("loo", 12, 3), Problem(PAIRED, penalty=1.5)) == (3, 4, 6)  # the pair
    assert run(make("cosine", 12, 3), Problem(PAIRED, penalty=1.5)) == (3, 4, 6)


@pytest.mark.parametrize("budget", [12, 20, 31, 47, 200])
@pytest.mark.parametrize("name", NAMES)
def test_budgets_are_respected_and_counted(name, budget):
    if budget < make(name, 12, 4, budget=200).min_budget():  # stable's untuned probe: 13
        with pytest.raises(ValueError, match=f"{name} estimator needs a search_budget"):
            make(name, 12, 4, budget=budget)
        return
    problem = Problem(ADDITIVE, noise=0.05)
    estimator = make(name, 12, 4, budget=budget)
    plan = run(estimator, problem)
    assert estimator.passes == problem.passes <= budget
    assert len(plan) == 4 and estimator.ask() == []  # finished stays finished
    if name in ("greedy", "loo", "cosine", "stable"):
        assert plan == (1, 3, 6, 9)


def test_greedy_shares_its_budget_over_its_rounds():
    estimator = make("greedy", 12, 4, budget=30)
    rounds = []
    problem = Problem(ADDITIVE)
    while round := estimator.ask():
        rounds.append(len(round))
        estimator.tell(round, [problem.measure(m) for m in round])
    assert rounds == [12, 6, 6, 6]
    assert make("greedy", 12, 4).budget == 2 * 12  # first round + 12 passes for the rest
    assert make("greedy", 12, 2).budget == 12 + 11  # the full greedy when that is less


def test_default_budgets():
    settings = SearchSettings(scheduled_rounds=25)
    assert ESTIMATORS["paper"](30, 8, settings=settings).budget == 75  # today's demo
    assert ESTIMATORS["bandit"](30, 8, settings=settings).budget == 1 + 25 * 8
    assert ESTIMATORS["loo"](30, 8).budget == 30
    assert ESTIMATORS["portfolio"](30, 8).budget == ESTIMATORS["greedy"](30, 8).budget == 60
    assert ESTIMATORS["stable"](30, 8).budget == 60
    assert ESTIMATORS["cosine"](30, 8).budget == 1
    four = SearchSettings(num_subnets=4, scheduled_rounds=5)
    assert ESTIMATORS["paper"](30, 8, settings=four).budget == 20


def test_paper_is_eq16_exactly():
    """The ``paper`` estimator proposes, samples and updates as BanditSearch (Eq. 14-16)."""
    estimator = make("paper", 10, 3, seed=5)
    reference = BanditSearch(10, 3, seed=5)
    problem = Problem(ADDITIVE[:10], noise=0.1)
    for _ in range(6):
        assert estimator.training_arms() == reference.sample()
        round = estimator.ask()
        assert [m.arms for m in round] == reference.propose()
        losses = [problem.measure(m) for m in round]
        estimator.tell(round, losses)
        reference.update([m.arms for m in round], losses)
        assert torch.equal(estimator.importance(), reference.scores)
    assert estimator.plan() == reference.plan()


def test_bandit_update_is_the_z_scored_all_arm_step():
    estimator = make("bandit", 6, 2, seed=0)
    prior = estimator.ask()
    assert prior == [Measurement(COSINE)]
    cosines = torch.tensor([0.9, 0.5, 0.7, 0.99, 0.6, 0.8], dtype=torch.float64)
    estimator.tell(prior, [cosines])
    importance = 1 - cosines
    expected = (importance - importance.mean()) / importance.std(unbiased=False)
    torch.testing.assert_close(estimator.importance(), expected)
    round = estimator.ask()
    assert len(round) == 8 and len({m.arms for m in round}) == 8
    losses = [1.0 + 0.1 * i for i in range(8)]
    estimator.tell(round, losses)
    values = torch.tensor(losses, dtype=torch.float64)
    advantages = (values - values.mean()) / values.std(unbiased=False)
    for measurement, advantage in zip(round, advantages, strict=True):
        for arm in measurement.arms:
            expected[arm] += advantage / 8
    torch.testing.assert_close(estimator.importance(), expected)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_mid_search_continues_identically(name):
    problem = Problem(ADDITIVE, noise=0.05, seed=4)
    estimator = untuned(make(name, 12, 4, seed=9), problem)
    round = estimator.ask()
    estimator.tell(round, [problem.measure(m) for m in round])
    state = copy.deepcopy(estimator.state_dict())
    resumed = make(name, 12, 4, seed=123)  # another seed: the state must carry the generator
    resumed.load_state_dict(state)
    twin = copy.deepcopy(problem)
    assert run(resumed, twin) == run(estimator, problem)
    assert resumed.passes == estimator.passes
    assert torch.equal(resumed.importance(), estimator.importance())


@pytest.mark.parametrize("name", NAMES)
def test_state_of_another_configuration_is_refused(name):
    state = make(name, 12, 4).state_dict()
    with pytest.raises(ValueError, match="state is for k=4"):
        make(name, 12, 3).load_state_dict(state)
    other = "loo" if name != "loo" else "greedy"
    with pytest.raises(ValueError, match="state is for estimator="):
        make(other, 12, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="passes"):
        make(name, 12, 4).load_state_dict({**state, "passes": 10**6})


@pytest.mark.parametrize("name", NAMES)
def test_bad_results_are_refused_before_anything_changes(name):
    estimator = untuned(make(name, 12, 4), Problem(ADDITIVE))
    round = estimator.ask()
    before = copy.deepcopy(estimator.state_dict())
    if round[0].kind == LOSS:
        bad = [float("nan")] * len(round)
    elif round[0].kind == EXAMPLES:
        bad = [torch.tensor([[1.0, float("nan")], [1.0, 1.0]])] * len(round)
    else:
        bad = [torch.full((12,), float("inf"))]
    with pytest.raises(ValueError, match="NaN|finite"):
        estimator.tell(round, bad)
    with pytest.raises(ValueError, match="one result per measurement"):
        estimator.tell(round, [])
    after = estimator.state_dict()
    assert after["passes"] == before["passes"] and after["rounds"] == before["rounds"]


@pytest.mark.parametrize("name", NAMES)
def test_every_plan_has_k_arms_at_any_time(name):
    estimator = make(name, 12, 5)
    assert len(estimator.plan()) == 5  # before any measurement
    assert len(estimator.training_arms()) == 5
    problem = Problem(ADDITIVE)
    untuned(estimator, problem)
    while round := estimator.ask():
        estimator.tell(round, [problem.measure(m) for m in round])
        assert len(estimator.plan()) == 5 and len(estimator.training_arms()) == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "greedy", "budget": 11}, ValueError, "greedy estimator needs a search_budget"),
        ({"name": "loo", "budget": 5}, ValueError, "at least 12"),
        ({"name": "cosine", "budget": 0}, ValueError, "at least 1"),
        ({"name": "paper", "budget": -1}, ValueError, "search_budget must be an int >= 0"),
        ({"name": "paper", "budget": True}, ValueError, "search_budget"),
        ({"name": "bandit", "k": 12}, ValueError, "k must be smaller than num_arms"),
        ({"name": "bandit", "k": 0}, ValueError, "k must be a positive int"),
        ({"name": "nope"}, ValueError, "estimator must be one of"),
    ],
)
def test_bad_configurations_are_refused(kwargs, error, message):
    name, k = kwargs.pop("name"), kwargs.pop("k", 4)
    with pytest.raises(error, match=message):
        estimator_class(name)(12, k, **kwargs)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="num_subnets must be at least 2"):
        SearchSettings(num_subnets=1).validate()
    with pytest.raises(ValueError, match="policy_temperature"):
        SearchSettings(temperature=float("inf")).validate()
    with pytest.raises(TypeError, match="settings must be a SearchSettings"):
        estimator_class("paper")(12, 4, settings={"lr": 1})


def test_a_new_estimator_is_one_class_and_one_registration():
    class Fixed(Estimator):
        name = "fixed-test"
        summary = "skips the first k arms"

        def default_budget(self) -> int:
            return 0

        def _propose(self, remaining: int) -> list[Measurement]:
            return []

        def importance(self) -> torch.Tensor:
            return torch.arange(self.num_arms, dtype=torch.float64)

        def _state(self) -> dict:
            return {}

        def _load(self, state: dict) -> None:
            pass

    try:
        register_estimator(Fixed)
        assert estimator_class("fixed-test")(8, 3).plan() == (0, 1, 2)
        with pytest.raises(ValueError, match="already registered"):
            register_estimator(type("Other", (Fixed,), {}))
    finally:
        ESTIMATORS.pop("fixed-test", None)
    with pytest.raises(TypeError, match="Estimator subclass"):
        register_estimator(object)


@pytest.mark.parametrize("name", NAMES)
def test_a_real_model_with_redundant_mhas_by_construction(name):
    """MHAs 1 and 4 of a tiny 6-layer model write nothing (``wo = 0``); scored by the
    distance to the unpatched model's logits, skipping them (PIAs at their zero init)
    costs nothing and any other MHA costs something, and their input/output cosine is
    exactly 1. Every estimator, run by the tuner, must skip exactly those two."""
    from eas_kernels import SkipPlan, patch_lavin
    from eas_kernels.tuning import EASTuner, Example, TuningConfig
    from tests.helpers import tiny_model

    base = tiny_model(seed=2, n_layers=6)
    with torch.no_grad():
        for index in (1, 4):
            base.layers[index].attention.wo.weight.zero_()
    reference = copy.deepcopy(base)
    model = patch_lavin(base, SkipPlan(6, [], skip_rank=4, adapter_rank=2), search="mha")

    def distance(m: torch.nn.Module, batch: object, per_example: bool = False) -> torch.Tensor:
        logits = m(batch.tokens, **batch.model_kwargs())
        with torch.no_grad():
            target = reference(batch.tokens, **batch.model_kwargs())
        squares = (logits - target).pow(2).flatten(1)
        if per_example:  # (2, B): each example's summed squares and their count
            return torch.stack([squares.sum(1), torch.full_like(squares[:, 0], squares.shape[1])])
        return squares.mean()

    generator = torch.Generator().manual_seed(0)
    data = [
        Example(tuple(torch.randint(1, 90, (6,), generator=generator).tolist()), (5, 6))
        for _ in range(12)
    ]
    budget = {"paper": 600, "bandit": 600}.get(name)
    config = TuningConfig(
        k=2,
        estimator=name,
        search_budget=budget,
        warmup_epochs=1,
        search_epochs=0,  # every round after the warm-up, back to back
        finetune_epochs=0,
        batch_size=4,
        lr=1e-9,  # the PIAs stay at their zero init
        seed=0,
    )
    result = EASTuner(model, data[:8], data[8:], config, pad_id=0, loss_fn=distance).run()
    assert result.plan.skipped == (1, 4)
    assert 0 < result.search_passes <= (budget or 10**9)


class Trap(Problem):
    """Arm 0 is the cheapest alone but costs 2 more with any other arm skipped; the
    cosine probe (``cosines``) points at arms 1–3 instead."""

    def __init__(self, cosines: list[float]) -> None:
        super().__init__([0.0, 0.1, 0.1, 0.1, 0.5, 0.6, 0.7, 0.8])
        self.cosines = torch.tensor(cosines, dtype=torch.float64)

    def expected(self, arms: tuple[int, ...]) -> float:
        return super().expected(arms) + (2.0 if 0 in arms and len(arms) > 1 else 0.0)

    def measure(self, measurement: Measurement) -> float | torch.Tensor:
        if measurement.kind == COSINE:
            self.passes += 1
            return self.cosines
        return super().measure(measurement)


PROBE_POINTS_AT_1_2_3 = [0.5, 0.99, 0.98, 0.97, 0.6, 0.5, 0.4, 0.3]


def test_portfolio_keeps_a_rival_plan_that_beats_greedys_on_the_held_out_batch():
    """Greedy (and leave-one-out) take the trap arm 0 first and end at {0, 1, 2}; the
    prior's plan {1, 2, 3} scores lower, and the portfolio's check keeps it."""
    assert run(make("greedy", 8, 3), Trap(PROBE_POINTS_AT_1_2_3)) == (0, 1, 2)
    assert run(make("loo", 8, 3), Trap(PROBE_POINTS_AT_1_2_3)) == (0, 1, 2)
    problem = Trap(PROBE_POINTS_AT_1_2_3)
    estimator = make("portfolio", 8, 3)
    rounds = []
    while round := estimator.ask():
        rounds.append(round)
        estimator.tell(round, [problem.measure(m) for m in round])
    assert estimator.plan() == (1, 2, 3) == problem.answer(3)
    assert Measurement(COSINE) in rounds[0] and len(rounds[0]) == 8 + 1
    # the check scored the prior's plan: greedy's was scored by its last round, and
    # leave-one-out's is the same set
    assert rounds[-1] == [Measurement(LOSS, (1, 2, 3))]
    assert estimator.passes == problem.passes <= estimator.budget == 2 * 8
    assert estimator.ask() == []
    assert set(estimator.importance().argsort()[:3].tolist()) == {1, 2, 3}


def test_portfolio_keeps_greedys_plan_when_it_is_the_best():
    problem = Trap([0.99, 0.5, 0.5, 0.5, 0.98, 0.97, 0.4, 0.3])  # the probe points at 0, 4, 5
    estimator = make("portfolio", 8, 3)
    plan = run(estimator, problem)
    assert plan == (0, 1, 2)
    assert estimator.scored_plans[(0, 4, 5)] > estimator.scored_plans[(0, 1, 2)]


def test_portfolio_resumed_before_its_check_gives_the_same_plan():
    problem = Trap(PROBE_POINTS_AT_1_2_3)
    estimator = make("portfolio", 8, 3, seed=4)
    while len(estimator.chosen) < 3:
        round = estimator.ask()
        estimator.tell(round, [problem.measure(m) for m in round])
    resumed = make("portfolio", 8, 3, seed=99)
    resumed.load_state_dict(copy.deepcopy(estimator.state_dict()))
    assert run(resumed, copy.deepcopy(problem)) == run(estimator, problem) == (1, 2, 3)
    state = estimator.state_dict()
    for entry, message in (
        ({"scored_plans": [[[0, 1], 1.0]]}, "not k arms"),
        ({"scored_plans": [[[0, 1, 2], float("nan")]]}, "finite"),
        ({"scored_plans": "x"}, "list of"),
        ({"singles": torch.zeros(3)}, "singles"),
    ):
        with pytest.raises(ValueError, match=message):
            make("portfolio", 8, 3).load_state_dict({**state, **entry})


# ---------------------------------------------------------------- stable: ties and prior
CLOSE = [0.1] * 6 + [1.0, 1.1, 1.2, 1.3]  # arms 0-5 equally cheap
PRIOR_POINTS_AT_1_3_5 = [0.90, 0.99, 0.91, 0.98, 0.92, 0.97, 0.5, 0.4, 0.3, 0.2]


def supernet(seed: int, noise: float = 0.05) -> Problem:
    """Seed ``seed``'s supernet: CLOSE's costs, moved by a seed-dependent 0.01 each (the
    warm-up), with noisy held-out batches; its untuned model is the same for every seed."""
    warmup = torch.Generator().manual_seed(seed)
    moved = torch.tensor(CLOSE) + 0.01 * torch.randn(10, generator=warmup)
    return Problem(moved.tolist(), noise=noise, seed=seed, untuned=PRIOR_POINTS_AT_1_3_5)


def jaccard(plans: list[tuple[int, ...]]) -> float:
    pairs = list(itertools.combinations(plans, 2))
    return sum(len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in pairs) / len(pairs)


def test_stable_gives_the_seeds_the_plan_the_prior_prefers_among_ties():
    """Arms 0-5 cost the same up to the warm-up's and the held-out batch's noise on every
    seed's supernet: ``portfolio`` picks a seed-dependent three of them (Jaccard 0.36 over
    10 seeds), ``stable`` the prior's three on every seed (its greedy rounds alone, ties
    taken round by round, reach them on 7 of 10; the check's rival, the prior's plan, on
    all)."""
    portfolio = [run(make("portfolio", 10, 3, seed=s), supernet(s)) for s in range(10)]
    stable = [run(make("stable", 10, 3, seed=s), supernet(s)) for s in range(10)]
    assert all(set(plan) <= set(range(6)) for plan in portfolio)
    assert stable == [(1, 3, 5)] * 10 and jaccard(portfolio) < 0.5


def test_stable_keeps_what_the_held_out_batch_decides():
    """An arm cheaper beyond the noise wins over the prior's choice; with tie_se = 0 no
    choice goes to the prior: every round adds its lowest arm, the check keeps the lowest
    plan (as portfolio)."""
    costs = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9]
    problem = Problem(costs, noise=0.01, untuned=[0.1, 0.99, 0.98, 0.5, 0.4, 0.3])
    assert run(make("stable", 6, 2), problem) == (0, 1)
    problem = supernet(1)
    none = untuned(make("stable", 10, 3, seed=1), problem)
    none.settings = SearchSettings(tie_se=0.0)
    lowest = []
    while round := none.ask():
        results = [problem.measure(m) for m in round]
        if len(none.chosen) < 3:  # a greedy round: its lowest loss is the arm it adds
            pairs = zip(round, results, strict=True)
            losses = {m.arms: loss_of(r) for m, r in pairs if m.kind == EXAMPLES}
            lowest.append(min(losses, key=losses.get))
        none.tell(round, results)
        assert len(lowest) == len(none.chosen) == len(set(none.chosen))
        assert set(lowest[-1]) - set(none.chosen[:-1]) == {none.chosen[-1]}
    assert none.plan() == min(none.scored_plans, key=lambda p: loss_of(none.scored_plans[p]))


def test_stable_measures_the_untuned_model_first_and_counts_it():
    estimator = make("stable", 12, 4)
    assert estimator.untuned_probes() == [Measurement(COSINE)]
    with pytest.raises(RuntimeError, match="untuned model's probe first"):
        estimator.ask()
    with pytest.raises(ValueError, match="round must be untuned_probes"):
        estimator.tell_untuned([Measurement(LOSS, (1,))], [1.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        estimator.tell_untuned([Measurement(COSINE)], [torch.full((12,), float("nan"))])
    problem = Problem(ADDITIVE, noise=0.05)
    untuned(estimator, problem)
    assert estimator.passes == 1 and estimator.rounds == 0 and estimator.untuned_probes() == []
    first = estimator.ask()
    assert {m.kind for m in first} == {EXAMPLES, COSINE} and len(first) == 12 + 1
    assert run(estimator, problem) == (1, 3, 6, 9)
    assert estimator.passes == problem.passes <= estimator.budget


def test_paired_standard_error():
    from eas_kernels.search import paired_se

    a = torch.tensor([[2.0, 4.0, 9.0, 1.0], [1.0, 2.0, 3.0, 0.0]])  # means 2, 2, 3; one empty
    b = torch.tensor([[1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 0.0]])  # means 1, 1, 1
    expected = torch.tensor([1.0, 1.0, 2.0]).std().item() / 3**0.5
    assert paired_se(a, b) == pytest.approx(expected)
    assert paired_se(a[:, :1], b[:, :1]) == 0.0  # one example: no spread to estimate
    with pytest.raises(ValueError, match="same examples"):
        paired_se(a, torch.ones(2, 4))


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (torch.ones(3), r"shape \(2, n\)"),
        (torch.tensor([[1.0, 2.0], [0.0, 0.0]]), "not all zero"),
        (torch.tensor([[1.0, 2.0], [1.0, -1.0]]), "counts >= 0"),
        ([[1.0], [1.0]], r"shape \(2, n\)"),
    ],
)
def test_bad_examples_results_are_refused(result, message):
    estimator = untuned(make("stable", 12, 4), Problem(ADDITIVE))
    round = estimator.ask()
    with pytest.raises(ValueError, match=message):
        estimator.tell(round, [result] * len(round))
    assert estimator.rounds == 0 and estimator.passes == 1


def test_stable_state_holds_the_prior_and_each_plans_examples():
    problem = supernet(2)
    estimator = untuned(make("stable", 10, 3, seed=2), problem)
    while len(estimator.chosen) < 3:
        round = estimator.ask()
        estimator.tell(round, [problem.measure(m) for m in round])
    resumed = make("stable", 10, 3, seed=7)
    resumed.load_state_dict(copy.deepcopy(estimator.state_dict()))
    assert resumed.untuned_probes() == []
    assert resumed.scored_plans.keys() == estimator.scored_plans.keys()
    for arms, examples in estimator.scored_plans.items():  # per example, not just the means
        assert torch.equal(resumed.scored_plans[arms], examples)
    assert run(resumed, copy.deepcopy(problem)) == run(estimator, problem) == (1, 3, 5)
    state = estimator.state_dict()
    for entry, message in (
        ({"scored_plans": [[[0, 1, 2], 1.5]]}, r"\[0, 1, 2\]: an examples result .* \(2, n\)"),
        ({"scored_plans": [[[0, 1, 2], torch.zeros(2, 16)]]}, "counts >= 0"),
        ({"untuned": torch.zeros(3)}, "untuned"),
    ):
        with pytest.raises(ValueError, match=message):
            make("stable", 10, 3).load_state_dict({**state, **entry})
