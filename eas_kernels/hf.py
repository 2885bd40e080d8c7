"""EAS on Hugging Face ``transformers`` models: ``patch_hf`` / ``unpatch_hf``.

Works on ``LlamaForCausalLM`` and on any model whose decoder layers have LLaMA's structure
(``self_attn.q_proj/k_proj/v_proj``, ``mlp.gate_proj/up_proj/down_proj``,
``input_layernorm``, ``post_attention_layernorm``), ``LlavaForConditionalGeneration``'s
language model included (its CLIP vision layers do not match and stay untouched).

Per call of the patched model (a forward pre-hook on the model given to :func:`patch_hf`):

* **phase** — a call with a ``past_key_values`` cache that already holds tokens (or the
  cache of the last prefill) is a *decode* call: the frozen PIA states are used and
  re-parameterised by the mode of :func:`eas_kernels.reparameterize`. Any other call
  (training, evaluation, the prefill of ``generate()``) is *fresh*: states are recomputed.
* **prompt mask** (EAS_SPEC §3) of a fresh call: with ``labels``, the tokens before the
  first supervised label (the first position ``t ≥ 1`` with ``labels[t] != -100``, since
  ``labels[0]`` is never a target), minus padding; otherwise the ``attention_mask`` (the
  prompt's real tokens at the prefill of ``generate()``); otherwise all tokens.
* **KV cache** — a skipped layer's slot in a ``transformers`` ``Cache`` becomes a
  ``DummyLayer`` (the library's placeholder for layers without attention), so it never
  allocates; sequence lengths and masks come from the first kept layer.

``generate()`` needs its cache (the default ``use_cache=True``): without one every step is
a fresh call and the states would follow the generated tokens.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from .layout import HF_LLAMA
from .patch import EASPatch, check_patch_arguments, check_prompt_mask, patch_of
from .plan import SkipPlan
from .runtime import EASRuntime

IGNORE_INDEX = -100


def _cache_classes() -> tuple[type, type]:
    try:
        from transformers.cache_utils import Cache, DummyLayer
    except ImportError as error:  # transformers < 5 has no DummyLayer
        raise ImportError(
            "eas_kernels.patch_hf needs transformers >= 5 (pip install 'transformers>=5')"
        ) from error
    return Cache, DummyLayer


def prompt_mask_from_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, n)`` bool: real tokens before each example's first supervised label.

    ``labels`` follows Hugging Face's convention (not shifted; ``-100`` = no target;
    position 0 is never a target). A row without any target keeps all its real tokens.
    """
    supervised = labels[:, 1:] != IGNORE_INDEX
    n = labels.shape[1]
    first = torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1) + 1, n)
    mask = torch.arange(n, device=labels.device).unsqueeze(0) < first.unsqueeze(1)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


class _HFCallHook:
    """Root pre-hook: phase, batch size and prompt mask of each call of the patched model."""

    def __init__(self, model: nn.Module) -> None:
        self.signature = inspect.signature(model.forward)
        self.cache_class, self.dummy_class = _cache_classes()
        self.last_cache: weakref.ref | None = None
        self.patch: EASPatch | None = None  # set once the patch exists

    @property
    def runtime(self) -> EASRuntime:
        assert self.patch is not None
        return self.patch.runtime

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError:
            return  # the forward itself reports the bad call
        extra = bound.get("kwargs", {})
        get = lambda name: bound.get(name, extra.get(name))  # noqa: E731
        inputs = get("input_ids")
        if inputs is None:
            inputs = get("inputs_embeds")
        if inputs is None:
            return
        cache = get("past_key_values")
        if isinstance(cache, self.cache_class):
            self.mark_skipped(cache)
        fresh = not self._continues(cache)
        if fresh:
            labels, attention_mask = get("labels"), get("attention_mask")
            if labels is not None:
                mask = prompt_mask_from_labels(labels, attention_mask)
            else:
                mask = None if attention_mask is None else attention_mask.bool()
            self.runtime.state_mask = None if mask is None else check_prompt_mask(mask)
            self.last_cache = weakref.ref(cache) if isinstance(cache, self.cache_class) else None
        self.runtime.enter(fresh, inputs.shape[0])

    def _continues(self, cache: Any) -> bool:
        if not isinstance(cache, self.cache_class):
            return False
        if self.last_cache is not None and self.last_cache() is cache:
            return True
        try:
            return cache.get_seq_length() > 0
        except ValueError:  # every layer skipped: no layer tracks a length
            return False

    def mark_skipped(self, cache: Any) -> None:
        """Put a ``DummyLayer`` in the empty cache slot of each skipped layer."""
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            return
        assert self.patch is not None
        skipped = self.patch.skipped
        if len(skipped) == len(layers):
            return  # keep one layer that tracks the sequence length
        for index in skipped:
            if index < len(layers) and not isinstance(layers[index], self.dummy_class):
                if getattr(layers[index], "is_initialized", False):
                    continue  # filled while the layer still ran attention: leave it
                layers[index] = self.dummy_class()

    def on_skipped_call(self, index: int, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if isinstance(cache, self.cache_class):
            self.mark_skipped(cache)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a ``transformers`` ``Cache``."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def patch_hf(model: nn.Module, plan: SkipPlan, *, search: bool | str = False) -> nn.Module:
    """Install EAS on a Hugging Face LLaMA-family model, in place, and return it.

    Same semantics as :func:`eas_kernels.patch_lavin` (EAS_SPEC §2): kept layers get a
    rank-``plan.adapter_rank`` PIA before ``q_proj/k_proj/v_proj``, skipped layers run
    ``x + mlp(v + PIA(v))`` with ``v = post_attention_layernorm(x)``, no attention and no KV
    cache; every non-PIA parameter is frozen (FFN and whole-block skips, and ``search``,
    as in :func:`~eas_kernels.patch_lavin`). Instances are patched, never classes, so
    other models in the process are unaffected; :func:`unpatch_hf` undoes it. See the
    module docstring for how training calls, ``generate()`` and caches are handled.
    """
    candidates = check_patch_arguments(model, plan, search)
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    hook = _HFCallHook(model)
    hook.patch = EASPatch(model, plan, candidates, HF_LLAMA, on_skipped_call=hook.on_skipped_call)
    hook.patch.keep(model.register_forward_pre_hook(hook, with_kwargs=True))
    return model


def unpatch_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_hf`: the original modules, weights (bitwise) and flags."""
    patch = patch_of(model)
    if patch.layout is not HF_LLAMA:
        raise TypeError("model was not patched by patch_hf (use eas_kernels.unpatch)")
    patch.remove()
    return model
