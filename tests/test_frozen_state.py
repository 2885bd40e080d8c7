"""Frozen PIA states (EAS_SPEC §3): training and inference see the same thing."""

from __future__ import annotations

import pytest
import torch

from eas_kernels import greedy_generate, reparameterize
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


def incremental_logits(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Logits predicting each answer token: prefill the prompt, then feed the answer."""
    with torch.no_grad():
        steps = [model(torch.tensor([prompt]), start_pos=0)[:, -1]]
        for offset, token in enumerate(answer[:-1]):
            steps.append(model(torch.tensor([[token]]), start_pos=len(prompt) + offset)[:, -1])
    return torch.cat(steps)


@pytest.mark.parametrize("mode", ["eager", "merge", "lowrank"])
@pytest.mark.parametrize("skipped", [[], [1, 2]])
def test_teacher_forced_answer_logits_equal_incremental_decoding(mode, skipped):
    model = patched(skipped, seed=11)
    reparameterize(model, mode)
    prompts, answers, tokens, real, prompt_mask = teacher_forcing_batch(seed=20)
    with torch.no_grad():
        forced = model(tokens, prompt_mask=prompt_mask, attention_mask=real)
    width = tokens.shape[1]
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        # positions whose next token is an answer token
        predicting = forced[row, width - len(answer) - 1 : width - 1]
        torch.testing.assert_close(
            incremental_logits(model, prompt, answer), predicting, rtol=1e-4, atol=1e-4
        )


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


@pytest.mark.parametrize("mode", ["eager", "lowrank", "auto"])
def test_a_batch_gives_each_example_its_alone_result(mode):
    model = patched([1, 3], seed=13)
    reparameterize(model, mode)
    prompts = random_sequences([3, 10, 6, 1], vocab=97, seed=22)
    batch = greedy_generate(model, prompts, 8)
    for row, prompt in enumerate(prompts):
        alone = greedy_generate(model, [prompt], 8)
        assert batch.tokens[row] == alone.tokens[0]
        torch.testing.assert_close(batch.logits[row], alone.logits[0], rtol=1e-4, atol=1e-4)


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
