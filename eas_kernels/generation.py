"""Greedy generation for models with Meta LLaMA's cached-inference call protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Generation:
    """``tokens[b]``: the new tokens of prompt ``b``; ``logits``: ``(B, steps, vocab)``."""

    tokens: list[list[int]]
    logits: torch.Tensor


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int = 0,
    prefill_kwargs: dict[str, Any] | None = None,
) -> Generation:
    """Left-pad ``prompts``, prefill (``start_pos=0`` with ``prompt_mask``), then decode
    ``max_new_tokens`` greedy tokens one at a time (``start_pos > 0``).

    ``prefill_kwargs`` go to the prefill call only (e.g. ``images=`` of a multimodal
    model). ``logits[b, t]`` are the logits that chose new token ``t`` of prompt ``b``.
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        prompt_mask[row, width - len(prompt) :] = True
    extra = prefill_kwargs or {}
    logits = model(tokens, start_pos=0, prompt_mask=prompt_mask, **extra)[:, -1]
    steps = [logits]
    position = width
    for _ in range(max_new_tokens - 1):
        next_tokens = steps[-1].argmax(dim=-1, keepdim=True)
        steps.append(model(next_tokens, start_pos=position)[:, -1])
        position += 1
    stacked = torch.stack(steps, dim=1)
    return Generation(stacked.argmax(dim=-1).tolist(), stacked)
