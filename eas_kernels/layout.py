"""Where EAS finds things in a transformer block: LaVIN / Meta names or Hugging Face names.

A block has an attention module whose query/key/value projections read
``attention_norm(x)``, and an FFN whose gate/up projections read ``ffn_norm(h)`` and whose
down projection writes the block's output (EAS_SPEC §2). :class:`BlockLayout` names those
parts; :func:`find_blocks` returns the outermost modules that have them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """Attribute names of the parts of one kind of block."""

    description: str
    attention: str
    feed_forward: str
    attention_norm: str
    ffn_norm: str
    attention_targets: tuple[str, str, str]
    ffn_targets: tuple[str, str]
    ffn_output: str

    def matches(self, module: nn.Module) -> bool:
        attention = getattr(module, self.attention, None)
        feed_forward = getattr(module, self.feed_forward, None)
        return (
            isinstance(attention, nn.Module)
            and isinstance(feed_forward, nn.Module)
            and isinstance(getattr(module, self.attention_norm, None), nn.Module)
            and isinstance(getattr(module, self.ffn_norm, None), nn.Module)
            and all(_is_linear(attention, name) for name in self.attention_targets)
            and all(_is_linear(feed_forward, name) for name in self.ffn_targets)
            and _is_linear(feed_forward, self.ffn_output)
        )

    def find_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks of ``model`` in module order (outermost matches only)."""
        blocks: list[nn.Module] = []
        inside: set[int] = set()
        for module in model.modules():
            if id(module) in inside:
                continue
            if self.matches(module):
                blocks.append(module)
                inside.update(id(sub) for sub in module.modules())
        return blocks

    def checked_blocks(
        self, model: nn.Module, num_layers: int
    ) -> tuple[list[nn.Module], list[tuple[int, torch.dtype, torch.device]]]:
        """The blocks of ``model`` and each one's width, dtype and device (:meth:`check_block`);
        ValueError when there are none or not ``num_layers`` of them (a plan's layer count)."""
        blocks = self.find_blocks(model)
        if not blocks:
            raise ValueError(f"model has no {self.description}")
        if len(blocks) != num_layers:
            raise ValueError(
                f"plan is for {num_layers} layers but the model has {len(blocks)} blocks"
            )
        return blocks, [self.check_block(i, block) for i, block in enumerate(blocks)]

    def attention_linears(self, block: nn.Module) -> tuple[nn.Linear, ...]:
        attention = getattr(block, self.attention)
        return tuple(getattr(attention, name) for name in self.attention_targets)

    def ffn_linears(self, block: nn.Module) -> tuple[nn.Linear, ...]:
        feed_forward = getattr(block, self.feed_forward)
        return tuple(getattr(feed_forward, name) for name in self.ffn_targets)

    def check_block(self, index: int, block: nn.Module) -> tuple[int, torch.dtype, torch.device]:
        """Width, dtype and device of a block; ValueError when its adapter targets disagree."""
        linears = self.attention_linears(block) + self.ffn_linears(block)
        dims = {linear.in_features for linear in linears}
        dtypes = {linear.weight.dtype for linear in linears}
        devices = {linear.weight.device for linear in linears}
        if len(dims) != 1 or len(dtypes) != 1 or len(devices) != 1:
            names = "/".join(self.attention_targets + self.ffn_targets)
            raise ValueError(
                f"block {index}: {names} must share input width, dtype and device, got "
                f"{sorted(dims)}, {sorted(map(str, dtypes))}, {sorted(map(str, devices))}"
            )
        dtype = dtypes.pop()
        if not dtype.is_floating_point:
            raise TypeError(f"block {index}: weights must be floating point, got {dtype}")
        return dims.pop(), dtype, devices.pop()


def _is_linear(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


LAVIN = BlockLayout(
    description="LaVIN-style blocks (attention.wq/wk/wv, feed_forward.w1/w2/w3, "
    "attention_norm, ffn_norm)",
    attention="attention",
    feed_forward="feed_forward",
    attention_norm="attention_norm",
    ffn_norm="ffn_norm",
    attention_targets=("wq", "wk", "wv"),
    ffn_targets=("w1", "w3"),
    ffn_output="w2",
)

HF_LLAMA = BlockLayout(
    description="Hugging Face LLaMA decoder layers (self_attn.q_proj/k_proj/v_proj, "
    "mlp.gate_proj/up_proj/down_proj, input_layernorm, post_attention_layernorm)",
    attention="self_attn",
    feed_forward="mlp",
    attention_norm="input_layernorm",
    ffn_norm="post_attention_layernorm",
    attention_targets=("q_proj", "k_proj", "v_proj"),
    ffn_targets=("gate_proj", "up_proj"),
    ffn_output="down_proj",
)
