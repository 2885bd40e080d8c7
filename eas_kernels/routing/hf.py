"""Per-example routing on Hugging Face LLaMA-family models: the decoder layer's routed
forward, a cache slot that holds the examples that keep a layer, and ``generate()``.

A routed decoder layer is called as ``transformers`` calls it, ``forward(hidden_states,
attention_mask=..., position_ids=..., cache=... | past_key_values=..., use_cache=...,
position_embeddings=(cos, sin), **kwargs)``. Its phase comes from the layer's slot in the
call's ``Cache`` (ROE_SPEC §5):

* no cache: a fresh call (training, evaluation) that routes afresh and stores nothing;
* a slot that holds no tokens: a **prefill**. The route and the adapters' states are frozen
  and the slot becomes a :class:`RoutedCacheLayer`, which holds the keys and values of the
  examples that run the layer only (a layer every example skips allocates nothing) and
  counts the tokens itself, so that lengths and masks are right whatever it holds;
* the slot of this layer's last prefill, holding tokens: a **decode** call on the frozen
  route (at batch 1 the example's adapters are merged, as on LaVIN-style models);
* any other slot holding tokens (a continued conversation, another model's cache, the cache
  of an older prefill): ``ValueError``. A static cache cannot hold a different set of
  examples per layer: ``ValueError`` at the prefill.

Under ``"soft"`` routes (training) a call with an empty cache is a training forward: both
branches are mixed, nothing is cached, and a later decode on that cache is refused.

Beam search reorders a cache with ``reorder_cache(beam_idx)``; a :class:`RoutedCacheLayer`
applies it to its layer's route and states too (:meth:`RoutedForward.select_rows`), so a
beam carries the route of the beam it continues, which is its example's: the beams of one
example are copies of its prompt. ``batch_select_indices`` and ``batch_repeat_interleave``
do the same. ``generate()`` refuses, before anything runs, what cannot give the prompt's
routes: soft routes, ``use_cache=False``, ``prefill_chunk_size`` and assisted generation.

Gradient checkpointing (``model.gradient_checkpointing_enable()``, ``TrainingArguments(
activation_checkpointing=True)``, ``gradient_checkpointing`` before 5.24) trains a routed
model from transformers 5.23 on, reentrant or not. A checkpointed layer runs again in the
backward pass, so a routed layer decides its route (a random draw, the routers' soft
weights) *outside* the checkpoint and checkpoints its branches alone
(:meth:`HFRoutedForward._recomputable`, with the model's own checkpointing function): the
re-run takes the same route, and ``ρ̂`` keeps the routers' gradient. A checkpointed call
caches nothing, as ``transformers``' own layers do. Since 5.23 ``transformers``
checkpoints a layer's class ``forward``, which a routed layer replaces and calls without
that wrapper. Earlier releases checkpoint the layer's whole call, the decision included,
where a random route would be drawn anew and a reentrant re-run would leave ``ρ̂`` without
gradient: there checkpointing is refused at the first forward in training mode and by
``RouteTrainer`` at construction (:func:`checkpointing_refusal`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..hf import (
    _transformers_classes,
    call_inputs,
    check_generate_options,
    fresh_prompt_mask,
    named_arguments,
)
from .control import RouteControl
from .forward import RoutedForward

_SUBJECT = "a routed model"
CHECKPOINTING_RELEASE = (5, 23)  # the first release that checkpoints a layer's class forward


def checkpointing_refusal() -> str | None:
    """Why this ``transformers`` release cannot train a routed model under gradient
    checkpointing (it checkpoints a layer's whole call, before 5.23), or None."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if "__call__" not in vars(GradientCheckpointingLayer):
        return None
    import transformers

    wanted = ".".join(map(str, CHECKPOINTING_RELEASE))
    return (
        f"per-example routing trains under gradient checkpointing with transformers >= "
        f"{wanted}; this is {transformers.__version__}, which checkpoints a layer's whole "
        "call: the backward pass would draw a random route anew and, reentrant, leave the "
        "sparsity term without the routers' gradient. Upgrade transformers, or call "
        "model.gradient_checkpointing_disable() (or leave TrainingArguments."
        "gradient_checkpointing off)"
    )


def _without_checkpointing(forward: Any) -> Any:
    """A layer class's ``forward`` without the wrapper that checkpoints it (transformers
    >= 5.23, ``GradientCheckpointingLayer.__init_subclass__``): a routed layer checkpoints
    its branches itself, and must not checkpoint the kept branch again inside."""
    while getattr(forward, "__code__", None) is not None:
        if forward.__code__.co_name != "forward_with_checkpointing":
            break
        forward = forward.__wrapped__
    return forward


def _dynamic_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def _crop_removes_tokens() -> bool:
    """Whether ``DynamicLayer.crop(n)`` removes ``-n`` tokens (transformers >= 5.24) rather
    than keeping ``n`` (a negative ``n`` removes ``-n`` in both)."""
    return "tokens_to_remove" in inspect.signature(_dynamic_layer().crop).parameters


def _slot_class() -> type:
    """:class:`RoutedCacheLayer`, built on this release's ``DynamicLayer`` (once)."""
    global _SLOT_CLASS
    if _SLOT_CLASS is None:
        _SLOT_CLASS = _make_slot_class(_dynamic_layer(), _crop_removes_tokens())
    return _SLOT_CLASS


_SLOT_CLASS: type | None = None


def _make_slot_class(base: type, crop_removes: bool) -> type:
    class RoutedCacheLayer(base):
        """The cache slot of a routed layer: keys and values ``(B_kept, heads, tokens,
        head_dim)`` of the examples that run the layer (its route's ``kept`` rows, in that
        order). It counts the call's tokens (``length``), which the routed forward
        advances, so that a layer every example skips still gives the cache's length."""

        def __init__(self, owner: RoutedForward | None) -> None:
            super().__init__()
            self.owner = owner
            self.route = None if owner is None else owner.route
            self.length = 0

        def get_seq_length(self) -> int:
            return self.length

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            self._select(beam_idx)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            index = torch.as_tensor(indices)
            self._select(index.nonzero().flatten() if index.dtype == torch.bool else index)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.route is not None:
                batch = len(self.route.skip)
                self._select(torch.arange(batch).repeat_interleave(repeats))

        def _select(self, index: torch.Tensor) -> None:
            if self.route is None:
                return  # a soft forward's slot holds nothing
            owner = self.owner
            if owner is None or owner.route is not self.route:
                raise ValueError(
                    "this cache was filled by an older prefill of the routed model, whose "
                    "route its layer no longer holds: start from a new cache"
                )
            kept_rows = owner.select_rows(index.long())
            self.route = owner.route
            if self.keys is not None and self.keys.numel():
                rows = kept_rows.to(self.keys.device)
                self.keys = self.keys.index_select(0, rows)
                self.values = self.values.index_select(0, rows)

        def crop(self, value: int) -> None:
            if value >= 0 and crop_removes:
                super().crop(value)  # 0: nothing; > 0: the release's own error
                return
            length = max(self.length + value, 0) if value < 0 else min(value, self.length)
            if self.keys is not None and self.keys.numel():
                self.keys = self.keys[..., :length, :]
                self.values = self.values[..., :length, :]
            self.length = length

        def reset(self) -> None:
            super().reset()
            self.length = 0

    return RoutedCacheLayer


class HFRoutedForward(RoutedForward):
    """:class:`RoutedForward` of a Hugging Face LLaMA decoder layer (module docstring).

    Per-example arguments are tensors of at least 2 dimensions whose first is the batch
    (``position_ids`` ``(B, n)``, masks ``(B, 1, n, keys)``, each of ``position_embeddings``
    ``(B, n, head_dim)``); the cache is not gathered: its slot holds the kept rows only.
    """

    row_dims = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signature = inspect.signature(type(self.block).forward)
        self.class_forward = _without_checkpointing(type(self.block).forward)
        self.refusal = checkpointing_refusal()
        self.cache_class = _transformers_classes()[0]
        self.cache_index = int(getattr(self.attention, "layer_idx", self.layer))

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # whatever the grad mode: a reentrant checkpoint runs the layer under no_grad
        if self.refusal is not None and self._checkpointed_model():
            raise ValueError(self.refusal)
        bound = named_arguments(self.signature, (self.block, hidden_states, *args), kwargs)
        if bound is None:
            return self._block(hidden_states, None, args, kwargs)  # the layer reports it
        named = {k: v for k, v in bound.items() if k not in ("self", "hidden_states")}
        x = hidden_states
        cache_name = next((k for k, v in named.items() if isinstance(v, self.cache_class)), None)
        if cache_name is not None and self._checkpointing():
            # as transformers' layers do: a call the backward pass runs again caches nothing
            named = {**named, cache_name: None}
            if named.get("use_cache"):
                named["use_cache"] = False
            cache_name = None
        if cache_name is None:
            return self._fresh(x, None, (), named)
        cache = named[cache_name]
        slot = self._slot(cache)
        slot_class = _slot_class()
        if isinstance(slot, slot_class) and slot.length > 0:
            if slot.route is None:
                raise ValueError(
                    f"layer {self.layer}: this cache comes from a soft-routed forward, which "
                    "caches nothing; decoding needs hard routes at the prefill "
                    "(eas_kernels.routing.set_routing(model, 'hard'))"
                )
            if slot.owner is not self or slot.route is not self.route:
                raise ValueError(
                    f"layer {self.layer}: this cache was filled by an older prefill of the "
                    "routed model (or by another model): decode on the cache of the last "
                    "prefill, or start from a new cache with the whole prompt"
                )
            out = self._decode(x, slot.length, (), named)
            slot.length += x.shape[1]
            return out
        if slot.get_seq_length() > 0:
            raise ValueError(
                f"layer {self.layer}: this call continues a cache that already holds "
                f"{slot.get_seq_length()} tokens which no routed prefill of this model "
                "wrote (a continued conversation): the route is read from the whole prompt "
                "at the prefill; pass the whole conversation as the prompt, without a cache"
            )
        if type(slot) is not _dynamic_layer() and not isinstance(slot, slot_class):
            raise ValueError(
                f"layer {self.layer}: per-example routing needs a dynamic cache "
                f"(transformers.DynamicCache; each layer holds only the examples that keep "
                f"it), got a {type(slot).__name__} slot (a static cache?): use the default "
                "cache"
            )
        if self.control.mode == "soft":
            cache.layers[self.cache_index] = new = slot_class(None)
            new.length = x.shape[1]
            return self._fresh(x, None, (), {**named, cache_name: None})
        cache.layers[self.cache_index] = new = slot_class(self)
        out = self._fresh(x, 0, (), named)
        new.route, new.length = self.route, x.shape[1]
        return out

    def _slot(self, cache: Any) -> Any:
        """This layer's slot of ``cache`` (appended, as the cache would, when missing)."""
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            raise ValueError(
                f"per-example routing needs a transformers Cache with per-layer slots, got "
                f"{type(cache).__name__}"
            )
        make = getattr(cache, "layer_class_to_replicate", None) or _dynamic_layer()
        while len(layers) <= self.cache_index:
            layers.append(make())
        return layers[self.cache_index]

    def _checkpointed_model(self) -> bool:
        """Whether the model trains under gradient checkpointing (a training-mode call)."""
        return bool(getattr(self.block, "gradient_checkpointing", False)) and self.block.training

    def _checkpointing(self) -> bool:
        """Whether this call's branches run under gradient checkpointing: a training-mode
        call with gradients, on a release that checkpoints a layer's class forward."""
        return self.refusal is None and self._checkpointed_model() and torch.is_grad_enabled()

    def _recomputable(
        self, branches: Callable[..., torch.Tensor], *inputs: torch.Tensor
    ) -> torch.Tensor:
        if self._checkpointing():
            return self.block._gradient_checkpointing_func(branches, *inputs)
        return branches(*inputs)

    def _block(self, x: torch.Tensor, start_pos: int | None, args: tuple, kwargs: dict):
        return self.class_forward(self.block, x, *args, **kwargs)

    def _attend(self, z: torch.Tensor, start_pos: int | None, args: tuple, kwargs: dict):
        return self.attention(z, *args, **kwargs)[0]


class PromptMaskHook:
    """Root pre-hook of a routed Hugging Face model: the prompt mask of a fresh call goes to
    the :class:`RouteControl` — :func:`~eas_kernels.hf.prompt_mask_from_labels` with
    ``labels``, else the ``attention_mask``'s real tokens, else all tokens. A call whose
    cache holds tokens decodes on the frozen routes and changes nothing."""

    def __init__(self, model: nn.Module, control: RouteControl) -> None:
        self.signature = inspect.signature(model.forward)
        self.control = control
        self.cache_class = _transformers_classes()[0]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = named_arguments(self.signature, args, kwargs)
        inputs = None if arguments is None else call_inputs(arguments)
        if arguments is None or inputs is None:
            return  # the forward itself reports the bad call
        cache = next((v for v in arguments.values() if isinstance(v, self.cache_class)), None)
        if cache is not None and _holds_tokens(cache):
            return
        self.control.state_mask = fresh_prompt_mask(arguments, inputs.shape[1])


def _holds_tokens(cache: Any) -> bool:
    try:
        return int(cache.get_seq_length()) > 0
    except (ValueError, StopIteration):
        return False


class GenerateRouted:
    """``model.generate`` on a routed instance: refuses, before anything runs, what cannot
    decode on the prompt's routes (module docstring)."""

    def __init__(self, model: nn.Module, control: RouteControl) -> None:
        self.model, self.control = model, control
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.control.mode == "soft":
            raise ValueError(
                "generate() on a routed model needs hard (or random) routes: soft routes mix "
                "both branches of every layer and cache nothing; call "
                "eas_kernels.routing.set_routing(model, 'hard') first"
            )
        check_generate_options(self.model, kwargs, _SUBJECT)
        return type(self.model).generate(self.model, *args, **kwargs)
