"""The model side of the search: the cosine probe and the held-out scorer, on the LaVIN
layout and on a Hugging Face Llama."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import eas_kernels as E
from eas_kernels.search import Candidates, HeldOutScorer, Measurement, residual_cosines
from tests.helpers import tiny_model


def hf_llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def hf_loss(model: torch.nn.Module, batch: SimpleNamespace) -> torch.Tensor:
    out = model(input_ids=batch.tokens, attention_mask=batch.attention_mask)
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.tokens[:, 1:].flatten())


def hf_batch() -> SimpleNamespace:
    tokens = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :3] = False  # left padding: those tokens are not averaged
    return SimpleNamespace(tokens=tokens, attention_mask=mask)


@pytest.mark.transformers
def test_block_cosines_match_hidden_states_and_a_silent_mha_has_cosine_one():
    model = hf_llama()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    batch = hf_batch()
    with torch.no_grad():
        hidden = model(
            input_ids=batch.tokens, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states
    E.patch_hf(model, E.SkipPlan(4, [], skip_rank=4, adapter_rank=2), search="mha_or_ffn")
    patch = E.patch.patch_of(model)
    table = residual_cosines(
        patch.blocks,
        patch.layout.attention,
        patch.layout.feed_forward,
        lambda: hf_loss(model, batch),
        batch.attention_mask,
    )
    assert table.shape == (4, 3) and table.dtype == torch.float64
    for layer in range(3):  # hidden_states[-1] is after the final norm
        cosine = F.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)
        expected = cosine[batch.attention_mask].mean().double()
        torch.testing.assert_close(table[layer, 2], expected, rtol=1e-5, atol=1e-6)
    assert table[2, 0] == 1.0 and bool((table[[0, 1, 3], 0] < 0.999).all())
    # The scorer maps columns to arms: MHA arms, then FFN arms.
    scorer = HeldOutScorer(model, batch, Candidates("mha_or_ffn", 4), hf_loss)
    cosines = scorer(Measurement("cosine"))
    torch.testing.assert_close(cosines, torch.cat([table[:, 0], table[:, 1]]))
    assert E.skipped_mhas(model) == ()  # the probe skips nothing


def test_scorer_losses_are_the_models_loss_with_the_skip_set():
    model = E.patch_lavin(
        tiny_model(), E.SkipPlan(4, [], skip_rank=4, adapter_rank=2), search="block"
    )
    from eas_kernels.tuning import Example, answer_loss, collate

    batch = collate([Example((5, 6, 7, 8), (9, 10)), Example((3, 4), (11, 12))], 0)
    scorer = HeldOutScorer(model, batch, Candidates("block", 4), answer_loss)
    model.train()
    loss = scorer(Measurement("loss", (1, 3)))
    assert not model.training and E.current_plan(model).skipped_blocks == (1, 3)
    with torch.no_grad():
        assert loss == float(answer_loss(model, batch))
    with pytest.raises(ValueError, match="candidates are for 6 layers"):
        HeldOutScorer(model, batch, Candidates("block", 6), answer_loss)


def test_a_probe_that_misses_a_block_says_which_and_removes_its_hooks():
    model = tiny_model()
    blocks = list(model.layers)
    with pytest.raises(RuntimeError, match=r"blocks \[0, 1, 2, 3\] did not run"):
        residual_cosines(blocks, "attention", "feed_forward", lambda: None)

    def failing() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        residual_cosines(blocks, "attention", "feed_forward", failing)
    for block in blocks:
        assert not block._forward_pre_hooks and not block.attention._forward_hooks
        assert not block.feed_forward._forward_hooks
