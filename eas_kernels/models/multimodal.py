"""A LaVIN-style multimodal LLM: a small vision tower whose features, projected into the
LLM's embedding space, take the place of image placeholder tokens in the prompt.

For one example with image ``I`` and prompt tokens ``t_1..t_n`` of which ``P`` are the
placeholder id::

    F   = VisionTower(I)                      P × c   (a P = g·g grid of features)
    e_j = projector(F)_k   if t_j is the k-th placeholder,   tok_embeddings(t_j) otherwise
    logits = LLM(e)                           the LaVIN-layout Transformer, unchanged

No pretrained CLIP/ViT ships offline here (see ``../shared/NOTES.md``), so the tower is a
small CNN trained from scratch; the LLM stays frozen. ``patch_lavin`` patches the LLM's
blocks inside this module (the tower has none) and its prompt mask hook reads this
module's ``prompt_mask`` / ``attention_mask``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive_int, check_tensor
from .lavin import Transformer


class VisionTower(nn.Module):
    """Images ``(B, 3, S, S)`` in ``[0, 1]`` → features ``(B, grid², channels)``.

    A 2×2 average pool, three stride-2 3×3 convolutions with batch norm and GELU
    (``S → S/16``), then adaptive average pooling to ``grid × grid``; tokens in row-major
    order. (Batch norm makes it learn easy-vqa's shapes in seconds; once frozen the tower
    always runs in eval mode, see :meth:`LaVINStyleMLLM.train`.)
    """

    def __init__(self, channels: int = 64, grid: int = 4) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        self.grid = check_positive_int(grid, "grid")
        widths = [3, 16, 32, channels]
        layers: list[nn.Module] = [nn.AvgPool2d(2)]
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            conv = nn.Conv2d(width_in, width_out, 3, stride=2, padding=1)
            layers += [conv, nn.BatchNorm2d(width_out), nn.GELU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_tensor(images, "images", ndim=4, floating=True)
        if images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.features(images).flatten(2).transpose(1, 2)


class LaVINStyleMLLM(nn.Module):
    """A LaVIN-layout :class:`~eas_kernels.models.lavin.Transformer` that also sees images.

    Args:
        llm: the language model (frozen by whoever trains this module).
        image_token_id: the placeholder id; each prompt holds ``vision.num_tokens`` of them.
        vision: the vision tower (default :class:`VisionTower`).

    ``forward`` takes the LLM's arguments plus ``images`` (``(B, 3, S, S)``), needed on a
    training forward or a prefill whose tokens hold placeholders and absent on decode calls.
    """

    def __init__(
        self, llm: Transformer, image_token_id: int, vision: VisionTower | None = None
    ) -> None:
        super().__init__()
        if not isinstance(llm, Transformer):
            raise TypeError(f"llm must be an eas_kernels Transformer, got {type(llm).__name__}")
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
            raise TypeError(f"image_token_id must be an int, got {image_token_id!r}")
        if not 0 <= image_token_id < llm.vocab_size:
            raise ValueError(
                f"image_token_id must lie in [0, {llm.vocab_size}), got {image_token_id}"
            )
        self.llm = llm
        self.image_token_id = image_token_id
        self.vision = vision if vision is not None else VisionTower()
        self.projector = nn.Linear(self.vision.channels, llm.params.dim)
        weight = llm.tok_embeddings.weight
        self.vision.to(device=weight.device, dtype=weight.dtype)
        self.projector.to(device=weight.device, dtype=weight.dtype)

    def train(self, mode: bool = True) -> LaVINStyleMLLM:
        """Set training mode; a frozen vision tower (no parameter requiring grad) stays in
        eval mode, so its batch-norm statistics never move while adapters train."""
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        return self

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, num_image_tokens, dim)``: projected vision features."""
        return self.projector(self.vision(images))

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | None = None,
        prompt_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, n, vocab)``; see :meth:`Transformer.forward` for the other arguments.

        ``images`` fill the placeholders of a training forward or a prefill (``start_pos``
        None or 0), which must have them all. A decode step (``start_pos > 0``) takes no
        images: a placeholder id there is a generated token and is embedded as text.
        """
        check_tensor(tokens, "tokens", ndim=2)
        placeholders = tokens == self.image_token_id
        counts = placeholders.sum(dim=1)
        if images is None:
            if bool(counts.any()) and not start_pos:
                raise ValueError("tokens hold image placeholders but no images were given")
            return self.llm(tokens, start_pos, prompt_mask, attention_mask)
        check_tensor(images, "images", ndim=4, floating=True, device=tokens.device)
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"images has batch {images.shape[0]} but tokens has batch {tokens.shape[0]}"
            )
        if not bool((counts == self.num_image_tokens).all()):
            raise ValueError(
                f"each prompt must hold {self.num_image_tokens} image placeholders "
                f"(id {self.image_token_id}), got {counts.tolist()}"
            )
        embeds = self.llm.tok_embeddings(tokens)
        features = self.image_embeddings(images.to(embeds.dtype))
        embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), features)
        return self.llm(tokens, start_pos, prompt_mask, attention_mask, embeds=embeds)
