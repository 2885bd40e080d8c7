"""time_models: batch-1 greedy decode timing, the models' calls interleaved step by step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eas_kernels.tuning import Example
from eas_kernels.tuning.evaluate import decode_timing, paired_ratio, time_models

VOCAB = 7


class Recorder(nn.Module):
    """Logs every call as ``(name, start_pos, tokens)``; logits favour ``(t + shift) % V``."""

    def __init__(self, name: str, log: list, shift: int) -> None:
        super().__init__()
        self.name, self.log, self.shift = name, log, shift

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, **_: object) -> torch.Tensor:
        self.log.append((self.name, start_pos, tokens[0].tolist()))
        favoured = (tokens + self.shift) % VOCAB
        return torch.nn.functional.one_hot(favoured, VOCAB).float()


def examples(count: int) -> list[Example]:
    return [Example(tuple(range(1, 3 + i)), (1,)) for i in range(count)]


def test_calls_are_interleaved_step_by_step_with_rotating_order():
    log: list = []
    models = {name: (Recorder(name, log, shift), None) for name, shift in (("a", 1), ("b", 2))}
    timings = time_models(models, examples(2), 3)
    # warm-up prompt + 2 prompts, each 1 prefill + 3 decode calls per model
    assert len(log) == 3 * 4 * 2
    turn = 0
    for prompt_index in range(3):
        for step in range(4):
            pair = log[:2]
            log = log[2:]
            expected = ["a", "b"] if turn % 2 == 0 else ["b", "a"]
            assert [call[0] for call in pair] == expected
            prompt_length = [2, 2, 3][prompt_index]  # the warm-up is the first prompt
            for _, start_pos, tokens in pair:
                if step == 0:
                    assert start_pos == 0 and len(tokens) == prompt_length
                else:
                    assert start_pos == prompt_length + step - 1 and len(tokens) == 1
            turn += 1
    for timing in timings.values():
        assert len(timing["step_ms"]) == 2 * (3 - 1)  # steps after the first, warm-up dropped
        low, high = timing["ms_per_token_iqr"]
        assert 0 < low <= timing["ms_per_token"] <= high
        assert timing["first_decode_ms"] > 0 and timing["prefill_ms"] > 0
        assert timing["mode"] is None


def test_each_model_decodes_its_own_greedy_tokens():
    log: list = []
    models = {"a": (Recorder("a", log, 1), None), "b": (Recorder("b", log, 3), None)}
    time_models(models, [Example((4, 5), (1,))], 4, warmup=False)
    for name, shift in (("a", 1), ("b", 3)):
        fed = [tokens for who, start, tokens in log if who == name and start > 0]
        expected, token = [], 5
        for _ in range(4):
            token = (token + shift) % VOCAB
            expected.append([token])
        assert fed == expected


def test_decode_timing_is_one_model_without_warm_up():
    log: list = []
    result = decode_timing(Recorder("a", log, 1), Example((1, 2, 3), (1,)), 5)
    assert len(log) == 6
    assert len(result["step_ms"]) == 4 and result["ms_per_token"] > 0


def test_paired_ratio_compares_call_by_call():
    timings = {
        "fast": {"step_ms": [1.0, 2.0, 4.0, 8.0, 16.0]},
        "slow": {"step_ms": [2.0, 2.0, 8.0, 8.0, 64.0]},
    }
    ratio = paired_ratio(timings, "slow", "fast")
    assert ratio["median"] == 2.0
    low, high = ratio["iqr"]
    assert low <= 2.0 <= high
    assert paired_ratio(timings, "fast", "fast") == {"median": 1.0, "iqr": [1.0, 1.0]}


def test_bad_timing_requests_are_refused():
    log: list = []
    model = Recorder("a", log, 1)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        time_models({"a": (model, None)}, examples(1), 1)
    with pytest.raises(ValueError, match="distinct model object"):
        time_models({"a": (model, None), "b": (model, None)}, examples(1), 2)
    with pytest.raises(ValueError, match="at least one model and one example"):
        time_models({}, examples(1), 2)
    with pytest.raises(ValueError, match="at least one model and one example"):
        time_models({"a": (model, None)}, [], 2)
    assert log == []  # refused before any call
