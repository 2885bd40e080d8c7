"""BanditSearch against EAS_SPEC §5: Eq. 14-16 by hand, recovery on a synthetic bandit."""

from __future__ import annotations

import math

import pytest
import torch

from eas_kernels.search import BanditSearch


def test_update_matches_eq16_by_hand():
    search = BanditSearch(4, 2, num_subnets=2, lr=0.5, temperature=2.0, seed=0)
    search._scores = torch.tensor([0.2, -0.4, 0.0, 1.0], dtype=torch.float64)
    pi = [math.exp(s / 2.0) for s in (0.2, -0.4, 0.0, 1.0)]
    pi = [p / sum(pi) for p in pi]
    losses = [1.0, 2.0]
    rewards = [math.exp(-1.0), math.exp(-2.0)]
    mean = sum(rewards) / 2
    expected = [0.2, -0.4, 0.0, 1.0]
    for skip_set, reward in zip([(0, 1), (1, 3)], rewards, strict=True):
        for i in skip_set:
            expected[i] += 0.5 * (mean - reward) * pi[i] * (1 - pi[i])
    search.update([(0, 1), (1, 3)], losses)
    torch.testing.assert_close(search.scores, torch.tensor(expected, dtype=torch.float64))
    # arm 0 was skipped by the better subnet: its preference went down, arm 3's up
    assert search.scores[0] < 0.2 and search.scores[3] > 1.0


def run_synthetic(seed: int, importance: torch.Tensor, k: int, rounds: int) -> tuple:
    search = BanditSearch(len(importance), k, num_subnets=3, lr=4.0, seed=seed)
    noise = torch.Generator().manual_seed(seed + 100)
    for _ in range(rounds):
        sets = search.propose()
        losses = [
            float(importance[list(s)].sum() + 0.05 * torch.randn(1, generator=noise)) for s in sets
        ]
        search.update(sets, losses)
    return search.plan()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recovers_the_least_important_arms(seed):
    importance = torch.tensor([0.9, 0.05, 0.7, 0.02, 0.8, 0.6, 0.01, 0.5, 0.04, 0.75, 0.65, 0.55])
    k = 4
    expected = tuple(sorted(torch.argsort(importance)[:k].tolist()))
    assert run_synthetic(seed, importance, k, rounds=400) == expected


def test_sampling_is_seeded_and_state_round_trips():
    a, b = BanditSearch(10, 3, seed=7), BanditSearch(10, 3, seed=7)
    assert [a.sample() for _ in range(5)] == [b.sample() for _ in range(5)]
    assert a.warmup_sample() == b.warmup_sample()
    a.update(a.propose(), [0.5, 1.0, 2.0])
    state = a.state_dict()
    c = BanditSearch(10, 3, seed=123)
    c.load_state_dict(state)
    torch.testing.assert_close(c.scores, a.scores)
    assert c.propose() == a.propose()
    sets = BanditSearch(6, 2, num_subnets=5, seed=1).propose()
    assert len(set(sets)) == 5 and all(len(s) == 2 for s in sets)


def test_a_peaked_policy_still_proposes_distinct_sets():
    search = BanditSearch(5, 4, num_subnets=5, seed=0)
    search._scores = torch.tensor([50.0, -50.0, -50.0, -50.0, -50.0], dtype=torch.float64)
    assert len(set(search.propose())) == 5


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((4, 4), {}, ValueError, "k must be smaller"),
        ((4, 0), {}, ValueError, "k must be a positive int"),
        ((4, -1), {}, ValueError, "k must be a positive int"),
        ((3, 2), {"num_subnets": 4}, ValueError, "distinct skip sets"),
        ((4, 2), {"lr": 0.0}, ValueError, "lr"),
        ((4, 2), {"temperature": float("nan")}, ValueError, "temperature"),
        ((4, 2), {"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_configurations_are_refused(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        BanditSearch(*args, **kwargs)


def test_bad_updates_are_refused_and_change_nothing():
    search = BanditSearch(6, 2, seed=0)
    before = search.scores
    cases = [
        (([(0, 1)], [1.0]), ValueError, "at least 2"),
        (([(0, 1), (2, 3)], [1.0]), ValueError, "one loss each"),
        (([(0, 1), (2, 6)], [1.0, 2.0]), ValueError, "out of range"),
        (([(0, 1), (2, 3, 4)], [1.0, 2.0]), ValueError, "k=2"),
        (([(0, 1), (2, 2)], [1.0, 2.0]), ValueError, "duplicate"),
        (([(0, 1), (2, 3)], [1.0, float("inf")]), ValueError, "finite"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            search.update(*args)
    torch.testing.assert_close(search.scores, before)
    with pytest.raises(ValueError, match="num_arms"):
        BanditSearch(7, 2).load_state_dict(search.state_dict())
