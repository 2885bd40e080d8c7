"""EAS on Hugging Face ``transformers`` models: ``patch_hf`` / ``unpatch_hf``.

Works on ``LlamaForCausalLM`` and on any model whose decoder layers have LLaMA's structure
(``self_attn.q_proj/k_proj/v_proj``, ``mlp.gate_proj/up_proj/down_proj``,
``input_layernorm``, ``post_attention_layernorm``), ``LlavaForConditionalGeneration``'s
language model included (its CLIP vision layers do not match and stay untouched).
Verified with the ``transformers`` releases :data:`VERIFIED_TRANSFORMERS` (oldest and
newest; CI tests both).

**Phase of a call.** The EAS runtime must know whether a call of the patched model starts
a new prompt (*fresh*: PIA states are computed over its prompt tokens, EAS_SPEC §3) or
continues the last one (*decode*: the frozen states are used and re-parameterised by the
mode of :func:`eas_kernels.reparameterize`). A forward pre-hook on the model decides it
from what the model receives, whatever ``generate()`` names it:

* the ``Cache`` of the call is any argument that is a ``transformers`` ``Cache`` (it was
  ``past_key_values=`` up to 5.23, ``cache=`` from 5.24 on);
* a call whose cache already holds tokens decodes — however many tokens it brings — and
  must continue the cache of this model's last fresh call (else ``ValueError``); any other
  call (training, evaluation, a prefill) is fresh;
* inside :meth:`generate` (wrapped on the instance) the first call must be fresh and every
  later one must decode: a first call on a cache that holds tokens is a continued
  conversation and is refused (``ValueError``: pass the whole conversation as the prompt);
  a later call that does not continue the cache means the call protocol of this
  ``transformers`` release is unknown, and is refused (``RuntimeError`` naming the verified
  releases) instead of decoding with a wrong state;
* the first decoder layer checks that the cache it receives agrees with that phase
  (``RuntimeError`` otherwise), so a cache the root call did not show cannot go unnoticed.

``generate()`` options that cannot give the prompt's states are refused before anything
runs: ``use_cache=False`` (every step would be a fresh call), ``prefill_chunk_size``
(no chunk sees the whole prompt) and assisted generation (its first call feeds draft tokens
with the prompt).

**Prompt mask** (EAS_SPEC §3) of a fresh call: with ``labels``, :func:`prompt_mask_from_labels`;
otherwise the ``attention_mask`` (the prompt's real tokens at the prefill of
``generate()``; a 4-D mask, as ``generate()`` passes with a static cache, gives the keys
the call's last token attends); otherwise all tokens.

**KV cache.** A skipped layer's slot in a ``Cache`` becomes a ``DummyLayer`` (the library's
placeholder for layers without attention; :class:`SkippedLayerSlot` before 5.23), so it
never allocates; sequence lengths and masks come from the first kept layer.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._checks import check_tensor
from .layout import HF_LLAMA
from .patch import (
    ROUTES_ATTR,
    EASPatch,
    all_or_nothing,
    check_patch_arguments,
    check_prompt_mask,
    is_route_plan,
    patch_of,
    patch_routed,
)
from .plan import SkipPlan
from .reparam import expected_new_tokens
from .runtime import EASRuntime

if TYPE_CHECKING:
    from .routing import RoutePlan

IGNORE_INDEX = -100
# The oldest and the newest transformers release CI runs the Hugging Face tests against;
# pyproject.toml's lower bound and .ci/constraints-oldest.txt pin the first (tested).
VERIFIED_TRANSFORMERS = ("5.5.0", "5.24.0")
# generate() options that would put other tokens than the prompt's into the PIA states.
_ASSISTED_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class SkippedLayerSlot:
    """The cache slot of a skipped layer on ``transformers`` releases without ``DummyLayer``
    (before 5.23): it holds nothing and is no ``CacheLayerMixin``, so the ``Cache`` takes
    lengths and mask sizes from its first attention layer, as it does for ``DummyLayer``."""

    supports_early_init = False
    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self) -> None:
        self.is_initialized = True
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("the cache slot of a layer whose MHA is skipped holds no keys/values")

    def get_max_length(self) -> int:
        return -1

    def _nothing(self, *args: object, **kwargs: object) -> None:
        return None

    offload = prefetch = reset = crop = reorder_cache = _nothing
    batch_repeat_interleave = batch_select_indices = _nothing


def _transformers_classes() -> tuple[type, type]:
    """``transformers``' ``Cache`` and the placeholder for a skipped layer's slot; ImportError
    naming the verified releases when ``transformers`` is missing or older than them."""
    oldest = VERIFIED_TRANSFORMERS[0]
    try:
        import transformers
        from packaging.version import Version
        from transformers.cache_utils import Cache
    except ImportError as error:
        raise ImportError(
            f"eas_kernels.patch_hf needs transformers >= {oldest} (pip install "
            f"'transformers>={oldest}')"
        ) from error
    if Version(transformers.__version__) < Version(oldest):
        raise ImportError(
            f"eas_kernels.patch_hf needs transformers >= {oldest} (verified: {oldest} to "
            f"{VERIFIED_TRANSFORMERS[1]}), found {transformers.__version__}: pip install "
            f"'transformers>={oldest}'"
        )
    try:
        from transformers.cache_utils import DummyLayer
    except ImportError:  # before 5.23
        return Cache, SkippedLayerSlot
    return Cache, DummyLayer


def protocol_error(what: str) -> RuntimeError:
    """The error for a call protocol that patch_hf does not know (a new transformers)."""
    import transformers

    oldest, newest = VERIFIED_TRANSFORMERS
    return RuntimeError(
        f"eas_kernels.patch_hf cannot follow this transformers call protocol: {what}. It is "
        f"verified with transformers {oldest} to {newest}; this is transformers "
        f"{transformers.__version__}. Install a verified release (pip install "
        f"'transformers>={oldest},<={newest}'): decoding with a wrong PIA state is refused."
    )


def prompt_mask_from_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, n)`` bool: each example's prompt in a training batch.

    ``labels`` follows Hugging Face's convention (not shifted; ``-100`` = no target). The
    prompt of a row is its real tokens (``attention_mask``, all when None) before its first
    label. A row whose first real token carries a label — ``labels = input_ids``, as
    causal-LM collators such as ``DataCollatorForLanguageModeling`` make them — has no
    prompt/answer split: its state averages all its real tokens, and so does a row without
    any label.
    """
    check_tensor(labels, "labels", ndim=2)
    assert isinstance(labels, torch.Tensor)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    n = labels.shape[1]
    real = torch.ones_like(labels, dtype=torch.bool)
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask", ndim=2, device=labels.device)
        if attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask must have the shape of labels {tuple(labels.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        real = attention_mask.bool()
    positions = torch.arange(n, device=labels.device).expand_as(labels)
    first_label = torch.where(labels != IGNORE_INDEX, positions, n).amin(dim=1, keepdim=True)
    first_real = torch.where(real, positions, n).amin(dim=1, keepdim=True)
    return real & ((positions < first_label) | (first_label <= first_real))


def key_padding_mask(attention_mask: object, tokens: int) -> torch.Tensor | None:
    """``(B, tokens)`` bool real-token mask of a call's ``attention_mask``, or None.

    A 2-D mask is Hugging Face's padding mask. A 4-D ``(B, heads, queries, keys)`` mask
    (``generate()`` builds one for a static cache; bool, True = attend, or additive float,
    0 = attend) gives the first ``tokens`` keys (a fresh call's, the cache being empty)
    that the call's last token attends: with left padding, exactly the real tokens.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim not in (2, 4):
        shape = getattr(attention_mask, "shape", None)
        raise TypeError(
            "attention_mask must be a 2-D padding mask or a 4-D attention mask tensor, got "
            f"{type(attention_mask).__name__}{'' if shape is None else tuple(shape)}"
        )
    if attention_mask.ndim == 2:
        return attention_mask.bool()
    last_query = attention_mask[:, 0, -1, :tokens]
    return last_query if last_query.dtype == torch.bool else last_query == 0


def named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """A call's arguments by name, its ``**kwargs`` flattened in; None when they do not
    bind to ``signature`` (the forward itself then reports the bad call)."""
    try:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
    except TypeError:
        return None
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, None) or {})
    return arguments


def call_inputs(arguments: Mapping[str, Any]) -> torch.Tensor | None:
    """The ``input_ids`` (else ``inputs_embeds``) of a model call, None unless a tensor of at
    least 2 dimensions (the forward itself then reports the bad call)."""
    inputs = arguments.get("input_ids")
    if inputs is None:
        inputs = arguments.get("inputs_embeds")
    return inputs if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else None


def fresh_prompt_mask(arguments: Mapping[str, Any], tokens: int) -> torch.Tensor | None:
    """The checked prompt mask of a fresh call of ``tokens`` tokens: with ``labels``,
    :func:`prompt_mask_from_labels`; otherwise the ``attention_mask``'s real tokens
    (:func:`key_padding_mask`); otherwise None (all tokens)."""
    mask = key_padding_mask(arguments.get("attention_mask"), tokens)
    labels = arguments.get("labels")
    if isinstance(labels, torch.Tensor):
        mask = prompt_mask_from_labels(labels, mask)
    return None if mask is None else check_prompt_mask(mask)


class _HFCallHook:
    """Root pre-hook: phase, batch size and prompt mask of each call of the patched model."""

    def __init__(self, model: nn.Module) -> None:
        self.signature = inspect.signature(model.forward)
        self.cache_class, self.dummy_class = _transformers_classes()
        self.last_cache: weakref.ref | None = None
        self.generate_calls: int | None = None  # model calls so far in a generate(), else None
        self.patch: EASPatch | None = None  # set once the patch exists

    @property
    def runtime(self) -> EASRuntime:
        assert self.patch is not None
        return self.patch.runtime

    def __getstate__(self) -> dict:
        # a pickled model (torch.save) starts over: the next call with a cache is a prefill
        return {**self.__dict__, "last_cache": None}

    # ------------------------------------------------------------------ the root call
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = named_arguments(self.signature, args, kwargs)
        inputs = None if arguments is None else call_inputs(arguments)
        if arguments is None or inputs is None:
            return  # the forward itself reports the bad call
        cache = self.find_cache(arguments.values())
        if cache is not None:
            self.mark_skipped(cache)
        past = self.cached_tokens(cache)
        continues = past > 0 or (cache is not None and self.all_skipped and self.is_last(cache))
        self._check_protocol(continues, past, cache, arguments)
        if continues:
            if not self.is_last(cache):
                raise ValueError(
                    f"this call continues a cache that holds {past} tokens but was not filled "
                    "by this model's last prefill, whose frozen PIA states it would use: "
                    "start from a new cache (or none) with the whole prompt"
                )
            self.runtime.enter(False, inputs.shape[0])
            return
        self.runtime.state_mask = fresh_prompt_mask(arguments, inputs.shape[1])
        self.last_cache = None if cache is None else weakref.ref(cache)
        self.runtime.enter(True, inputs.shape[0])

    def _check_protocol(
        self, continues: bool, past: int, cache: Any, arguments: Mapping[str, Any]
    ) -> None:
        position = arguments.get("cache_position")
        if (
            cache is None
            and isinstance(position, torch.Tensor)
            and position.numel()
            and int(position.min()) > 0
        ):
            raise protocol_error(
                "a call at cache_position > 0 passes no transformers Cache that eas_kernels "
                "recognises"
            )
        if self.generate_calls is None:
            return
        first = self.generate_calls == 0
        self.generate_calls += 1
        if first and continues:
            raise ValueError(
                f"generate() continues a cache that already holds {past} tokens (a continued "
                "conversation): the PIA states average the whole prompt at the prefill, and "
                "this call does not see it. Pass the whole conversation as the prompt, "
                "without a cache"
            )
        if not first and not continues:
            raise protocol_error(
                "generate() called the model again without a Cache that holds the prompt "
                f"(found {'no Cache' if cache is None else 'an empty Cache'})"
            )

    # ------------------------------------------------------------------ caches
    def find_cache(self, values: Any) -> Any:
        """The first ``transformers`` ``Cache`` among ``values``, else None."""
        return next((value for value in values if isinstance(value, self.cache_class)), None)

    def cached_tokens(self, cache: Any) -> int:
        """Tokens ``cache`` holds (0 for None, or when no layer tracks a length)."""
        if cache is None:
            return 0
        try:
            return int(cache.get_seq_length())
        except ValueError:  # every layer skipped: no layer tracks a length
            return 0

    def is_last(self, cache: Any) -> bool:
        return self.last_cache is not None and self.last_cache() is cache

    @property
    def all_skipped(self) -> bool:
        assert self.patch is not None
        return len(self.patch.skipped_mhas) == len(self.patch.blocks)

    def mark_skipped(self, cache: Any) -> None:
        """Put a ``DummyLayer`` in the empty cache slot of each skipped layer."""
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            return
        assert self.patch is not None
        if self.dummy_class is SkippedLayerSlot and getattr(cache, "is_compileable", False):
            import transformers

            raise ValueError(
                f"a static (compileable) cache, such as generate(cache_implementation="
                f"'static') makes, needs transformers >= 5.23 on a patch_hf model (its "
                f"DummyLayer holds a skipped layer's slot); this is transformers "
                f"{transformers.__version__}: use the default dynamic cache, or upgrade"
            )
        skipped = self.patch.skipped_mhas
        if len(skipped) == len(layers):
            return  # keep one layer that tracks the sequence length
        for index in skipped:
            if index < len(layers) and not isinstance(layers[index], self.dummy_class):
                if getattr(layers[index], "is_initialized", False):
                    continue  # filled while the layer still ran attention: leave it
                layers[index] = self.dummy_class()

    def on_skipped_call(self, index: int, args: tuple, kwargs: dict) -> None:
        cache = self.find_cache([*args, *kwargs.values()])
        if cache is not None:
            self.mark_skipped(cache)

    def check_first_layer(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the first decoder layer: the cache it gets agrees with the phase."""
        if self.all_skipped:
            return  # no layer tracks a length
        cache = self.find_cache([*args, *kwargs.values()])
        holds = self.cached_tokens(cache) > 0
        if holds != self.runtime.decoding:
            raise protocol_error(
                f"the decoder layers get {'no' if cache is None else 'a'} Cache holding "
                f"{self.cached_tokens(cache)} tokens in a "
                f"{'decode' if self.runtime.decoding else 'fresh'} call"
            )


def check_generate_options(model: nn.Module, kwargs: dict, subject: str) -> None:
    """Refuse (ValueError) ``generate()`` options that cannot give the prompt's states or
    routes: ``use_cache=False``, ``prefill_chunk_size`` and assisted generation. ``subject``
    names the model in messages (``"a patch_hf model"``)."""

    def option(name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        return getattr(config, name, None)

    if option("use_cache") is False:
        raise ValueError(
            f"generate(use_cache=False) is not supported on {subject}: without a cache every "
            "step is a fresh call, and the PIA states would average the generated tokens; "
            "keep the default use_cache=True"
        )
    if option("prefill_chunk_size") is not None:
        raise ValueError(
            f"generate(prefill_chunk_size={option('prefill_chunk_size')}) is not supported on "
            f"{subject}: the PIA states average the whole prompt, which no chunk sees; leave "
            "prefill_chunk_size=None"
        )
    used = [name for name in _ASSISTED_OPTIONS if option(name) is not None]
    if used:
        raise ValueError(
            f"assisted generation ({', '.join(used)}) is not supported on {subject}: its "
            "first call feeds draft tokens with the prompt, and they would enter the PIA states"
        )


class _GenerateWithEAS:
    """``model.generate`` on a patched instance: refuses what EAS cannot serve, and tells
    the call hook where a generation starts and ends."""

    def __init__(self, model: nn.Module, hook: _HFCallHook) -> None:
        self.model, self.hook = model, hook
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check_generate_options(self.model, kwargs, "a patch_hf model")
        outer = self.hook.generate_calls
        self.hook.generate_calls = 0
        try:
            with expected_new_tokens(self.model, self._max_new_tokens(kwargs)):
                return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            self.hook.generate_calls = outer

    def _max_new_tokens(self, kwargs: dict) -> int | None:
        """The ``max_new_tokens`` of this call (or of its generation config), for ``auto``;
        None when it is not an int >= 1 (then ``auto`` assumes a long answer)."""
        count = kwargs.get("max_new_tokens")
        if count is None:
            config = kwargs.get("generation_config") or getattr(
                self.model, "generation_config", None
            )
            count = getattr(config, "max_new_tokens", None)
        valid = isinstance(count, int) and not isinstance(count, bool) and count >= 1
        return count if valid else None


class _InstanceAttribute:
    """An attribute set on one module instance; ``remove()`` puts back what was there."""

    def __init__(self, module: nn.Module, name: str, value: Any) -> None:
        self.module, self.name = module, name
        self.previous = module.__dict__.get(name)
        module.__dict__[name] = value

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop(self.name, None)
        else:
            self.module.__dict__[self.name] = self.previous


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a ``transformers`` ``Cache``."""
    if not isinstance(getattr(cache, "layers", None), list):
        raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}")
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def patch_hf(
    model: nn.Module, plan: SkipPlan | RoutePlan, *, search: bool | str = False
) -> nn.Module:
    """Install EAS on a Hugging Face LLaMA-family model, in place, and return it.

    With a :class:`~eas_kernels.routing.RoutePlan` instead of a :class:`SkipPlan`, each
    example skips its own units (:func:`eas_kernels.routing.patch_routes`; ``generate()``
    with greedy search, sampling and beam search, and :class:`~eas_kernels.routing.
    hf_trainer.RouteTrainer`); :func:`unpatch_hf` undoes it too.

    Same semantics as :func:`eas_kernels.patch_lavin` (EAS_SPEC §2): kept layers get a
    rank-``plan.adapter_rank`` PIA before ``q_proj/k_proj/v_proj``, skipped layers run
    ``x + mlp(v + PIA(v))`` with ``v = post_attention_layernorm(x)``, no attention and no KV
    cache; every non-PIA parameter is frozen (FFN and whole-block skips, and ``search``,
    as in :func:`~eas_kernels.patch_lavin`). Instances are patched, never classes, so
    other models in the process are unaffected; :func:`unpatch_hf` undoes it. A failure
    while patching, ``KeyboardInterrupt`` included, leaves the model as it was. See the
    module docstring for how training calls, ``generate()`` and caches are handled.
    """
    if is_route_plan(plan):
        if not hasattr(model, "config"):
            raise TypeError(
                f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}"
            )
        return patch_routed(model, plan, search, HF_LLAMA)
    candidates = check_patch_arguments(model, plan, search)
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    hook = _HFCallHook(model)
    with all_or_nothing(model):
        patch = EASPatch(model, plan, candidates, HF_LLAMA, on_skipped_call=hook.on_skipped_call)
        hook.patch = patch
        patch.keep(model.register_forward_pre_hook(hook, with_kwargs=True))
        first = patch.blocks[0]
        patch.keep(first.register_forward_pre_hook(hook.check_first_layer, with_kwargs=True))
        if callable(getattr(type(model), "generate", None)):
            patch.keep(_InstanceAttribute(model, "generate", _GenerateWithEAS(model, hook)))
    return model


def unpatch_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_hf`: the original modules, weights (bitwise) and flags."""
    if isinstance(model, nn.Module) and hasattr(model, ROUTES_ATTR):
        from .routing import routes_of, unpatch_routes

        if routes_of(model).layout != HF_LLAMA:
            raise TypeError("model was not routed by patch_hf (use eas_kernels.unpatch)")
        return unpatch_routes(model)
    patch = patch_of(model)
    if patch.layout != HF_LLAMA:
        raise TypeError("model was not patched by patch_hf (use eas_kernels.unpatch)")
    patch.remove()
    return model
