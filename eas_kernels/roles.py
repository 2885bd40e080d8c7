"""Layer roles: what one transformer block runs under a plan, and what EAS installs for it.

A :class:`Role` is one object per variant (PEFT's ``LoraVariant`` pattern) that owns its
behaviour: the PIA it installs (attribute name, rank and token mixing from the plan), the
norm it hooks and the linear layers it is re-parameterised into, how it replaces the
block's or the FFN's ``forward``, whether it holds a KV cache, and how its floor looks
(EAS_SPEC §2, §6)::

    role           skips        PIA (attribute)   rank           mixing  hooks / merges into
    kept           nothing      attn_adapter      adapter_rank   no      attention_norm → wq/wk/wv
    skipped_mha    the MHA      skip_pia          skip_rank      plan    ffn_norm → w1/w3
    skipped_ffn    the FFN      ffn_skip_pia      skip_rank      plan    attention_norm → wq/wk/wv
    skipped_block  MHA and FFN  block_adapter     skip_rank      no      called by the block

(LaVIN names; :mod:`eas_kernels.layout` maps them to Hugging Face's.) The role strings of
the package live here and nowhere else: :data:`ROLES` maps each name to its role,
:func:`role_for` gives the role of a layer's skip flags (:meth:`SkipPlan.role
<eas_kernels.SkipPlan.role>`), and :data:`CANDIDATE_SETS` says which roles a redundancy
search switches between (paper Table 3; DAS). Adding a role is one subclass of
:class:`Role` plus :func:`register_role`; a plan whose ``role(layer)`` returns it makes
:func:`~eas_kernels.patch_lavin` / :func:`~eas_kernels.patch_hf` install it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .layout import BlockLayout

if TYPE_CHECKING:
    from .plan import SkipPlan
    from .runtime import AdapterSite

SkippedCallHook = Callable[[int, tuple, dict], None]


class Role:
    """What a block runs and what EAS installs for it; subclasses set the class attributes.

    Attributes:
        name: the role's identifier (the key of :data:`ROLES`).
        pia_name: the attribute of the block holding its PIA, and the middle of its
            checkpoint keys (``layers.{i}.{pia_name}.{key}``).
        label: how messages name its PIA (``"layer 3 skip PIA: ..."``).
        duty: what the layer cannot do without that PIA (error messages).
        skips_mha, skips_ffn: what the block does not run.
        arm: how a search arm that selects this role is named (``"mha 3"``), or None.
    """

    name: ClassVar[str]
    pia_name: ClassVar[str]
    label: ClassVar[str]
    duty: ClassVar[str]
    skips_mha: ClassVar[bool]
    skips_ffn: ClassVar[bool]
    arm: ClassVar[str | None] = None

    # ------------------------------------------------------------------ the PIA
    def rank(self, plan: SkipPlan) -> int:
        """Rank of the role's PIA under ``plan``."""
        return plan.skip_rank

    def token_mixing(self, plan: SkipPlan) -> bool:
        """Whether the role's PIA has the token-averaged down path (Eq. 4)."""
        return plan.token_mixing

    def hooked_norm(self, block: nn.Module, layout: BlockLayout) -> nn.Module | None:
        """The norm whose output the PIA adapts (a forward hook), or None when the block's
        forward calls the PIA itself."""
        return getattr(block, layout.attention_norm)

    def targets(self, block: nn.Module, layout: BlockLayout) -> tuple[nn.Linear, ...]:
        """The linear layers that read the adapted norm output: where the PIA is merged."""
        return layout.attention_linears(block)

    @property
    def reparameterizable(self) -> bool:
        """Whether linear layers read ``u + PIA(u)``, so merge and low-rank apply."""
        return True

    @property
    def runs_attention(self) -> bool:
        """Whether the block runs its MHA, and so holds a KV cache."""
        return not self.skips_mha

    # ------------------------------------------------------------------ the forward
    def install(
        self,
        block: nn.Module,
        layout: BlockLayout,
        index: int,
        site: AdapterSite | None,
        on_call: SkippedCallHook | None,
    ) -> None:
        """Replace, on the instance, the forwards this role changes (block ``index``, whose
        ``forward`` and FFN ``forward`` are the class's when called). ``site`` is the
        role's adapter site (None on a floor); ``on_call`` is called as
        ``f(index, args, kwargs)`` by a block that runs no attention."""

    def install_floor(self, block: nn.Module, layout: BlockLayout, index: int) -> None:
        """Make an *unpatched* block run what this role keeps, with nothing added: the
        speed limit of any adapter scheme for the role (:func:`~eas_kernels.tuning.
        evaluate.floor_model`). By default the role's own forwards without a site (no PIA
        hooks an unpatched block's norm); a role whose forwards call its site overrides it."""
        self.install(block, layout, index, None, None)

    def __repr__(self) -> str:
        return f"<role {self.name}>"

    # A role is a registered singleton: copies and pickles of a patched model (deepcopy,
    # torch.save) refer to the same objects, which plans return.
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return registered_role, (self.name,)

    def __deepcopy__(self, memo: dict) -> Role:
        return self


class Kept(Role):
    """The block runs whole; a rank-``adapter_rank`` router adapter (no token mixing)
    adapts the attention input: ``h = x + Attn(u + PIA_a(u))``, ``out = h + FFN(ffn_norm(h))``."""

    name = "kept"
    pia_name = "attn_adapter"
    label = "attention adapter"
    duty = "run its MHA"
    skips_mha = skips_ffn = False

    def rank(self, plan: SkipPlan) -> int:
        return plan.adapter_rank

    def token_mixing(self, plan: SkipPlan) -> bool:
        return False


class SkippedMHA(Role):
    """The MHA is skipped: ``out = x + FFN(v + PIA_s(v))``, ``v = ffn_norm(x)``; the PIA is
    merged into ``W1/W3``."""

    name = "skipped_mha"
    pia_name = "skip_pia"
    label = "skip PIA"
    duty = "skip its MHA"
    skips_mha, skips_ffn = True, False
    arm = "mha"

    def hooked_norm(self, block: nn.Module, layout: BlockLayout) -> nn.Module | None:
        return getattr(block, layout.ffn_norm)

    def targets(self, block: nn.Module, layout: BlockLayout) -> tuple[nn.Linear, ...]:
        return layout.ffn_linears(block)

    def install(
        self,
        block: nn.Module,
        layout: BlockLayout,
        index: int,
        site: AdapterSite | None,
        on_call: SkippedCallHook | None,
    ) -> None:
        block.forward = SkippedMHAForward(
            index, getattr(block, layout.feed_forward), getattr(block, layout.ffn_norm), on_call
        )


class SkippedFFN(Role):
    """The FFN is skipped: ``out = x + Attn(u + PIA_f(u))``; the PIA is merged into
    ``wq/wk/wv``."""

    name = "skipped_ffn"
    pia_name = "ffn_skip_pia"
    label = "FFN-skip PIA"
    duty = "skip its FFN"
    skips_mha, skips_ffn = False, True
    arm = "ffn"

    def install(
        self,
        block: nn.Module,
        layout: BlockLayout,
        index: int,
        site: AdapterSite | None,
        on_call: SkippedCallHook | None,
    ) -> None:
        getattr(block, layout.feed_forward).forward = no_ffn


class SkippedBlock(Role):
    """The block is skipped whole, as DAS does (EAS_SPEC §6): ``out = x + A(u)``, with a
    rank-``skip_rank`` adapter ``A`` without token mixing that is never re-parameterised."""

    name = "skipped_block"
    pia_name = "block_adapter"
    label = "block adapter"
    duty = "be skipped whole"
    skips_mha = skips_ffn = True
    arm = "block"

    def token_mixing(self, plan: SkipPlan) -> bool:
        return False

    def hooked_norm(self, block: nn.Module, layout: BlockLayout) -> nn.Module | None:
        return None

    def targets(self, block: nn.Module, layout: BlockLayout) -> tuple[nn.Linear, ...]:
        return ()

    @property
    def reparameterizable(self) -> bool:
        return False

    def install(
        self,
        block: nn.Module,
        layout: BlockLayout,
        index: int,
        site: AdapterSite | None,
        on_call: SkippedCallHook | None,
    ) -> None:
        assert site is not None, "a skipped block's forward calls its adapter"
        block.forward = SkippedBlockForward(
            index, getattr(block, layout.attention_norm), site, on_call
        )

    def install_floor(self, block: nn.Module, layout: BlockLayout, index: int) -> None:
        block.forward = identity


# ---------------------------------------------------------------------- the registry
ROLES: dict[str, Role] = {}


def register_role(role: Role) -> Role:
    """Make ``role`` known by its name (checkpoints, patches, messages); ValueError when
    another registered role has its name or its PIA attribute."""
    if not isinstance(role, Role):
        raise TypeError(f"role must be an eas_kernels.roles.Role, got {type(role).__name__}")
    for other in ROLES.values():
        if role.name == other.name or role.pia_name == other.pia_name:
            raise ValueError(f"{role!r} clashes with the registered {other!r}")
    ROLES[role.name] = role
    return role


def registered_role(name: str) -> Role:
    """The registered role called ``name``; ValueError naming the known ones."""
    if name not in ROLES:
        raise ValueError(f"no role {name!r} is registered (known: {sorted(ROLES)})")
    return ROLES[name]


KEPT = register_role(Kept())
SKIPPED_MHA = register_role(SkippedMHA())
SKIPPED_FFN = register_role(SkippedFFN())
SKIPPED_BLOCK = register_role(SkippedBlock())


def role_for(skips_mha: bool, skips_ffn: bool) -> Role:
    """The role of a block that skips its MHA and/or its FFN (the first registered one:
    the four above)."""
    return next(r for r in ROLES.values() if (r.skips_mha, r.skips_ffn) == (skips_mha, skips_ffn))


def pia_names() -> tuple[str, ...]:
    """The block attributes of every registered role's PIA."""
    return tuple(role.pia_name for role in ROLES.values())


# What a search may switch each layer between: the roles of its arms (paper Table 3; DAS
# skips whole blocks). Arm ``a`` of a model of L blocks selects role ``arms[a // L]`` for
# block ``a % L``; a block whose MHA and FFN are both selected is skipped whole.
CANDIDATE_SETS: dict[str, tuple[Role, ...]] = {
    "mha": (SKIPPED_MHA,),
    "ffn": (SKIPPED_FFN,),
    "mha_or_ffn": (SKIPPED_MHA, SKIPPED_FFN),
    "block": (SKIPPED_BLOCK,),
}
# The candidate set a ``search=True`` patch installs (EAS).
DEFAULT_CANDIDATES = "mha"


def candidate_roles(candidates: str) -> tuple[Role, ...]:
    """Every role a layer can take under ``candidates`` (a key of :data:`CANDIDATE_SETS`):
    kept, and what each combination of its arms skips."""
    arms = CANDIDATE_SETS[candidates]
    roles = {KEPT: None}
    for chosen in itertools.product((False, True), repeat=len(arms)):
        picked = [role for role, on in zip(arms, chosen, strict=True) if on]
        mha, ffn = any(r.skips_mha for r in picked), any(r.skips_ffn for r in picked)
        roles[role_for(mha, ffn)] = None
    return tuple(role for role in ROLES.values() if role in roles)  # registry order


# ---------------------------------------------------------------------- replaced forwards
# Callable objects, not closures: ``copy.deepcopy`` of a patched model then points the
# copies at the copied modules and runtime.
class SkippedMHAForward:
    """``x + FFN(ffn_norm(x))``: the block without its MHA (the PIA hooks ``ffn_norm``)."""

    def __init__(
        self,
        index: int,
        feed_forward: nn.Module,
        norm: nn.Module,
        on_call: SkippedCallHook | None,
    ) -> None:
        self.index, self.feed_forward, self.norm, self.on_call = index, feed_forward, norm, on_call

    def __call__(
        self, hidden_states: torch.Tensor, *args: object, **kwargs: object
    ) -> torch.Tensor:
        if self.on_call is not None:
            self.on_call(self.index, args, kwargs)
        return hidden_states + self.feed_forward(self.norm(hidden_states))


class SkippedBlockForward:
    """``x + A(attention_norm(x))``: DAS's skipped block (EAS_SPEC §6)."""

    def __init__(
        self, index: int, norm: nn.Module, site: AdapterSite, on_call: SkippedCallHook | None
    ) -> None:
        self.index, self.norm, self.site, self.on_call = index, norm, site, on_call

    def __call__(
        self, hidden_states: torch.Tensor, *args: object, **kwargs: object
    ) -> torch.Tensor:
        if self.on_call is not None:
            self.on_call(self.index, args, kwargs)
        return hidden_states + self.site.runtime.adapter_output(self.site, self.norm(hidden_states))


def no_ffn(hidden_states: torch.Tensor) -> torch.Tensor:
    """A skipped FFN's output: a zero that broadcasts (``h + 0`` is exactly ``h``)."""
    return hidden_states.new_zeros(())


def identity(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """A block skipped whole with nothing in its place (the floor of DAS)."""
    return hidden_states
