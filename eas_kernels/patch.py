"""Patch LaVIN-style blocks with EAS (EAS_SPEC §2).

Kept layer (MHA runs; rank-``adapter_rank`` router adapter, no token mixing)::

    u = attention_norm(x);  h = x + Attn(u + PIA_a(u));  out = h + FFN(ffn_norm(h))

Skipped layer (MHA removed; rank-``skip_rank`` PIA with token mixing)::

    v = ffn_norm(x);  out = x + FFN(v + PIA_s(v))

A block is any module with ``attention`` (``wq``, ``wk``, ``wv`` linear), ``feed_forward``
(``w1``, ``w2``, ``w3`` linear), ``attention_norm`` and ``ffn_norm`` — LaVIN's and Meta
LLaMA's ``TransformerBlock`` and :mod:`eas_kernels.models.lavin`. Patching works on
instances: PIAs become children ``attn_adapter`` / ``skip_pia`` of the block (state dict
keys ``layers.{i}.attn_adapter.down1.weight``…), adapters are forward hooks on the norms,
and a skipped block's ``forward`` is replaced on the instance by one without attention.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable

import torch
from torch import nn

from ._checks import check_layer_indices, check_token_mask
from .pia import PIA
from .plan import SkipPlan
from .runtime import AdapterSite, EASRuntime

_PATCH_ATTR = "_eas_patch"
_ATTN_ADAPTER = "attn_adapter"
_SKIP_PIA = "skip_pia"


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _looks_like_block(module: nn.Module) -> bool:
    attention = getattr(module, "attention", None)
    feed_forward = getattr(module, "feed_forward", None)
    return (
        isinstance(attention, nn.Module)
        and isinstance(feed_forward, nn.Module)
        and isinstance(getattr(module, "attention_norm", None), nn.Module)
        and isinstance(getattr(module, "ffn_norm", None), nn.Module)
        and all(_linear(attention, name) for name in ("wq", "wk", "wv"))
        and all(_linear(feed_forward, name) for name in ("w1", "w2", "w3"))
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The LaVIN-style blocks of ``model`` in module order (outermost matches only)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if _looks_like_block(module):
            blocks.append(module)
            inside.update(id(sub) for sub in module.modules())
    return blocks


def patch_of(model: nn.Module) -> _Patch:
    """What :func:`patch_lavin` installed on ``model``; TypeError when it is not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patch = getattr(model, _PATCH_ATTR, None)
    if not isinstance(patch, _Patch):
        raise TypeError("model is not patched by eas_kernels (call eas_kernels.patch_lavin first)")
    return patch


def runtime_of(model: nn.Module) -> EASRuntime:
    """The EAS runtime of a patched model; TypeError when ``model`` is not patched."""
    return patch_of(model).runtime


def _check_block(index: int, block: nn.Module) -> tuple[int, torch.dtype, torch.device]:
    """Width, dtype and device of a block; ValueError when its adapter targets disagree."""
    linears = [block.attention.wq, block.attention.wk, block.attention.wv]
    linears += [block.feed_forward.w1, block.feed_forward.w3]
    dims = {linear.in_features for linear in linears}
    dtypes = {linear.weight.dtype for linear in linears}
    devices = {linear.weight.device for linear in linears}
    if len(dims) != 1 or len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(
            f"block {index}: wq/wk/wv/w1/w3 must share input width, dtype and device, got "
            f"{sorted(dims)}, {sorted(map(str, dtypes))}, {sorted(map(str, devices))}"
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise TypeError(f"block {index}: weights must be floating point, got {dtype}")
    for name in (_ATTN_ADAPTER, _SKIP_PIA):
        if hasattr(block, name):
            raise ValueError(f"block {index} already has an attribute {name!r}")
    return dims.pop(), dtype, devices.pop()


def start_pos_index(block: nn.Module) -> int | None:
    """Position of ``start_pos`` among the arguments of ``type(block).forward`` (no self)."""
    parameters = list(inspect.signature(type(block).forward).parameters)[1:]
    return parameters.index("start_pos") if "start_pos" in parameters else None


def _skipped_block_forward(
    self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object
) -> torch.Tensor:
    """A skipped block: ``x + FFN(ffn_norm(x))`` (the PIA is the hook on ``ffn_norm``)."""
    return x + self.feed_forward(self.ffn_norm(x))


class _Patch:
    """What :func:`patch_lavin` installs on one model: blocks, sites and role switching."""

    def __init__(self, model: nn.Module, plan: SkipPlan, search: bool) -> None:
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError(
                "model has no LaVIN-style blocks (modules with attention.wq/wk/wv, "
                "feed_forward.w1/w2/w3, attention_norm and ffn_norm)"
            )
        if len(blocks) != plan.num_layers:
            raise ValueError(
                f"plan is for {plan.num_layers} layers but the model has {len(blocks)} blocks"
            )
        layouts = [_check_block(i, block) for i, block in enumerate(blocks)]
        self.blocks = blocks
        self.runtime = EASRuntime()
        self.attn_sites: dict[int, AdapterSite] = {}
        self.skip_sites: dict[int, AdapterSite] = {}
        self._released_caches: dict[int, dict[str, tuple]] = {}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        skipped = set(plan.skipped)
        for index, (block, (dim, dtype, device)) in enumerate(zip(blocks, layouts, strict=True)):
            if search or index not in skipped:
                adapter = PIA(
                    dim, plan.adapter_rank, token_mixing=False, temperature=plan.temperature
                )
                block.add_module(_ATTN_ADAPTER, adapter.to(device=device, dtype=dtype))
                targets = (block.attention.wq, block.attention.wk, block.attention.wv)
                self.attn_sites[index] = self._site(
                    index, "attention", adapter, block.attention_norm, targets
                )
            if search or index in skipped:
                pia = PIA(dim, plan.skip_rank, token_mixing=True, temperature=plan.temperature)
                block.add_module(_SKIP_PIA, pia.to(device=device, dtype=dtype))
                targets = (block.feed_forward.w1, block.feed_forward.w3)
                self.skip_sites[index] = self._site(index, "skip", pia, block.ffn_norm, targets)
            position = start_pos_index(block)
            block.register_forward_pre_hook(self._block_pre_hook(position), with_kwargs=True)
        self.skipped: tuple[int, ...] = ()
        self.set_skipped(plan.skipped)

    def _site(
        self, index: int, kind: str, pia: PIA, norm: nn.Module, targets: tuple[nn.Linear, ...]
    ) -> AdapterSite:
        site = AdapterSite(self.runtime, index, kind, pia, norm, targets)
        self.runtime.sites.append(site)
        return site

    def _block_pre_hook(self, position: int | None):  # noqa: ANN202 - hook factory
        runtime = self.runtime

        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            start_pos = kwargs.get("start_pos")
            if start_pos is None and position is not None and len(args) > position:
                start_pos = args[position]
            runtime.on_block_call(start_pos, args[0].shape[0] if args else kwargs["x"].shape[0])

        return hook

    def check_skipped(self, indices: Iterable[int]) -> tuple[int, ...]:
        chosen = check_layer_indices(indices, "indices", len(self.blocks))
        for index in range(len(self.blocks)):
            if index in chosen and index not in self.skip_sites:
                raise ValueError(
                    f"layer {index} has no skip PIA (patch with it in the plan, or search=True)"
                )
            if index not in chosen and index not in self.attn_sites:
                raise ValueError(
                    f"layer {index} has no attention adapter and cannot run its MHA "
                    "(patch with search=True to switch any layer)"
                )
        return chosen

    def set_skipped(self, indices: Iterable[int]) -> None:
        chosen = self.check_skipped(indices)
        self.runtime.forget_states()
        for index, block in enumerate(self.blocks):
            skip = index in chosen
            if index in self.skip_sites:
                self.skip_sites[index].active = skip
            if index in self.attn_sites:
                self.attn_sites[index].active = not skip
            if skip:
                block.forward = types.MethodType(_skipped_block_forward, block)
                self._release_cache(index, block.attention)
            else:
                block.__dict__.pop("forward", None)
                self._restore_cache(index, block.attention)
        self.skipped = chosen

    def _release_cache(self, index: int, attention: nn.Module) -> None:
        released = self._released_caches.setdefault(index, {})
        for name in ("cache_k", "cache_v"):
            cache = getattr(attention, name, None)
            if isinstance(cache, torch.Tensor):
                released[name] = (cache.shape, cache.dtype, cache.device)
                setattr(attention, name, None)

    def _restore_cache(self, index: int, attention: nn.Module) -> None:
        for name, (shape, dtype, device) in self._released_caches.pop(index, {}).items():
            if getattr(attention, name, None) is None:
                setattr(attention, name, torch.zeros(shape, dtype=dtype, device=device))


def _install_mask_hook(model: nn.Module, runtime: EASRuntime) -> None:
    """Feed ``prompt_mask`` / ``attention_mask`` of the model's forward to the runtime."""
    signature = inspect.signature(model.forward)
    if not {"prompt_mask", "attention_mask"} & set(signature.parameters):
        return

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return  # the forward itself reports the bad call
        mask = bound.get("prompt_mask")
        if mask is None:
            mask = bound.get("attention_mask")
        runtime.state_mask = None if mask is None else _check_prompt_mask(mask)

    model.register_forward_pre_hook(hook, with_kwargs=True)


def _check_prompt_mask(mask: object) -> torch.Tensor:
    return check_token_mask(mask, "prompt_mask")


def patch_lavin(model: nn.Module, plan: SkipPlan, *, search: bool = False) -> nn.Module:
    """Install EAS on ``model`` in place and return it.

    Kept layers get a rank-``plan.adapter_rank`` PIA (``token_mixing=False``) on the
    attention input; skipped layers get a rank-``plan.skip_rank`` PIA on the FFN input,
    run no attention and hold no KV cache. Every parameter except the PIAs' is frozen.
    Fresh PIAs return an exact zero, so the patched model computes the unpatched one
    with the skipped MHAs removed. ``search=True`` installs both PIAs in every layer so
    that :func:`set_skipped` can choose any skip set (the redundancy search needs it).

    Raises ``TypeError``/``ValueError`` before changing anything when ``model`` or
    ``plan`` do not fit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, SkipPlan):
        raise TypeError(f"plan must be an eas_kernels.SkipPlan, got {type(plan).__name__}")
    if not isinstance(search, bool):
        raise TypeError(f"search must be a bool, got {type(search).__name__}")
    if hasattr(model, _PATCH_ATTR):
        raise ValueError("model is already patched by eas_kernels")
    patch = _Patch(model, plan, search)
    _install_mask_hook(model, patch.runtime)
    setattr(model, _PATCH_ATTR, patch)
    return model


def set_skipped(model: nn.Module, indices: Iterable[int]) -> None:
    """Change which layers skip their MHA (between steps; frozen states are dropped).

    Every layer in ``indices`` needs a skip PIA and every other layer an attention
    adapter: true for any set after ``patch_lavin(model, plan, search=True)``.
    """
    patch_of(model).set_skipped(indices)


def skipped_layers(model: nn.Module) -> tuple[int, ...]:
    """The layers whose MHA the patched ``model`` currently skips."""
    return patch_of(model).skipped


def set_prompt_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Set the ``(B, n)`` bool prompt mask for the next training forward or prefill.

    Needed only for models whose ``forward`` takes no ``prompt_mask`` / ``attention_mask``
    argument (e.g. LaVIN's own ``forward_inference``); ``None`` averages all tokens.
    """
    runtime_of(model).state_mask = None if mask is None else _check_prompt_mask(mask)
