"""``reparameterize(model, "auto")``: the mode per prompt from the answer length and the
costs measured on the machine (eas_kernels/auto.py; issue 20)."""

from __future__ import annotations

import math

import pytest
import torch

import eas_kernels as E
from eas_kernels import auto
from eas_kernels.auto import ModeCosts, choose_mode
from eas_kernels.patch import runtime_of
from tests.helpers import assert_bitwise, patched, random_sequences, structure, weights_snapshot

COSTS = ModeCosts(eager_step=1.0, merge=10.0, lowrank_setup=4.0, lowrank_step=0.5)


# ---------------------------------------------------------------------- the rule
def test_unknown_lengths_assume_a_long_answer_and_no_step_needs_nothing():
    assert choose_mode(None, 1, None) == "merge"
    assert choose_mode(None, 4, None) == "lowrank"
    assert choose_mode(0, 1, COSTS) == "eager" and choose_mode(0, 3, None) == "eager"
    with pytest.raises(ValueError, match="needs the measured costs"):
        choose_mode(3, 1, None)


@pytest.mark.parametrize(
    ("steps", "batch", "expected"),
    [
        (1, 1, "eager"),  # eager 1, lowrank 4.5, merge 10
        (7, 1, "eager"),  # eager 7, lowrank 7.5
        (8, 1, "lowrank"),  # eager 8 = lowrank 8: the tie goes to lowrank
        (9, 1, "lowrank"),  # eager 9, lowrank 8.5, merge 10
        (12, 1, "merge"),  # lowrank 10 = merge 10: merge first
        (13, 1, "merge"),
        (13, 2, "lowrank"),  # merge is for batch 1 only
        (1000, 8, "lowrank"),
    ],
)
def test_the_cheapest_mode_wins_at_the_boundaries(steps, batch, expected):
    assert choose_mode(steps, batch, COSTS) == expected


def test_ties_go_to_merge_then_lowrank_then_eager():
    tie = ModeCosts(eager_step=1.0, merge=5.0, lowrank_setup=0.0, lowrank_step=1.0)
    assert choose_mode(5, 1, tie) == "merge"  # 5 = 5 = 5
    assert choose_mode(5, 2, tie) == "lowrank"  # 5 = 5
    assert choose_mode(4, 1, tie) == "lowrank"  # lowrank 4 = eager 4 < merge 5
    assert choose_mode(2, 1, ModeCosts(1.0, math.inf, 5.0, 0.0)) == "eager"


# ---------------------------------------------------------------------- the runtime
def forced_costs(monkeypatch, costs: ModeCosts) -> list[tuple[int, int | None]]:
    """Make measure_costs return ``costs``; record (batch size, decode steps) per call."""
    calls = []

    def measure(runtime, batch_size):
        calls.append((batch_size, runtime.decode_steps))
        return costs

    monkeypatch.setattr(E.runtime, "measure_costs", measure)
    return calls


@pytest.mark.parametrize(("new_tokens", "expected"), [(1, None), (3, "eager"), (11, "lowrank")])
def test_greedy_generate_tells_auto_the_answer_length(monkeypatch, new_tokens, expected):
    model = patched([1], seed=40)
    calls = forced_costs(monkeypatch, COSTS)
    E.reparameterize(model, "auto")
    prompts = random_sequences([5, 7], vocab=97, seed=41)
    generated = E.greedy_generate(model, prompts, new_tokens)
    runtime = runtime_of(model)
    if expected is None:  # one token: the prefill gives it, no decode step
        assert runtime.auto_choice is None and calls == []
        return
    assert runtime.auto_choice.mode == expected and runtime.realized == expected
    assert runtime.auto_choice.decode_steps == new_tokens - 1 and calls == [(2, new_tokens - 1)]
    assert runtime.decode_steps is None  # the generation's expectation ends with it
    E.reparameterize(model, "eager")
    assert E.greedy_generate(model, prompts, new_tokens).tokens == generated.tokens


def test_costs_are_measured_once_per_batch_size_and_skip_set(monkeypatch):
    model = patched([1], search=True, seed=42)
    calls = forced_costs(monkeypatch, COSTS)
    E.reparameterize(model, "auto")
    for prompts in ([[3, 4, 5]], [[6, 7]], [[3, 4], [5, 6, 7]], [[8, 9]]):
        E.greedy_generate(model, prompts, 14)
    assert calls == [(1, 13), (2, 13)]
    assert runtime_of(model).auto_choice.mode == "merge"  # 13 steps: lowrank 10.5 > merge 10
    E.set_skipped(model, [2])
    E.greedy_generate(model, [[3, 4, 5]], 14)
    assert calls[-1] == (1, 13) and len(calls) == 3


def test_an_unknown_length_keeps_the_long_answer_rule(monkeypatch):
    model = patched([1], seed=43)
    calls = forced_costs(monkeypatch, COSTS)
    E.reparameterize(model, "auto")
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]), start_pos=0)
        model(torch.tensor([[6]]), start_pos=3)
    assert runtime_of(model).auto_choice.mode == "merge" and calls == []
    with E.expected_new_tokens(model, 2), torch.no_grad():  # a loop of one's own
        model(torch.tensor([[3, 4, 5]]), start_pos=0)
        model(torch.tensor([[6]]), start_pos=3)
    assert runtime_of(model).auto_choice.mode == "eager" and calls == [(1, 1)]


def test_expected_new_tokens_is_validated_and_restored():
    model = patched([1], seed=44)
    runtime = runtime_of(model)
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="count must be an int >= 1 or None"):
            with E.expected_new_tokens(model, bad):
                pass
    with E.expected_new_tokens(model, 5):
        with E.expected_new_tokens(model, None):
            assert runtime.decode_steps is None
        assert runtime.decode_steps == 4
    assert runtime.decode_steps is None
    with pytest.raises(TypeError, match="not patched"):
        with E.expected_new_tokens(torch.nn.Linear(2, 2), 3):
            pass


@pytest.mark.parametrize("batch", [1, 3])
def test_measuring_the_costs_leaves_the_model_as_it_was(batch):
    """The real measurement: every cost positive and finite (merge only at batch 1), and
    the weights, hooks and phase unchanged; decoding then equals eager decoding."""
    model = patched([1, 2], seed=45)
    E.reparameterize(model, "auto")
    prompts = random_sequences([4, 6, 5][:batch], vocab=97, seed=46)
    pristine, shape = weights_snapshot(model), structure(model)
    runtime = runtime_of(model)
    with torch.no_grad():
        E.reparameterize(model, "eager")
        E.greedy_generate(model, prompts, 1)  # frozen states of this batch, no decode step
        costs = auto.measure_costs(runtime, batch)
    assert costs.eager_step > 0 and costs.lowrank_setup > 0 and costs.lowrank_step > 0
    assert math.isinf(costs.merge) if batch > 1 else 0 < costs.merge < math.inf
    assert runtime.realized is None and structure(model) == shape
    assert_bitwise(model, pristine)
    E.reparameterize(model, "auto")
    chosen = E.greedy_generate(model, prompts, 6)
    E.reparameterize(model, "eager")
    eager = E.greedy_generate(model, prompts, 6)
    assert chosen.tokens == eager.tokens
    torch.testing.assert_close(chosen.logits, eager.logits, rtol=1e-4, atol=1e-4)


def test_hf_generate_tells_auto_its_max_new_tokens(monkeypatch):
    pytest.importorskip("transformers")
    from tests.test_hf import patched_tiny

    model = patched_tiny()
    calls = forced_costs(monkeypatch, COSTS)
    E.reparameterize(model, "auto")
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls == [(1, 3)] and runtime_of(model).auto_choice.mode == "eager"
    model.generation_config.max_new_tokens = 20
    model.generate(ids, do_sample=False)
    assert runtime_of(model).auto_choice.mode == "merge"  # 19 steps
