"""Bad input to the public API: a one-line TypeError/ValueError naming the argument, raised
before anything changes (issue 17, finding 6)."""

from __future__ import annotations

import pytest
import torch

import eas_kernels as E
from eas_kernels.patch import runtime_of
from tests.helpers import assert_bitwise, patched, structure, weights_snapshot


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([[1, 2.5, 3]], TypeError, r"prompts\[0\] must hold int token ids, got float 2\.5"),
        ([[1, True]], TypeError, r"prompts\[0\] must hold int token ids, got bool"),
        (["hello"], TypeError, r"prompts\[0\] must be a list of int token ids, got str"),
        ("hello", ValueError, "prompts must be a non-empty list"),
        ([[1, 2], []], ValueError, "prompts must be a non-empty list of non-empty token lists"),
    ],
)
def test_greedy_generate_refuses_bad_prompts(prompts, error, message):
    model = patched([1])
    E.reparameterize(model, "merge")
    weights, before = weights_snapshot(model), structure(model)
    with pytest.raises(error, match=message):
        E.greedy_generate(model, prompts, 2)
    assert_bitwise(model, weights)
    assert structure(model) == before


def test_greedy_generate_refuses_a_length_beyond_max_seq_len_before_generating():
    model = patched([1])  # max_seq_len 64
    E.reparameterize(model, "merge")
    weights = weights_snapshot(model)
    with pytest.raises(ValueError, match=r"\(10 tokens\) \+ max_new_tokens \(56\) - 1 exceeds"):
        E.greedy_generate(model, [list(range(1, 11))], 56)
    assert_bitwise(model, weights)  # nothing was merged
    assert runtime_of(model).realized is None
    assert len(E.greedy_generate(model, [list(range(1, 11))], 55).tokens[0]) == 55


@pytest.mark.parametrize(
    "labels, mask, error, message",
    [
        (torch.tensor([1, 2, 3]), None, ValueError, "labels must have 2 dimensions"),
        (torch.ones(2, 3), None, TypeError, "labels must be an integer tensor"),
        ([[1, 2]], None, TypeError, "labels must be a torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), ValueError, "shape of labels"),
    ],
)
def test_prompt_mask_from_labels_refuses_bad_shapes(labels, mask, error, message):
    with pytest.raises(error, match=message):
        E.prompt_mask_from_labels(labels, mask)


def test_kv_cache_bytes_refuses_what_is_not_a_cache():
    with pytest.raises(TypeError, match="cache must be a transformers Cache, got str"):
        E.kv_cache_bytes("x")
