"""The per-model EAS runtime: frozen PIA states and their re-parameterisation.

A patched model carries one :class:`EASRuntime`. Every PIA sits at an
:class:`AdapterSite`: a forward hook on a norm (``attention_norm`` of a kept layer or of
one whose FFN is skipped, ``ffn_norm`` of one whose MHA is skipped) that turns the norm's
output ``u`` into ``u + PIA(u)`` for the linear layers that read it (``wq/wk/wv`` or
``w1/w3``, the site's *targets*). DAS's adapter of a block skipped whole has no norm hook
and no targets: the block's forward asks the runtime for ``PIA(u)`` and it is never
re-parameterised (EAS_SPEC §6).

Each call of a patched block is either

* **fresh** (``start_pos`` ``None`` — the training forward — or ``0``, the prefill): every
  active site computes its state ``S = (c, α)`` from ``u`` over the prompt mask
  (EAS_SPEC §3), uses it for all tokens of the call and keeps it, frozen; weights merged
  for the previous example are first put back bitwise;
* **decode** (``start_pos > 0``): the frozen states are used. At the first decode call
  after a fresh one the runtime *realises* its mode (EAS_SPEC §4): ``eager`` keeps
  computing ``u + PIA(u; S)``; ``merge`` writes every PIA into its targets' weights
  (batch 1) and the sites pass ``u`` through; ``lowrank`` leaves the weights alone and
  adds ``(u W_d1ᵀ) M_e + g_e`` to each target's output per example (``κ F``, see
  :mod:`eas_kernels.ops.lowrank`); ``auto`` picks the
  cheapest of the three for the answer length it expects (:mod:`eas_kernels.auto`).

The runtime is in one :class:`Phase` at a time — ``NO_STATES`` (after patching or a new
skip set), ``FRESH`` (after a fresh call) or ``DECODING`` (after a decode call, the mode
realised) — and moves only along :data:`TRANSITIONS`; a decode call with no states is
refused.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import first_non_finite
from .auto import AutoChoice, ModeCosts, choose_mode, measure_costs
from .factors import KeptFactors, tensor_versions
from .kept_merge import KeptMerge
from .ops import LowrankAdd, MergedTarget, MergeRefused, install_merged, restore_merged
from .pia import PIA, PIAState, RunningSums

if TYPE_CHECKING:
    from .roles import Role

MODES = ("eager", "merge", "lowrank", "auto")
logger = logging.getLogger("eas_kernels")


def _prompt_and_after(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The prompt mask plus every position after each example's last prompt token (the
    answer of a teacher-forced batch, left-padded), or None (all tokens)."""
    if mask is None:
        return None
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)
    return mask | (positions > last)


@dataclass
class MergeRecord:
    """A linear layer whose weight and bias hold a merged PIA (swapped in), with the
    pristine storage swapped out, and the merged parameters' version counters."""

    linear: nn.Linear
    weight: torch.Tensor
    bias: torch.Tensor | None  # None: the layer had no bias before the merge
    versions: tuple | None = None  # tensor_versions of the merged weight and bias

    @classmethod
    def install(cls, linear: nn.Linear, merged: MergedTarget) -> MergeRecord:
        """Swap ``merged`` into ``linear`` (O(1)); a bias-less layer gets a bias."""
        weight = install_merged(linear.weight, merged.merged)
        parameters = linear._parameters  # "bias" is registered, as None, on a bias-less layer
        if parameters.get("bias") is None:  # (set directly: Module.__setattr__ costs ~20 µs)
            parameters["bias"] = nn.Parameter(merged.bias, requires_grad=False)
            record = cls(linear, weight, None)
        else:
            record = cls(linear, weight, install_merged(parameters["bias"], merged.bias))
        record.versions = record._merged_versions()
        return record

    @torch.compiler.disable  # a merge or restore step may break the graph (not a decode)
    def _merged_versions(self) -> tuple | None:
        """None for inference tensors: they track no version (and cannot be changed in
        place outside inference mode)."""
        return tensor_versions([self.linear.weight, self.linear._parameters["bias"]])

    def restore(self) -> bool:
        """The pristine weight and bias back, bitwise (they were never written). Returns
        whether the merged weight or bias was changed in place meanwhile (an edit the
        restore discards; one through ``.data`` goes unseen)."""
        edited = _changed(self.versions, self._merged_versions())
        restore_merged(self.linear.weight, self.weight)
        if self.bias is None:
            self.linear._parameters["bias"] = None
        else:
            restore_merged(self.linear._parameters["bias"], self.bias)
        return edited


def _changed(before: tuple | None, now: tuple | None) -> bool:
    """Whether a tensor of :func:`tensor_versions` ``before`` moved its version counter by
    ``now``; a tensor that is another object now (a deep copy or an unpickled model, whose
    counters start afresh) or untracked (None: inference tensors) cannot tell."""
    if before is None or now is None:
        return False
    return any(a == b and va != vb for (a, va), (b, vb) in zip(before, now, strict=True))


def restore_records(records: Sequence[MergeRecord]) -> list[MergeRecord]:
    """Restore every record, last first (bitwise pretrained weights); returns those whose
    merged weight or bias was changed in place meanwhile (for :func:`warn_discarded`,
    once the caller's state is consistent)."""
    return [record for record in reversed(records) if record.restore()]


def warn_discarded(edited: Sequence[MergeRecord]) -> None:
    """``RuntimeWarning`` for weights changed in place while merged: the restore put the
    pretrained values back, so the change is gone."""
    if edited:
        shapes = ", ".join(str(tuple(r.linear.weight.shape)) for r in edited)
        warnings.warn(
            f"{len(edited)} linear layer(s) of shape {shapes} were changed in place while "
            "a PIA was merged into them; their pretrained values are back and the change "
            "is discarded (change weights between prompts, or after eas_kernels.restore)",
            RuntimeWarning,
            stacklevel=3,
        )


class SuspendableHook:
    """A forward hook of ``module`` that can leave it and come back to its place among the
    module's forward hooks: after the hooks that were before it, before those that were
    after it or were registered meanwhile. A hooked module costs ~15 µs per call inside a
    decode step (~1.5 % of a d = 512 step for 32 norms), and merged or low-rank decoding
    has nothing for a site's norm hook to do."""

    def __init__(self, module: nn.Module, hook: Callable[..., torch.Tensor | None]) -> None:
        self.module, self.hook = module, hook
        self._handle: torch.utils.hooks.RemovableHandle | None = module.register_forward_hook(hook)
        self._before: set[int] = set()  # ids of the hooks before this one, while suspended

    def suspend(self) -> None:
        if self._handle is None:
            return
        ids = list(self.module._forward_hooks)
        self._before = set(ids[: ids.index(self._handle.id)])
        self._handle.remove()
        self._handle = None

    def resume(self) -> None:
        if self._handle is not None:
            return
        self._handle = self.module.register_forward_hook(self.hook)
        hooks = self.module._forward_hooks
        for key in [key for key in hooks if key not in self._before and key != self._handle.id]:
            hooks.move_to_end(key)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class AdapterSite:
    """The PIA of one layer's ``role`` on the output of ``norm``, read by the linear layers
    ``targets``.

    ``norm=None`` (with no targets) is a site its block calls itself (DAS's adapter).
    """

    def __init__(
        self,
        runtime: EASRuntime,
        layer: int,
        role: Role,
        pia: PIA,
        norm: nn.Module | None,
        targets: tuple[nn.Linear, ...],
    ) -> None:
        self.runtime = runtime
        self.layer = layer
        self.role = role
        self.pia = pia
        self.targets = targets
        self.active = False
        self.state: PIAState | RunningSums | None = None
        self._lowrank_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.factors = KeptFactors()  # F of the targets, kept across prompts
        self.norm_hook = None if norm is None else SuspendableHook(norm, self._on_norm_output)

    @property
    def reparameterizable(self) -> bool:
        """Whether linear layers read ``u + PIA(u)`` (merge and low-rank apply)."""
        return self.role.reparameterizable

    def remove(self) -> None:
        """Detach the site from its norm and targets (the PIA module stays where it is)."""
        self.remove_lowrank()
        if self.norm_hook is not None:
            self.norm_hook.remove()

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.role.label}"

    def _on_norm_output(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], u: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.active:
            return None
        return self.runtime.adapted_input(self, u)

    # ------------------------------------------------------------------ low-rank path
    def lowrank_hooks(self) -> list[tuple[nn.Linear, LowrankHook]]:
        """The low-rank path of the frozen state: one forward hook per target, with its
        factors ``F`` (:func:`~eas_kernels.ops.lowrank_factors`, kept across prompts while
        the weights stay: :class:`~eas_kernels.factors.KeptFactors`); nothing installed."""
        assert self.state is not None
        with torch.no_grad():
            factors = self.factors.of(self.pia, self.targets)
            hooks = lowrank_hooks_of(self.pia, factors, self.pia.state_mix(self.state))
        return list(zip(self.targets, hooks, strict=True))

    def install_lowrank(self) -> None:
        for linear, hook in self.lowrank_hooks():
            self._lowrank_hooks.append(linear.register_forward_hook(hook))

    def remove_lowrank(self) -> None:
        for handle in self._lowrank_hooks:
            handle.remove()
        self._lowrank_hooks.clear()

    # ------------------------------------------------------------------ merge
    def state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The frozen state's tensors, named ``state.<field>``."""
        assert self.state is not None
        return [
            (f"state.{field.name}", getattr(self.state, field.name))
            for field in dataclasses.fields(self.state)
        ]


class DownProjection:
    """``u W_d1ᵀ`` of the input a target receives, computed once for the targets of a
    site that read the same tensor in one call (wq/wk/wv read one ``u``): the last input
    is remembered by identity and version counter, so a target never uses another
    call's projection, whatever order the targets run in."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._key: tuple | None = None  # (input, its version) of the last projection
        self._projected: torch.Tensor | None = None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        key = (u, tensor_versions([u]))  # holding u: its identity cannot be reused meanwhile
        if self._key is None or self._key[0] is not u or self._key[1] != key[1]:
            self._projected = F.linear(u, self.weight)
            self._key = key
        assert self._projected is not None
        return self._projected


class LowrankHook:
    """Forward hook of a low-rank target: ``output + κ F`` (:class:`LowrankAdd`), with
    ``κ`` built from the projection of the target's own input ``u``."""

    def __init__(self, projection: DownProjection, add: LowrankAdd) -> None:
        self.projection, self.add = projection, add

    def __call__(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return self.add(output, self.projection(inputs[0]))


def lowrank_hooks_of(pia: PIA, factors: list[torch.Tensor], mix: torch.Tensor) -> list[LowrankHook]:
    """A :class:`LowrankHook` per target of ``pia`` whose factor ``F`` is in ``factors``,
    for the examples' states ``mix`` (``[α₁, α₂, c]`` per row,
    :meth:`~eas_kernels.PIA.state_mix`); the hooks share one :class:`DownProjection`."""
    projection = DownProjection(pia.down1.weight)
    return [
        LowrankHook(
            projection,
            LowrankAdd(mix.to(torch.promote_types(f.dtype, torch.float32)).contiguous(), f),
        )
        for f in factors
    ]


class Phase(enum.Enum):
    """Where a patched model is between calls (:attr:`EASRuntime.phase`).

    ``NO_STATES``: after patching or a change of the skip set — the next call must be
    fresh. ``FRESH``: after a training forward or a prefill — every active site holds the
    states of that call, the weights are pristine. ``DECODING``: after a decode call — the
    states are frozen and the mode is realised (merged weights, low-rank hooks), once.
    """

    NO_STATES = "no states"
    FRESH = "fresh"
    DECODING = "decoding"


# The allowed transitions (from, to); anything else is refused by EASRuntime._move.
TRANSITIONS = {
    (Phase.NO_STATES, Phase.FRESH),  # the first training forward or prefill
    (Phase.NO_STATES, Phase.NO_STATES),  # the skip set changed again
    (Phase.FRESH, Phase.FRESH),  # training steps; a new prompt before any decode step
    (Phase.FRESH, Phase.DECODING),  # the first decode step: check states, realise the mode
    (Phase.FRESH, Phase.NO_STATES),
    (Phase.DECODING, Phase.DECODING),  # decode steps; set_mode
    (Phase.DECODING, Phase.FRESH),  # the next prompt: unrealise first (weights back)
    (Phase.DECODING, Phase.NO_STATES),
}


class EASRuntime:
    """Frozen states, mode and re-parameterisation of one patched model, in one of the
    phases of :class:`Phase`."""

    def __init__(self, *, running: bool = False) -> None:
        self.sites: list[AdapterSite] = []
        self.running = running  # SkipPlan(state="running"): states follow every token
        self.mode = "eager"
        self.state_mask: torch.Tensor | None = None
        self.phase = Phase.NO_STATES
        self.realized: str | None = None  # the mode realised while DECODING (None: not yet)
        self.decode_steps: int | None = None  # expected after the prefill (None: unknown)
        self.auto_choice: AutoChoice | None = None  # what "auto" chose for this prompt
        self._costs: dict[int, ModeCosts] = {}  # measured per batch size, for "auto"
        self._merged: list[MergeRecord] = []
        self._kept = KeptMerge()  # factors and prepared call, kept across prompts
        self._finite_key: tuple | None = None  # the weights' versions at the last check

    @property
    def decoding(self) -> bool:
        return self.phase is Phase.DECODING

    def _move(self, phase: Phase) -> None:
        if (self.phase, phase) not in TRANSITIONS:
            raise RuntimeError(f"EAS runtime: no transition from {self.phase} to {phase}")
        self.phase = phase

    @property
    def active_sites(self) -> list[AdapterSite]:
        return [site for site in self.sites if site.active]

    @property
    def reparameterizable_sites(self) -> list[AdapterSite]:
        return [site for site in self.active_sites if site.reparameterizable]

    # ------------------------------------------------------------------ call phases
    def enter(self, fresh: bool, batch_size: int) -> None:
        """Called once per model call, before the patched model computes (by the first
        block's pre-hook, or the root's for Hugging Face models): ``fresh`` for a training
        forward or a prefill (states recomputed), else a decode call (frozen states used).

        A fresh model call first checks the active PIAs' weights, in every mode: NaN or Inf
        is refused with a ``ValueError`` naming the tensor, before anything changes. The
        check reads the weights only when their version counters moved since the last one
        (after an optimizer step, a load; an edit through ``.data`` goes unseen), then in
        one pass per device and one host sync. The first decode call checks the frozen
        states the same way.
        """
        if fresh:
            self._check_finite_weights()
            if self.phase is Phase.DECODING:
                self.unrealize()
            self._move(Phase.FRESH)
            return
        if self.phase is not Phase.DECODING:
            self._check_states(batch_size)  # NO_STATES is refused here, naming a site
            self._check_finite_states()
            self._move(Phase.DECODING)
        if self.realized is None:
            self.realize(self.mode, batch_size)
        elif self.realized != "merge":
            self._check_state_placement()

    def _check_state_placement(self) -> None:
        """Eager and low-rank decoding read the frozen states (the low-rank hooks hold
        their mixes): a model converted in the middle of a prompt (``.to``, ``.double()``)
        is refused here, before the call computes anything, with
        :meth:`PIA.check_state_placement`'s message (merged weights convert with the model
        and decode on). One site tells: a conversion converts every PIA."""
        site = next((s for s in self.sites if s.active), None)
        if site is not None and isinstance(site.state, PIAState):
            site.pia.check_state_placement(site.state)

    def _check_finite_weights(self) -> None:
        named = [
            ((site, name), parameter)
            for site in self.active_sites
            for name, parameter in site.pia.named_parameters()
        ]
        key = tensor_versions([parameter for _, parameter in named])
        if key is not None and key == self._finite_key:
            return
        bad = first_non_finite(named)
        if bad is not None:
            raise ValueError(f"{bad[0].name}: {bad[1]} holds NaN or Inf; refusing to run it")
        self._finite_key = key

    def _check_finite_states(self) -> None:
        """Refuse (ValueError) frozen states holding NaN/Inf, naming the tensor."""
        named = [
            ((site, name), tensor)
            for site in self.active_sites
            for name, tensor in site.state_tensors()
        ]
        bad = first_non_finite(named)
        if bad is not None:
            raise ValueError(
                f"{bad[0].name}: {bad[1]} holds NaN or Inf; refusing to decode with it"
            )

    def _check_states(self, batch_size: int) -> None:
        for site in self.active_sites:
            if site.state is None:
                raise RuntimeError(
                    f"{site.name} has no frozen state: a decode call (start_pos > 0) must "
                    "follow a prefill (start_pos=0) of the same skip set"
                )
            if site.state.batch_size != batch_size:
                raise ValueError(
                    f"decode batch size {batch_size} differs from the prefill's "
                    f"{site.state.batch_size}"
                )

    def adapted_input(self, site: AdapterSite, u: torch.Tensor) -> torch.Tensor:
        """What the targets of a hooked site read from its norm output ``u``: ``u + PIA(u)``
        with the state of this call (fresh) or the frozen one (eager decode). When the
        targets carry the PIA (merge: in their weights; lowrank: in their output hooks,
        which project their own input) :meth:`realize` has suspended the norm hook."""
        if self.running:
            return u + self._running_delta(site, u)
        if not self.decoding:
            mask = self._state_mask_for(site, u)
            adapted, state = site.pia.adapt(u, mask, mask_checked=True)
            site.state = state.detach()
            return adapted
        return u + site.pia(u, state=site.state)

    def adapter_output(self, site: AdapterSite, u: torch.Tensor) -> torch.Tensor:
        """``PIA(u)`` of a site its block calls itself (DAS's adapter: no targets), with the
        state of this call (fresh) or the frozen one (decode)."""
        if self.running:
            return self._running_delta(site, u)
        if not self.decoding:
            state = site.pia.compute_state(u, self._state_mask_for(site, u), mask_checked=True)
            site.state = state.detach()
            return site.pia(u, state=state)
        return site.pia(u, state=site.state)

    def _state_mask_for(self, site: AdapterSite, u: torch.Tensor) -> torch.Tensor | None:
        """The prompt mask of a fresh call — validated at the model's entry (a token in every
        row), so only its shape and device are checked here, against the tokens ``site``
        sees: no host sync per site."""
        mask = self.state_mask
        if mask is not None and tuple(mask.shape) != tuple(u.shape[:2]):
            raise ValueError(
                f"prompt mask has shape {tuple(mask.shape)} but {site.name} sees "
                f"{tuple(u.shape[:2])} (B, n) tokens"
            )
        if mask is not None and mask.device != u.device:
            raise ValueError(f"prompt mask is on {mask.device} but {site.name} runs on {u.device}")
        return mask

    def _running_delta(self, site: AdapterSite, u: torch.Tensor) -> torch.Tensor:
        """``PIA(u)`` with running states (:meth:`PIA.running`): a fresh call averages the
        prompt tokens and every token after the prompt (the answer, under teacher forcing),
        causally; a decode call adds its tokens to the sums of the previous calls."""
        if self.decoding:
            assert isinstance(site.state, RunningSums)
            delta, sums = site.pia.running(u, None, site.state)
        else:
            delta, sums = site.pia.running(u, _prompt_and_after(self._state_mask_for(site, u)))
        site.state = sums.detach()
        return delta

    # ------------------------------------------------------------------ modes
    def realize(self, mode: str, batch_size: int) -> None:
        """Apply ``mode`` for the current frozen states (all sites at once, or none)."""
        resolved = self._auto_mode(batch_size) if mode == "auto" else mode
        if resolved == "merge":
            if batch_size != 1:
                raise ValueError(
                    f"mode='merge' writes one example's PIA states into the weights and needs "
                    f"batch size 1, got {batch_size}; use mode='lowrank' or 'auto'"
                )
            self._merge_all()
        elif resolved == "lowrank":
            for site in self.reparameterizable_sites:
                site.install_lowrank()
        if resolved in ("merge", "lowrank"):  # the targets carry the PIAs: norms pass u
            for site in self.reparameterizable_sites:
                if site.norm_hook is not None:
                    site.norm_hook.suspend()
        self.realized = resolved

    def _auto_mode(self, batch_size: int) -> str:
        """The mode ``auto`` takes for the current prompt (:mod:`eas_kernels.auto`): from
        the expected decode steps and the costs measured once per batch size."""
        if self.running:
            return "eager"
        steps, costs = self.decode_steps, None
        if steps is not None and steps > 0:
            costs = self._costs.get(batch_size)
            if costs is None:
                costs = self._costs[batch_size] = measure_costs(self, batch_size)
        mode = choose_mode(steps, batch_size, costs)
        self.auto_choice = AutoChoice(mode, steps, batch_size, costs)
        logger.info(
            "eas_kernels auto: %s for batch %d and %s decode steps (costs: %s)",
            mode, batch_size, "unknown" if steps is None else steps, costs,
        )  # fmt: skip
        return mode

    def _merge_all(self) -> None:
        """Every site's merged weights computed first, in one native call prepared once per
        skip set and weights (:class:`~eas_kernels.kept_merge.KeptMerge`; a refusal,
        ValueError naming the site, leaves the model as it is: no weight is ever written),
        then all swapped in."""
        sites = self.reparameterizable_sites
        if not sites:
            self._merged = []
            return
        with torch.no_grad():
            try:
                merged = self._kept.merge(sites)
            except MergeRefused as error:
                raise ValueError(f"{sites[error.site].name}: {error}") from None
        computed = [
            pair
            for site, targets in zip(sites, merged, strict=True)
            for pair in zip(site.targets, targets, strict=True)
        ]
        records: list[MergeRecord] = []
        try:
            for linear, merged in computed:
                records.append(MergeRecord.install(linear, merged))
        except BaseException:  # an interrupt while swapping: put back what was swapped
            for record in reversed(records):
                record.restore()
            raise
        self._merged = records

    def unrealize(self) -> None:
        """Put every merged weight back bitwise and drop low-rank hooks."""
        merged, self._merged = self._merged, []
        edited = restore_records(merged)
        for site in self.sites:
            site.remove_lowrank()
            if site.norm_hook is not None:
                site.norm_hook.resume()
        self.realized = None
        warn_discarded(edited)

    def restore_weights(self) -> None:
        """Put merged weights back (bitwise) now; the next decode call merges again."""
        if self.realized == "merge":
            self.unrealize()

    def set_mode(self, mode: str) -> None:
        """Switch mode; applied now to frozen states that allow it, else at the next decode.

        Frozen states of a batch larger than one cannot be merged: ``merge`` then waits for
        the next batch-1 prefill (a decode step of the current batch raises). A merge
        that fails (NaN/Inf) keeps the previous mode and leaves the weights unchanged.
        """
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.running and mode in ("merge", "lowrank"):
            raise ValueError(
                f"mode={mode!r} needs frozen PIA states; this model's plan has "
                "state='running' (its states change at every token): use 'eager' or 'auto'"
            )
        if not self.decoding:
            self.mode = mode
            return
        previous = self.mode
        batch_size = self.active_sites[0].state.batch_size if self.active_sites else 1
        self.unrealize()
        self.mode = mode
        if mode == "merge" and batch_size != 1:
            return
        try:
            self.realize(mode, batch_size)
        except BaseException:
            self.mode = previous
            self.realize(previous, batch_size)
            raise

    def forget_states(self) -> None:
        """Drop every frozen state (the skip set changed): the next call must be fresh."""
        self.unrealize()
        self._costs.clear()  # another skip set costs otherwise
        self._kept.clear()
        self._move(Phase.NO_STATES)
        for site in self.sites:
            site.state = None
