"""Greedy generation for models with Meta LLaMA's cached-inference call protocol."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import nn

from .models.lavin import ModelArgs
from .patch import is_patched
from .reparam import expected_new_tokens


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
    On a patched model, ``reparameterize(model, "auto")`` chooses its mode for
    ``max_new_tokens`` (:func:`eas_kernels.expected_new_tokens`).
    """
    _check_prompts(prompts)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, Integral) or pad_id < 0:
        raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
    width = max(len(prompt) for prompt in prompts)
    args = _model_args(model)
    if args is not None:
        if width + max_new_tokens - 1 > args.max_seq_len:
            raise ValueError(
                f"the longest prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) - 1 "
                f"exceeds the model's max_seq_len {args.max_seq_len}: lower max_new_tokens"
            )
        if pad_id >= args.vocab_size:
            raise ValueError(f"pad_id must be below the vocabulary size {args.vocab_size}")
    device = next(model.parameters()).device
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        prompt_mask[row, width - len(prompt) :] = True
    extra = prefill_kwargs or {}
    with _expecting(model, max_new_tokens):
        logits = model(tokens, start_pos=0, prompt_mask=prompt_mask, **extra)[:, -1]
        steps = [logits]
        position = width
        for _ in range(max_new_tokens - 1):
            next_tokens = steps[-1].argmax(dim=-1, keepdim=True)
            steps.append(model(next_tokens, start_pos=position)[:, -1])
            position += 1
    stacked = torch.stack(steps, dim=1)
    return Generation(stacked.argmax(dim=-1).tolist(), stacked)


def _expecting(model: nn.Module, count: int) -> contextlib.AbstractContextManager:
    """:func:`~eas_kernels.expected_new_tokens` on a patched model, else nothing."""
    return expected_new_tokens(model, count) if is_patched(model) else contextlib.nullcontext()


def _check_prompts(prompts: object) -> None:
    """TypeError/ValueError unless ``prompts`` is a non-empty sequence of non-empty
    sequences of int token ids (not strings, not floats, not bools)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(
                f"prompts[{row}] must be a list of int token ids, got {type(prompt).__name__}"
            )
        if len(prompt) == 0:
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, Integral):
                raise TypeError(
                    f"prompts[{row}] must hold int token ids, got {type(token).__name__} {token!r}"
                )


def _model_args(model: nn.Module) -> ModelArgs | None:
    """The :class:`ModelArgs` of the LaVIN-layout model inside ``model``, if there is one."""
    for module in model.modules():
        params = getattr(module, "params", None)
        if isinstance(params, ModelArgs):
            return params
    return None
