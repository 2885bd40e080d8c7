"""Examples and batches for tuning (prompt → answer, optional image).

An :class:`Example` is a prompt and its answer as token ids, plus an image for multimodal
models. :func:`collate` left-pads a list of them into a :class:`Batch` whose masks follow
EAS_SPEC §3: ``prompt_mask`` marks the real prompt tokens (what the PIA states average),
``attention_mask`` every real token, and ``labels[b, t]`` is the answer token at position
``t`` (``-100`` elsewhere), predicted from the logits at ``t - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """``prompt`` and ``answer`` token ids; ``image`` ``(3, S, S)`` in [0, 1] or None."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    image: torch.Tensor | None = None


@dataclass
class Batch:
    """Left-padded ``(B, n)`` tensors of a list of examples, and their images (or None)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a training forward (``images`` only when present)."""
        kwargs = {"prompt_mask": self.prompt_mask, "attention_mask": self.attention_mask}
        if self.images is not None:
            kwargs["images"] = self.images
        return kwargs


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Left-pad ``examples`` (all with images, or none) into one :class:`Batch`."""
    if not examples:
        raise ValueError("examples must not be empty")
    with_images = [e.image is not None for e in examples]
    if any(with_images) and not all(with_images):
        raise ValueError("either every example of a batch has an image or none has")
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    attention_mask = torch.zeros_like(tokens, dtype=torch.bool)
    prompt_mask = torch.zeros_like(attention_mask)
    for row, e in enumerate(examples):
        sequence = list(e.prompt) + list(e.answer)
        start = width - len(sequence)
        tokens[row, start:] = torch.tensor(sequence)
        attention_mask[row, start:] = True
        prompt_mask[row, start : start + len(e.prompt)] = True
        labels[row, start + len(e.prompt) :] = torch.tensor(e.answer)
    images = torch.stack([e.image for e in examples]) if all(with_images) else None
    return Batch(tokens, attention_mask, prompt_mask, labels, images)
