"""Patch transformer blocks with EAS (EAS_SPEC §2), and undo it.

Each layer plays a :class:`~eas_kernels.roles.Role` of the plan — kept, skipped MHA,
skipped FFN or skipped block — and the role says what it runs, e.g.::

    kept         u = attention_norm(x);  h = x + Attn(u + PIA_a(u));  out = h + FFN(ffn_norm(h))
    skipped_mha  v = ffn_norm(x);  out = x + FFN(v + PIA_s(v))

:class:`EASPatch` installs the roles on any block layout (:mod:`eas_kernels.layout`), on
instances: PIAs become children of the block named by their role (``attn_adapter``,
``skip_pia``, ...; state dict keys ``...layers.{i}.attn_adapter.down1.weight``), adapters
are forward hooks on the norms (:class:`~eas_kernels.runtime.AdapterSite`), and a role
that skips a part replaces the block's or the FFN's ``forward`` on the instance.
:func:`patch_lavin` adds what LaVIN-style models need (phases from ``start_pos``, masks
from ``prompt_mask`` / ``attention_mask``); :mod:`eas_kernels.hf` does the same for
Hugging Face models.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ._checks import check_layer_indices, check_token_mask
from .layout import LAVIN, BlockLayout
from .pia import PIA
from .plan import SkipPlan
from .roles import (
    CANDIDATE_SETS,
    DEFAULT_CANDIDATES,
    ROLES,
    Role,
    SkippedCallHook,
    candidate_roles,
    pia_names,
)
from .runtime import AdapterSite, EASRuntime

if TYPE_CHECKING:
    from .routing import RoutePlan

_PATCH_ATTR = "_eas_patch"
ROUTES_ATTR = "_eas_routes"  # eas_kernels.routing's patch: a model is patched or routed


class Removable(Protocol):
    """What :meth:`EASPatch.keep` takes: a hook handle, or anything undone by ``remove()``."""

    def remove(self) -> None: ...


def patch_of(model: nn.Module) -> EASPatch:
    """What a patch function installed on ``model``; TypeError when it is not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patch = getattr(model, _PATCH_ATTR, None)
    if not isinstance(patch, EASPatch):
        raise TypeError(
            "model is not patched by eas_kernels (call eas_kernels.patch_lavin or patch_hf first)"
        )
    return patch


def is_patched(model: nn.Module) -> bool:
    """Whether a patch function installed EAS on ``model``."""
    return isinstance(getattr(model, _PATCH_ATTR, None), EASPatch)


def runtime_of(model: nn.Module) -> EASRuntime:
    """The EAS runtime of a patched model; TypeError when ``model`` is not patched."""
    return patch_of(model).runtime


def check_search(search: object) -> str | None:
    """The candidate set a ``search`` argument asks for: None, or a key of
    :data:`~eas_kernels.roles.CANDIDATE_SETS`.

    ``False`` installs only what the plan needs, ``True`` means ``"mha"`` (EAS).
    """
    if isinstance(search, bool):
        return DEFAULT_CANDIDATES if search else None
    if isinstance(search, str) and search in CANDIDATE_SETS:
        return search
    raise ValueError(f"search must be a bool or one of {sorted(CANDIDATE_SETS)}, got {search!r}")


def check_patch_arguments(model: object, plan: object, search: object) -> str | None:
    """TypeError/ValueError for arguments no patch function accepts; the candidate set."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, SkipPlan):
        raise TypeError(f"plan must be an eas_kernels.SkipPlan, got {type(plan).__name__}")
    candidates = check_search(search)
    if hasattr(model, _PATCH_ATTR):
        raise ValueError("model is already patched by eas_kernels")
    if hasattr(model, ROUTES_ATTR):
        raise ValueError(
            "model is routed per example (eas_kernels.routing.patch_routes): a model is either "
            "statically skipped (EAS) or routed, not both (unpatch_routes it first)"
        )
    return candidates


# Per-module dicts a patch may add entries to (hooks, children, parameters): restored by
# key set on failure.
_MODULE_DICTS = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class _ModelStructure:
    """What patching may change on a model, taken before it does: every module's instance
    attributes, children, parameters, buffers and hooks, and each parameter's
    ``requires_grad``. :meth:`restore` puts all of it back (the same objects)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (
                module,
                dict(module.__dict__),
                {
                    name: dict(getattr(module, name))
                    for name in _MODULE_DICTS
                    if hasattr(module, name)
                },
            )
            for module in model.modules()
        ]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, attributes, dicts in self.modules:
            for name in set(module.__dict__) - set(attributes):
                del module.__dict__[name]
            module.__dict__.update(attributes)
            for name, entries in dicts.items():
                live = getattr(module, name)
                live.clear()
                live.update(entries)
        for parameter, flag in self.requires_grad:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Patch ``model`` in the body, or not at all: if the body raises — ``KeyboardInterrupt``
    included — the model's modules, hooks, attributes and flags are put back as they were
    before re-raising (:class:`_ModelStructure`; weights are never written while patching)."""
    structure = _ModelStructure(model)
    try:
        yield
    except BaseException:
        structure.restore()
        raise


class EASPatch:
    """PIAs, hooks and layer roles installed on one model; :meth:`remove` undoes all of it.

    Args:
        model: the module tree; its blocks are found with ``layout``.
        plan: skip sets and adapter sizes; ``plan.num_layers`` must equal the block count.
        search: None (install what ``plan`` needs) or a key of
            :data:`~eas_kernels.roles.CANDIDATE_SETS` (install, in every layer, the PIAs
            of every role that candidate set allows, so that a search can choose any skip
            set).
        layout: attribute names of the blocks (:data:`eas_kernels.layout.LAVIN`, ...).
        on_skipped_call: called as ``f(layer, args, kwargs)`` by a block whose MHA is
            skipped before it computes (the Hugging Face patch marks the layer's KV-cache
            slot there).

    Each layer's :class:`~eas_kernels.roles.Role` comes from ``plan.role(index)``; the role
    says what to install and how the block runs. Everything is validated before the model
    is touched.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: SkipPlan,
        search: str | None,
        layout: BlockLayout,
        on_skipped_call: SkippedCallHook | None = None,
    ) -> None:
        blocks, widths = layout.checked_blocks(model, plan.num_layers)
        for index in range(plan.num_layers):
            role = plan.role(index)
            if ROLES.get(role.name) is not role:
                raise ValueError(f"layer {index}: {role!r} is not registered (register_role)")
        for index, block in enumerate(blocks):
            for name in pia_names():
                if hasattr(block, name):
                    raise ValueError(f"block {index} already has an attribute {name!r}")
        width = min(dim for dim, _, _ in widths)
        for name in ("skip_rank", "adapter_rank"):
            if getattr(plan, name) > width:
                raise ValueError(
                    f"plan.{name} = {getattr(plan, name)} exceeds the model's width {width}: "
                    "a low-rank adapter's rank must be at most the hidden size"
                )
        self.model = model
        self.plan = plan
        self.search = search
        self.layout = layout
        self.blocks = blocks
        self.runtime = EASRuntime(running=plan.state == "running")
        self.sites: dict[Role, dict[int, AdapterSite]] = {}  # role → layer → site
        self.current = plan  # the plan of the current roles
        self.skipped_mhas: tuple[int, ...] = ()
        self.skipped_ffns: tuple[int, ...] = ()
        self._on_skipped_call = on_skipped_call
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._released_caches: dict[int, dict[str, tuple]] = {}
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        searched = candidate_roles(search) if search is not None else ()
        for index, (block, (dim, dtype, device)) in enumerate(zip(blocks, widths, strict=True)):
            wanted = {*searched, plan.role(index)}
            for role in ROLES.values():  # registry order: the PIAs' init order is fixed
                if role in wanted:
                    self._add_site(index, block, role, dim, dtype, device)
        restore = _RestoreMergedWeights(self.runtime)
        for linear in {id(t): t for s in self.runtime.sites for t in s.targets}.values():
            self.keep(linear.register_state_dict_pre_hook(restore))
            self.keep(linear.register_load_state_dict_pre_hook(restore))
        self.apply(plan)
        setattr(model, _PATCH_ATTR, self)

    def _add_site(
        self,
        index: int,
        block: nn.Module,
        role: Role,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        plan, layout = self.plan, self.layout
        pia = PIA(
            dim,
            role.rank(plan),
            token_mixing=role.token_mixing(plan),
            temperature=plan.temperature,
        )
        block.add_module(role.pia_name, pia.to(device=device, dtype=dtype))
        norm, targets = role.hooked_norm(block, layout), role.targets(block, layout)
        site = AdapterSite(self.runtime, index, role, pia, norm, targets)
        self.runtime.sites.append(site)
        self.sites.setdefault(role, {})[index] = site

    def keep(self, handle: Removable) -> None:
        """Remember a hook (or anything with ``remove()``) that :meth:`remove` must undo."""
        self._handles.append(handle)

    def check_skip_sets(self, indices: Iterable[int], ffns: Iterable[int] = ()) -> SkipPlan:
        """The patch's plan with the skip sets ``indices`` (MHAs) and ``ffns``, validated
        (:meth:`check_roles`)."""
        count = len(self.blocks)
        plan = self.plan.replace(
            skipped=list(check_layer_indices(indices, "indices", count)),
            skipped_ffns=list(check_layer_indices(ffns, "ffns", count)),
        )
        self.check_roles(plan)
        return plan

    def check_roles(self, plan: SkipPlan) -> None:
        """ValueError when a layer lacks the PIA its role under ``plan`` needs."""
        for index in range(len(self.blocks)):
            role = plan.role(index)
            if index not in self.sites.get(role, {}):
                raise ValueError(
                    f"layer {index} has no {role.label} and cannot {role.duty} (patch with "
                    "that role in the plan, or with a search candidate set that allows it)"
                )

    def set_skipped(self, indices: Iterable[int], ffns: Iterable[int] = ()) -> None:
        """Switch to the roles of the skip sets ``indices`` (MHAs) and ``ffns``."""
        self.apply(self.check_skip_sets(indices, ffns))

    def apply(self, plan: SkipPlan) -> None:
        """Give every layer its role under ``plan`` (checked by :meth:`check_roles`): the
        role's site becomes active, the role installs its forwards, a layer without
        attention releases its KV cache; frozen states are dropped."""
        self.check_roles(plan)
        self.runtime.forget_states()
        roles = tuple(plan.role(index) for index in range(len(self.blocks)))
        for index, (block, role) in enumerate(zip(self.blocks, roles, strict=True)):
            for site_role, sites in self.sites.items():
                if index in sites:
                    sites[index].active = site_role is role
            block.__dict__.pop("forward", None)
            getattr(block, self.layout.feed_forward).__dict__.pop("forward", None)
            role.install(block, self.layout, index, self.sites[role][index], self._on_skipped_call)
            attention = getattr(block, self.layout.attention)
            if role.runs_attention:
                self._restore_cache(index, attention)
            else:
                self._release_cache(index, attention)
        self.current = plan
        self.skipped_mhas = tuple(i for i, role in enumerate(roles) if role.skips_mha)
        self.skipped_ffns = tuple(i for i, role in enumerate(roles) if role.skips_ffn)

    def current_plan(self) -> SkipPlan:
        """The plan of the current roles (the patch's plan with the skip sets of the last
        :meth:`set_skipped`)."""
        return self.current

    def _release_cache(self, index: int, attention: nn.Module) -> None:
        """Free a KV cache held as ``cache_k``/``cache_v`` attributes (LaVIN, Meta)."""
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

    def remove(self) -> None:
        """Undo the patch: weights back bitwise, hooks and PIAs gone, flags restored."""
        self.runtime.unrealize()
        for site in self.runtime.sites:
            site.remove()
        for handle in self._handles:
            handle.remove()
        for index, block in enumerate(self.blocks):
            block.__dict__.pop("forward", None)
            getattr(block, self.layout.feed_forward).__dict__.pop("forward", None)
            self._restore_cache(index, getattr(block, self.layout.attention))
            for name in pia_names():
                if hasattr(block, name):
                    delattr(block, name)
        for parameter, flag in self._requires_grad:
            parameter.requires_grad_(flag)
        delattr(self.model, _PATCH_ATTR)


# Hooks are callable objects, not closures: ``copy.deepcopy`` of a
# patched model then points the copies at the copied modules and runtime.
class _RestoreMergedWeights:
    """State-dict and load-state-dict pre-hook of every adapter target: weights that hold
    a merged PIA go back to their pretrained values (bitwise) before they are read or
    overwritten, so ``state_dict()``, ``save_pretrained`` and ``torch.save`` save the
    pretrained model, and a loaded weight is not overwritten by a later restore. The next
    decode call merges again."""

    def __init__(self, runtime: EASRuntime) -> None:
        self.runtime = runtime

    def __call__(self, module: nn.Module, *args: object) -> None:
        self.runtime.restore_weights()


# ---------------------------------------------------------------------- LaVIN-style models
def start_pos_index(block: nn.Module) -> int | None:
    """Position of ``start_pos`` among the arguments of ``type(block).forward`` (no self)."""
    parameters = list(inspect.signature(type(block).forward).parameters)[1:]
    return parameters.index("start_pos") if "start_pos" in parameters else None


class _StartPosHook:
    """Pre-hook of the first block: its ``start_pos`` None or 0 starts a fresh call, > 0 a
    decode call (:meth:`EASRuntime.enter`). The other blocks of the call carry no hook: a
    LaVIN-style model call runs its blocks in order from the first, whose hook speaks for
    the call (a hooked module costs ~15 µs per call inside a decode step, that is ~2 % of
    a d = 512 step for 31 blocks)."""

    def __init__(self, runtime: EASRuntime, position: int | None) -> None:
        self.runtime, self.position = runtime, position

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        start_pos = kwargs.get("start_pos")
        if start_pos is None and self.position is not None and len(args) > self.position:
            start_pos = args[self.position]
        batch_size = (args[0] if args else next(iter(kwargs.values()))).shape[0]
        self.runtime.enter(start_pos is None or start_pos == 0, batch_size)


_MASK_NAMES = frozenset({"prompt_mask", "attention_mask"})


class _MaskHook:
    """Model pre-hook: ``prompt_mask`` (else ``attention_mask``) of a call → the runtime.
    A call whose arguments reach neither (a decode step) is read without binding them."""

    def __init__(self, runtime: EASRuntime, signature: inspect.Signature) -> None:
        self.runtime, self.signature = runtime, signature
        names = list(signature.parameters)
        self.first_mask = min(names.index(name) for name in _MASK_NAMES if name in names)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(args) <= self.first_mask and _MASK_NAMES.isdisjoint(kwargs):
            self.runtime.state_mask = None
            return
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError:
            return  # the forward itself reports the bad call
        mask = bound.get("prompt_mask")
        if mask is None:
            mask = bound.get("attention_mask")
        self.runtime.state_mask = None if mask is None else check_prompt_mask(mask)


def _install_mask_hook(patch: EASPatch) -> None:
    """Feed ``prompt_mask`` / ``attention_mask`` of the model's forward to the runtime."""
    signature = inspect.signature(patch.model.forward)
    if _MASK_NAMES & set(signature.parameters):
        hook = _MaskHook(patch.runtime, signature)
        patch.keep(patch.model.register_forward_pre_hook(hook, with_kwargs=True))


def check_prompt_mask(mask: object) -> torch.Tensor:
    return check_token_mask(mask, "prompt_mask")


def patch_lavin(
    model: nn.Module, plan: SkipPlan | RoutePlan, *, search: bool | str = False
) -> nn.Module:
    """Install EAS on a model of LaVIN-style blocks, in place, and return it.

    With a :class:`~eas_kernels.routing.RoutePlan` instead of a :class:`SkipPlan`, each
    example skips its own units: :func:`eas_kernels.routing.patch_routes` (the model must
    have LaVIN-style blocks; ``search`` stays False); :func:`unpatch` undoes it too.

    Blocks are modules with ``attention.wq/wk/wv``, ``feed_forward.w1/w2/w3``,
    ``attention_norm`` and ``ffn_norm`` (LaVIN's and Meta LLaMA's ``TransformerBlock``,
    :mod:`eas_kernels.models.lavin`). Kept layers get a rank-``plan.adapter_rank`` PIA
    (``token_mixing=False``) on the attention input; skipped layers get a
    rank-``plan.skip_rank`` PIA on the FFN input, run no attention and hold no KV cache.
    Every parameter except the PIAs' is frozen. Fresh PIAs return an exact zero, so the
    patched model computes the unpatched one with the skipped MHAs removed.
    A plan that skips FFNs or whole blocks gives those layers the roles described in
    :class:`~eas_kernels.SkipPlan`. ``search=True`` (or ``"mha"``) installs both PIAs in
    every layer so that :func:`set_skipped` can choose any skip set (the redundancy search
    needs it); ``"ffn"``, ``"mha_or_ffn"`` and ``"block"`` (DAS) install what those
    candidate sets need.

    A block call with ``start_pos`` None (training) or 0 (prefill) computes fresh PIA
    states over the prompt mask — the model's ``prompt_mask`` argument, else its
    ``attention_mask``, else :func:`set_prompt_mask`, else all tokens; ``start_pos > 0``
    decodes with the frozen states. Raises ``TypeError``/``ValueError`` before changing
    anything when ``model`` or ``plan`` do not fit (a rank above the hidden size included);
    any failure while patching, ``KeyboardInterrupt`` included, leaves the model as it was
    (:func:`all_or_nothing`). :func:`unpatch` undoes it.
    """
    if is_route_plan(plan):
        return patch_routed(model, plan, search, LAVIN)
    candidates = check_patch_arguments(model, plan, search)
    with all_or_nothing(model):
        patch = EASPatch(model, plan, candidates, LAVIN)
        first = patch.blocks[0]
        hook = _StartPosHook(patch.runtime, start_pos_index(first))
        patch.keep(first.register_forward_pre_hook(hook, with_kwargs=True))
        _install_mask_hook(patch)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_lavin` or :func:`eas_kernels.patch_hf`, in place: merged weights
    back bitwise, PIAs (or routers) and hooks removed, skipped MHAs restored,
    ``requires_grad`` as before."""
    if isinstance(model, nn.Module) and hasattr(model, ROUTES_ATTR):
        from .routing import unpatch_routes

        return unpatch_routes(model)
    patch_of(model).remove()
    return model


def is_route_plan(plan: object) -> bool:
    """Whether ``plan`` is a :class:`~eas_kernels.routing.RoutePlan`."""
    from .routing import RoutePlan

    return isinstance(plan, RoutePlan)


def patch_routed(model: nn.Module, plan: object, search: object, layout: BlockLayout) -> nn.Module:
    """:func:`~eas_kernels.routing.patch_routes` for :func:`patch_lavin` / ``patch_hf``
    given a :class:`~eas_kernels.routing.RoutePlan`: the model must have ``layout``'s
    blocks, and ``search`` must be False (routers replace the search)."""
    from .routing import patch_routes
    from .routing.patch import layout_of

    if search is not False:
        raise ValueError(
            f"search must be False with a RoutePlan (routers replace the search), got {search!r}"
        )
    if isinstance(model, nn.Module) and layout_of(model) != layout:
        raise ValueError(f"model has no {layout.description}")
    return patch_routes(model, plan)


def set_skipped(model: nn.Module, indices: Iterable[int], *, ffns: Iterable[int] = ()) -> None:
    """Change which layers skip their MHA (``indices``) and their FFN (``ffns``), between
    steps; frozen states are dropped.

    Each layer needs the PIA of its new role (:class:`~eas_kernels.SkipPlan`): any MHA
    skip set is allowed after patching with ``search=True``; FFN and whole-block skips
    need ``search="ffn"``, ``"mha_or_ffn"`` or ``"block"``.
    """
    patch_of(model).set_skipped(indices, ffns)


def skipped_mhas(model: nn.Module) -> tuple[int, ...]:
    """The layers whose MHA the patched ``model`` currently skips (FFN skips:
    :func:`current_plan`)."""
    return patch_of(model).skipped_mhas


def current_plan(model: nn.Module) -> SkipPlan:
    """The plan of a patched ``model`` with its current skip sets (after searches)."""
    return patch_of(model).current_plan()


def set_prompt_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Set the ``(B, n)`` bool prompt mask for the next training forward or prefill.

    Needed only for models whose ``forward`` takes no ``prompt_mask`` / ``attention_mask``
    argument (e.g. LaVIN's own ``forward_inference``); ``None`` averages all tokens.
    """
    runtime_of(model).state_mask = None if mask is None else check_prompt_mask(mask)
