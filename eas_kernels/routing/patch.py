"""Install per-example routing on a model of LaVIN-style blocks or of Hugging Face LLaMA
decoder layers, and undo it."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..layout import HF_LLAMA, LAVIN, BlockLayout
from ..patch import _PATCH_ATTR, ROUTES_ATTR, _MaskHook, all_or_nothing
from ..pia import PIA
from .control import RouteControl
from .forward import RoutedForward
from .plan import RoutePlan

# Block attributes (and state-dict keys): layers.{i}.router.weight, layers.{i}.route_pia.*
# (routed layers), layers.{i}.kept_adapter.* (every layer, with a plan.adapter_rank).
ROUTER_NAME = "router"
SHORTCUT_NAME = "route_pia"
ADAPTER_NAME = "kept_adapter"
NAMES = (ROUTER_NAME, SHORTCUT_NAME, ADAPTER_NAME)


class RoutePatch:
    """Routers, shortcut adapters and routed forwards installed on one model."""

    def __init__(self, model: nn.Module, plan: RoutePlan) -> None:
        self.layout = layout_of(model)
        blocks, widths = self.layout.checked_blocks(model, plan.num_layers)
        for index, block in enumerate(blocks):
            dim = widths[index][0]
            for name in ("skip_rank", "adapter_rank"):
                rank = getattr(plan, name)
                if rank is not None and rank > dim:
                    raise ValueError(f"plan.{name} = {rank} exceeds layer {index}'s width {dim}")
            for name in NAMES:
                if hasattr(block, name):
                    raise ValueError(f"block {index} already has an attribute {name!r}")
        self.model, self.plan, self.blocks = model, plan, blocks
        self.control = RouteControl(plan)
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.forwards: list[RoutedForward] = []
        columns = {layer: column for column, layer in enumerate(plan.layers)}
        forward_class = RoutedForward
        if self.layout == HF_LLAMA:
            from .hf import HFRoutedForward as forward_class
        for index, block in enumerate(blocks):
            dim, dtype, device = widths[index]
            router = pia = adapter = None
            if plan.adapter_rank is not None:
                adapter = PIA(
                    dim, plan.adapter_rank, token_mixing=False, temperature=plan.temperature
                )
                block.add_module(ADAPTER_NAME, adapter.to(device=device, dtype=dtype))
            if index in columns:
                router = nn.Linear(dim, 2, bias=False).to(device=device, dtype=dtype)
                nn.init.zeros_(router.weight)  # a fresh router keeps every unit (ties keep)
                pia = PIA(
                    dim,
                    plan.skip_rank,
                    token_mixing=plan.token_mixing,
                    temperature=plan.temperature,
                )
                block.add_module(ROUTER_NAME, router)
                block.add_module(SHORTCUT_NAME, pia.to(device=device, dtype=dtype))
            forward = forward_class(
                index, columns.get(index), block, self.layout, router, pia, adapter, plan.unit,
                self.control,
            )  # fmt: skip
            block.forward = forward
            self.forwards.append(forward)
        self._handles = []
        for forward in self.forwards:  # state_dict() and loads see the pretrained weights
            for linear in forward.attention_linears + forward.ffn_linears:
                unmerge = _Unmerge(forward)
                self._handles.append(linear.register_state_dict_pre_hook(unmerge))
                self._handles.append(linear.register_load_state_dict_pre_hook(unmerge))
        if self.layout == HF_LLAMA:
            self._install_hf_hooks(model)
        else:
            signature = inspect.signature(model.forward)
            if {"prompt_mask", "attention_mask"} & set(signature.parameters):
                hook = _MaskHook(self.control, signature)
                self._handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        setattr(model, ROUTES_ATTR, self)

    def _install_hf_hooks(self, model: nn.Module) -> None:
        """The prompt-mask hook and the checked ``generate`` (:mod:`.hf`)."""
        from ..hf import _InstanceAttribute
        from .hf import GenerateRouted, PromptMaskHook

        hook = PromptMaskHook(model, self.control)
        self._handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        if callable(getattr(type(model), "generate", None)):
            generate = GenerateRouted(model, self.control)
            self._handles.append(_InstanceAttribute(model, "generate", generate))

    def routers(self) -> list[nn.Linear]:
        return [forward.router for forward in self.forwards if forward.router is not None]

    def shortcuts(self) -> list[PIA]:
        """The adapters that train with the shortcuts: ``PIA_s`` / ``A`` and ``A_k``."""
        adapters = [forward.pia for forward in self.forwards] + [
            forward.adapter for forward in self.forwards
        ]
        return [adapter for adapter in adapters if adapter is not None]

    def remove(self) -> None:
        """Weights back bitwise, routers, adapters and hooks gone, ``requires_grad`` as before."""
        for forward in self.forwards:
            forward.release()
            block = forward.block
            block.__dict__.pop("forward", None)
            for name in NAMES:
                if hasattr(block, name):
                    delattr(block, name)
        for handle in self._handles:
            handle.remove()
        for parameter, flag in self._requires_grad:
            parameter.requires_grad_(flag)
        delattr(self.model, ROUTES_ATTR)


class _Unmerge:
    """State-dict and load-state-dict pre-hook of a routed layer's ``W1/W3``: a batch-1
    merge is put back (bitwise) before the weights are read or overwritten; the next
    decode call merges again."""

    def __init__(self, forward: RoutedForward) -> None:
        self.forward = forward

    def __call__(self, module: nn.Module, *args: object) -> None:
        self.forward.unmerge()


def layout_of(model: nn.Module) -> BlockLayout:
    """The block layout of ``model``: LaVIN-style blocks or Hugging Face LLaMA decoder
    layers; ValueError when it has neither."""
    for layout in (LAVIN, HF_LLAMA):
        if layout.find_blocks(model):
            return layout
    raise ValueError(f"model has neither {LAVIN.description} nor {HF_LLAMA.description}")


def routes_of(model: nn.Module) -> RoutePatch:
    """What :func:`patch_routes` installed on ``model``; TypeError when it is not routed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patch = getattr(model, ROUTES_ATTR, None)
    if not isinstance(patch, RoutePatch):
        raise TypeError("model is not routed (call eas_kernels.routing.patch_routes first)")
    return patch


def patch_routes(model: nn.Module, plan: RoutePlan) -> nn.Module:
    """Install per-example routing (ROE_SPEC) on a model of LaVIN-style blocks or of Hugging
    Face LLaMA decoder layers (``LlamaForCausalLM``, LLaVA's language model), in place.

    Every layer of ``plan.layers`` gets ``block.router`` (a bias-free ``d → 2`` linear map,
    zero at first: a fresh router keeps every unit) and ``block.route_pia``, the adapter of
    its shortcut (``plan.unit``); every layer gets ``block.kept_adapter`` (``A_k``, with a
    ``plan.adapter_rank``; its up projections start at zero, so a fresh routed model
    computes the base model) and runs :class:`~eas_kernels.routing.forward.RoutedForward`.
    Every base parameter is frozen.
    The route of a fresh call (``start_pos`` None or 0) reads the prompt mask from the
    model's ``prompt_mask`` (else ``attention_mask``) argument; decode calls keep it. On a
    Hugging Face model the phase comes from the call's cache, the prompt mask from
    ``labels`` and ``attention_mask``, each layer's cache slot holds the examples that run
    it, and ``generate()`` (greedy, sampling, beam search) decodes on the prompt's routes
    (:mod:`eas_kernels.routing.hf`).

    TypeError/ValueError before anything changes when the arguments do not fit, when the
    model is patched by EAS (:func:`~eas_kernels.patch_lavin`) or already routed; a failure
    while patching leaves the model as it was. :func:`unpatch_routes` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, RoutePlan):
        raise TypeError(f"plan must be an eas_kernels.routing.RoutePlan, got {type(plan).__name__}")
    if hasattr(model, ROUTES_ATTR):
        raise ValueError("model is already routed by eas_kernels")
    if hasattr(model, _PATCH_ATTR):
        raise ValueError(
            "model is patched by eas_kernels.patch_lavin/patch_hf: a model is either statically "
            "skipped (EAS) or routed per example, not both (unpatch it first)"
        )
    with all_or_nothing(model):
        RoutePatch(model, plan)
    return model


def unpatch_routes(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_routes`, in place: merged weights back bitwise, routers and
    adapters removed, ``requires_grad`` as before."""
    routes_of(model).remove()
    return model


def route_control(model: nn.Module) -> RouteControl:
    """The :class:`RouteControl` of a routed model (mode, temperature, records)."""
    return routes_of(model).control


def force_routes(model: nn.Module, routes: torch.Tensor | None) -> None:
    """Route every fresh call by ``routes`` (``(B, len(plan.layers))`` bool, True = skip)
    instead of the routers, until called with None (analysis, tests)."""
    routes_of(model).control.force(routes)


def set_routing(
    model: nn.Module, mode: str, *, temperature: float = 1.0, keep_bias: float = 0.0
) -> None:
    """How the next fresh calls route: ``"hard"``, ``"soft"`` or ``"random"``
    (:class:`RouteControl`)."""
    routes_of(model).control.set_mode(mode, temperature=temperature, keep_bias=keep_bias)
