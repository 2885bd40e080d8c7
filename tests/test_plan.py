"""SkipPlan validation and JSON round trip."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from eas_kernels import SkipPlan


def test_defaults_sorting_and_kept():
    plan = SkipPlan(6, [4, 1])
    assert plan.skipped == (1, 4)
    assert plan.kept_mhas == (0, 2, 3, 5)
    assert (plan.skip_rank, plan.adapter_rank, plan.temperature) == (32, 8, 10.0)
    with pytest.raises(AttributeError):
        plan.skipped = (0,)


def test_json_round_trip(tmp_path):
    plan = SkipPlan(32, [19, 21, 22, 31], skip_rank=16, adapter_rank=4, temperature=5.0)
    assert SkipPlan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    assert SkipPlan.load(path) == plan
    assert hash(SkipPlan.load(path)) == hash(plan)
    assert json.loads(path.read_text())["skipped"] == [19, 21, 22, 31]
    assert SkipPlan(4, []) != SkipPlan(4, [0])
    assert copy.deepcopy(plan) == plan and pickle.loads(pickle.dumps(plan)) == plan


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((4, [4]), {}, ValueError, "out of range"),
        ((4, [-1]), {}, ValueError, "out of range"),
        ((4, [1, 1]), {}, ValueError, "duplicate"),
        ((4, [1.0]), {}, TypeError, "ints"),
        ((4, [True]), {}, TypeError, "ints"),
        ((4, "12"), {}, TypeError, "iterable"),
        ((0, []), {}, ValueError, "num_layers"),
        ((4, []), {"skip_rank": 0}, ValueError, "skip_rank"),
        ((4, []), {"adapter_rank": 2.5}, TypeError, "adapter_rank"),
        ((4, []), {"temperature": float("nan")}, ValueError, "temperature"),
        ((4, []), {"temperature": -1.0}, ValueError, "temperature"),
    ],
)
def test_invalid_plans_are_refused(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        SkipPlan(*args, **kwargs)


def test_bad_json_is_refused():
    good = json.loads(SkipPlan(4, [1]).to_json())
    with pytest.raises(ValueError, match="not valid JSON"):
        SkipPlan.from_json("{")
    with pytest.raises(TypeError, match="JSON object"):
        SkipPlan.from_json("[1, 2]")
    with pytest.raises(ValueError, match="not a SkipPlan"):
        SkipPlan.from_json(json.dumps({**good, "version": 99}))
    with pytest.raises(ValueError, match="unknown keys"):
        SkipPlan.from_json(json.dumps({**good, "extra": 1}))
    missing = dict(good)
    del missing["skip_rank"]
    with pytest.raises(ValueError, match="missing keys"):
        SkipPlan.from_json(json.dumps(missing))
    with pytest.raises(ValueError, match="out of range"):
        SkipPlan.from_json(json.dumps({**good, "skipped": [7]}))
    with pytest.raises(TypeError, match="list"):
        SkipPlan.from_json(json.dumps({**good, "skipped": 1}))
