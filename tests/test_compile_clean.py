"""A steady-state decode step compiles as cleanly as the unpatched model's (issue 15).

``torch._dynamo.explain`` on one decode step after the prefill and the first decode step
(which realises the mode; the merge is the one step allowed to break the graph, once per
example): the patched model has no more graph breaks than the unpatched one — 2 in the
LaVIN layout (the model's own token-range check, ``int(tokens.min())``), 0 with Hugging
Face. A refactor that adds a Python-side check or a host sync to the hot path fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import eas_kernels as E
from tests.helpers import patched, tiny_model


def graph_breaks(step, *args) -> int:
    dynamo.reset()
    with torch.no_grad():
        explained = dynamo.explain(step)(*args)
    dynamo.reset()
    return explained.graph_break_count


def lavin_step(model: torch.nn.Module):
    prompt = torch.randint(1, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[5]])
    with torch.no_grad():
        model(prompt, start_pos=0)
        model(token, start_pos=6)
    return lambda t: model(t, start_pos=7), token


@pytest.mark.parametrize("mode", ["merge", "eager"])
def test_lavin_layout_decode_step_breaks_no_more_than_unpatched(mode):
    unpatched = graph_breaks(*lavin_step(tiny_model(0)))
    assert unpatched == 2  # the LaVIN model's own int(tokens.min()) / int(tokens.max())
    model = E.reparameterize(patched([1], seed=2), mode)
    assert graph_breaks(*lavin_step(model)) == unpatched


@pytest.mark.transformers
@pytest.mark.parametrize("mode", ["merge", "eager"])
def test_hugging_face_decode_step_compiles_without_breaks(mode):
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from tests.test_hf import CACHE_ARGUMENT, patched_tiny, tiny_llama

    def step_of(model):
        ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{CACHE_ARGUMENT: cache})
            model(input_ids=ids[:, :1], use_cache=True, **{CACHE_ARGUMENT: cache})

        def step(token):
            return model(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: cache}).logits

        return step, ids[:, :1]

    assert graph_breaks(*step_of(tiny_llama(0).eval())) == 0
    assert graph_breaks(*step_of(E.reparameterize(patched_tiny(), mode))) == 0


def test_a_compiled_merged_model_follows_every_prompts_merge():
    """A merge swaps each target's storage (``weight.data``); a compiled model must read
    the swapped storage, not one it captured: three prompts (three different merges, each
    restored by the next prefill) decode as the eager model does."""
    model = E.reparameterize(patched([1], seed=2), "merge")
    compiled = torch.compile(model, backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    dynamo.reset()
    try:
        for _ in range(3):
            prompt = torch.randint(1, 90, (1, 6), generator=generator)
            eager, graphed = (decode_three(net, prompt) for net in (model, compiled))
            torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    finally:
        dynamo.reset()


def decode_three(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model(prompt, start_pos=0)
        steps = [model(torch.tensor([[5]]), start_pos=prompt.shape[1] + i) for i in range(3)]
    return torch.stack(steps)
