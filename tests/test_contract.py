"""The EAS contract (tests/contract.py) on both block layouts: the LaVIN layout
(``patch_lavin``, ``greedy_generate``) and a tiny Hugging Face ``LlamaForCausalLM``
(``patch_hf``, ``generate``)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import eas_kernels as E
from eas_kernels.models.convert import lavin_from_hf
from tests.contract import (
    CASES,
    NUM_LAYERS,
    VOCAB,
    LayoutContract,
    is_pia_parameter,
)
from tests.helpers import left_pad, random_sequences, tiny_model


class TestLavinContract(LayoutContract):
    """LaVIN / Meta LLaMA layout: ``eas_kernels.models.lavin.Transformer`` (dim 48)."""

    def base_model(self, seed: int) -> nn.Module:
        return tiny_model(seed)

    def patch(self, model, plan, search):
        return E.patch_lavin(model, plan, search=search)

    def unpatch(self, model):
        return E.unpatch(model)

    def forced_logits(self, model, tokens, real, prompt):
        with torch.no_grad():
            return model(tokens, prompt_mask=prompt, attention_mask=real)

    def decode(self, model, prompts, steps):
        generation = E.greedy_generate(model, prompts, steps)
        return generation.tokens, generation.logits

    def blocks(self, model):
        return list(model.layers)

    def attention_targets(self, block):
        return (block.attention.wq, block.attention.wk, block.attention.wv)

    def ffn_targets(self, block):
        return (block.feed_forward.w1, block.feed_forward.w3)

    def reference_model(self, model):
        return model


# What this transformers release calls the cache argument (past_key_values up to 5.23,
# cache from 5.24)
CACHE_ARGUMENT = next(
    name
    for name in ("cache", "past_key_values")
    if name in inspect.signature(LlamaForCausalLM.forward).parameters
)


def hf_positions(real: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, as ``generate()`` gives a left-padded batch."""
    return (real.long().cumsum(dim=1) - 1).clamp(min=0)


@pytest.mark.transformers
class TestHFContract(LayoutContract):
    """Hugging Face layout: a tiny ``LlamaForCausalLM`` of the LaVIN model's shape, decoded
    with ``generate()``. Its spec reference is the LaVIN-layout model converted from the
    same weights (``eas_kernels.models.convert.lavin_from_hf``) with the same PIAs."""

    def base_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = LlamaConfig(
            hidden_size=48,
            intermediate_size=128,  # Meta's rule for d=48, multiple_of=32 (convertible)
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,  # generate() never stops early
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # logits of order 1 and norms with non-trivial gains
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.uniform_(0.5, 1.5)
                else:
                    parameter.normal_(0.0, 0.1)
        return model.eval()

    def patch(self, model, plan, search):
        return E.patch_hf(model, plan, search=search)

    def unpatch(self, model):
        return E.unpatch_hf(model)

    def forced_logits(self, model, tokens, real, prompt):
        labels = torch.where(real & ~prompt, tokens, -100)  # the prompt: before the 1st label
        with torch.no_grad():
            return model(
                tokens, attention_mask=real.long(), position_ids=hf_positions(real), labels=labels
            ).logits

    def decode(self, model, prompts, steps):
        tokens, real = left_pad(prompts)
        with torch.no_grad():
            out = model.generate(
                input_ids=tokens,
                attention_mask=real.long(),
                max_new_tokens=steps,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        return out.sequences[:, tokens.shape[1] :].tolist(), torch.stack(out.logits, dim=1)

    def blocks(self, model):
        return list(model.model.layers)

    def attention_targets(self, block):
        return (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj)

    def ffn_targets(self, block):
        return (block.mlp.gate_proj, block.mlp.up_proj)

    def reference_model(self, model):
        twin = copy.deepcopy(model)
        pias = {k: v for k, v in twin.state_dict().items() if is_pia_parameter(k)}
        E.unpatch_hf(twin)
        converted = lavin_from_hf(twin, max_seq_len=64)
        E.patch_lavin(converted, E.current_plan(model))
        # the active PIAs (a search patch holds those of every candidate role too)
        state = {k: pias[f"model.{k}"] for k in converted.state_dict() if is_pia_parameter(k)}
        assert not converted.load_state_dict(state, strict=False).unexpected_keys
        return converted

    # ------------------------------------------------------------------ HF only
    @pytest.mark.parametrize("mode", ["eager", "merge", "lowrank"])
    @pytest.mark.parametrize("case", CASES)
    def test_generate_equals_a_forward_loop_with_a_dynamic_cache(self, case, mode):
        """The contract decodes with ``generate()``; a plain forward loop passing a
        ``DynamicCache`` (prefill, then one token per call) is the same decoding."""
        model, _ = self.patched(case, seed=70)
        E.reparameterize(model, mode)
        prompts = random_sequences([5] if mode == "merge" else [5, 8], vocab=VOCAB, seed=71)
        expected_tokens, expected_logits = self.decode(model, prompts, 4)
        tokens, real = left_pad(prompts)
        mask, positions = real.long(), hf_positions(real)
        cache, steps = DynamicCache(), []
        with torch.no_grad():
            for _ in range(4):
                logits = model(
                    tokens, attention_mask=mask, position_ids=positions, **{CACHE_ARGUMENT: cache}
                ).logits[:, -1]
                steps.append(logits)
                tokens = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
                positions = positions[:, -1:] + 1
        logits = torch.stack(steps, dim=1)
        assert logits.argmax(-1).tolist() == expected_tokens
        torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
