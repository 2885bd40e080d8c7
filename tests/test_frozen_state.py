"""Frozen PIA states (EAS_SPEC §3): training and inference see the same thing.

Teacher forcing = incremental decoding and batch = single, for every role and mode on both
layouts, are in the contract (tests/contract.py, run by tests/test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from eas_kernels.patch import runtime_of
from tests.helpers import left_pad, patched, random_sequences

PROMPTS = [4, 9, 6]
ANSWERS = [5, 3, 4]


def teacher_forcing_batch(seed: int):
    """Left-padded prompt+answer rows, their real-token and prompt masks."""
    prompts = random_sequences(PROMPTS, vocab=97, seed=seed)
    answers = random_sequences(ANSWERS, vocab=97, seed=seed + 1)
    tokens, real = left_pad([p + a for p, a in zip(prompts, answers, strict=True)])
    prompt_mask = real.clone()
    for row, answer in enumerate(answers):
        prompt_mask[row, tokens.shape[1] - len(answer) :] = False
    return prompts, answers, tokens, real, prompt_mask


@pytest.mark.parametrize("skipped", [[], [0, 3]])
def test_answer_tokens_do_not_leak_into_their_own_prediction(skipped):
    model = patched(skipped, seed=12)
    _, answers, tokens, real, prompt_mask = teacher_forcing_batch(seed=21)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    with torch.no_grad():
        before = model(tokens, prompt_mask=prompt_mask, attention_mask=real)
        after = model(changed, prompt_mask=prompt_mask, attention_mask=real)
        leaky = model(tokens, attention_mask=real)  # state over all tokens (no prompt mask)
        leaky_after = model(changed, attention_mask=real)
    assert torch.equal(before[:, :-1], after[:, :-1])
    if skipped:  # the token-averaged path of a skip PIA is what would leak
        assert not torch.allclose(leaky[:, :-1], leaky_after[:, :-1])


def test_states_are_computed_over_the_prompt_and_stay_frozen():
    model = patched([2], seed=14)
    pia = model.layers[2].skip_pia
    captured = []
    capture = lambda module, args, out: captured.append(out)  # noqa: E731
    # prepend: see v = ffn_norm(x) before the skip PIA's own hook adds PIA(v)
    model.layers[2].ffn_norm.register_forward_hook(capture, prepend=True)
    tokens, real = left_pad(random_sequences([5, 7], vocab=97, seed=23))
    with torch.no_grad():
        model(tokens, start_pos=0, prompt_mask=real)
        prefill_v = captured[-1]
        expected = pia.compute_state(prefill_v, real)
        model(torch.tensor([[3], [4]]), start_pos=7)
        model(torch.tensor([[5], [6]]), start_pos=8)
    site = next(s for s in runtime_of(model).sites if s.pia is pia)
    torch.testing.assert_close(site.state.c, expected.c)
    torch.testing.assert_close(site.state.alpha, expected.alpha)


def test_decode_without_prefill_is_refused_clearly():
    model = patched([1], seed=15)
    model(torch.tensor([[1, 2, 3]]))  # training forward: no cache was written
    with pytest.raises(ValueError, match="continue a prefill"):
        model(torch.tensor([[4]]), start_pos=3)
