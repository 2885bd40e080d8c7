"""The forward of a routed block: each example takes its kept branch or its shortcut.

For layer ``i`` with input ``x`` ``(B, n, d)`` and ``u = attention_norm(x)`` (ROE_SPEC
§2–§5; ``A_k`` is the kept branch's adapter, LaVIN's rank-``adapter_rank`` PIA without token
mixing, when the plan has one)::

    ū      = masked mean of u over the prompt tokens                (B, d)
    g      = router(ū) = ū Wᵀ,  W (2, d), no bias                    (B, 2): (keep, skip)
    keep   = h + FFN(ffn_norm(h)),  h = x + Attn(u + A_k(u))
    skip   = x + FFN(v + PIA_s(v)),  v = ffn_norm(x)                 (unit "mha": dynamic EAS)
           = x + A(u)                                                (unit "block": RoE)

    soft  (training):  out = w_keep · keep + w_skip · skip,  w = softmax((g + [b, 0]) / τ)
                       (a branch whose weight is below the dtype's epsilon is not run)
    hard  (inference): out_e = skip_e if g_e,skip > g_e,keep else keep_e

A layer outside the plan's routed layers always keeps (it has no router and no shortcut).
Under hard, random or forced routes every branch runs **only on the examples that take it**
(gather, compute, scatter): the kept branch's attention sees, and its KV cache holds, the
kept examples only. For unit ``mha`` both branches end in the same FFN, so a batch that
splits at the MHA runs it once: ``h = x + Attn(u + A_k(u))`` on the kept rows and ``h = x``
on the skipped ones, ``z = ffn_norm(h)`` with ``PIA_s`` added to the skipped rows,
``out = h + FFN(z)`` (each row equals its branch above). The route and the adapters' PIA
states are computed at the fresh call from the prompt and frozen for the decode calls that
follow (the route never sees an answer token). At batch 1 the example's adapter of each
layer — ``A_k`` into ``wq/wk/wv`` where it keeps, ``PIA_s`` into ``W1/W3`` where it skips
an MHA — is merged for the decode (EAS_SPEC §4) and put back bitwise at the next fresh
call; at batch > 1 the skipped rows' ``PIA_s`` goes through the per-example low-rank path
(``W1/W3`` add ``κ_e F``, EAS_SPEC §4) unless ``RouteControl.lowrank`` is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..factors import KeptFactors, tensor_versions
from ..layout import BlockLayout
from ..ops import merged_linear
from ..pia import PIA, PIAState, masked_token_mean
from ..runtime import (
    LowrankHook,
    MergeRecord,
    lowrank_hooks_of,
    restore_records,
    warn_discarded,
)
from .control import RouteControl


@dataclass
class LayerRoute:
    """The frozen route of one layer for the examples of a prefill."""

    skip: torch.Tensor  # (B,) bool: the route's decision
    runs: torch.Tensor  # (B,) bool: which examples run the layer (batch rule applied)
    kept: torch.Tensor  # indices of the examples that run the layer
    skipped: torch.Tensor  # indices of the examples that take the shortcut
    all_kept: bool
    all_skipped: bool
    kept_state: PIAState | None = None  # A_k's state of the kept examples
    skip_state: PIAState | None = None  # the shortcut PIA's state of the skipped examples

    @classmethod
    def of(cls, skip: torch.Tensor, runs: torch.Tensor) -> LayerRoute:
        """The route of decisions ``skip`` whose examples ``runs`` run the layer."""
        kept, skipped = runs.nonzero().flatten(), (~runs).nonzero().flatten()
        return cls(skip, runs, kept, skipped, len(skipped) == 0, len(kept) == 0)

    def select(self, index: torch.Tensor) -> tuple[LayerRoute, torch.Tensor]:
        """The route of examples ``index`` (``(B',)`` indices into this route's examples,
        repeats allowed: a beam search's reorder, a batch selection or repetition), and
        where the new kept examples are among the old kept ones (``(len(kept'),)``: the
        rows of a cache that holds the kept examples only). The states follow their rows."""
        index = index.to(self.skip.device)
        new = LayerRoute.of(self.skip.index_select(0, index), self.runs.index_select(0, index))
        kept_rows = _positions(self.kept, len(self.skip)).index_select(0, index[new.kept])
        skipped_rows = _positions(self.skipped, len(self.skip)).index_select(0, index[new.skipped])
        new.kept_state = _state_rows(self.kept_state, kept_rows)
        new.skip_state = _state_rows(self.skip_state, skipped_rows)
        return new, kept_rows


def _positions(members: torch.Tensor, batch: int) -> torch.Tensor:
    """``(batch,)``: the position of each example among ``members`` (-1 when absent)."""
    positions = torch.full((batch,), -1, dtype=torch.long, device=members.device)
    return positions.index_copy(0, members, torch.arange(len(members), device=members.device))


def _state_rows(state: PIAState | None, rows: torch.Tensor) -> PIAState | None:
    if state is None:
        return None
    rows = rows.to(state.c.device)
    return PIAState(state.c.index_select(0, rows), state.alpha.index_select(0, rows))


def _rows(value: object, index: torch.Tensor, batch: int, min_dims: int) -> object:
    """``value[index]`` for a per-example tensor (first dim ``batch``, at least ``min_dims``
    dimensions), each member of a tuple likewise, else ``value`` unchanged."""
    if isinstance(value, tuple):
        return tuple(_rows(member, index, batch, min_dims) for member in value)
    if isinstance(value, torch.Tensor) and value.dim() >= min_dims and value.shape[0] == batch:
        return value.index_select(0, index.to(value.device))
    return value


class RoutedForward:
    """The replaced ``forward`` of block ``layer`` of a routed model (a callable object, so
    that a deep copy of the model points at the copied modules).

    ``router`` and ``pia`` (the shortcut's adapter) are None for a layer that is not
    routed; ``adapter`` (``A_k``) is None without kept adapters. Called as the block is,
    ``(x, start_pos, freqs_cis, mask)`` (LaVIN layout): ``start_pos`` None (training) or 0
    (prefill) routes afresh, > 0 decodes on the frozen route of the last prefill. The
    per-example arguments a branch gathers are tensors of at least :attr:`row_dims`
    dimensions whose first is the batch (RoPE rotations ``(B, n, hd/2)``, masks
    ``(B, 1, n, keys)``; LaVIN's ``freqs_cis`` ``(n, hd/2)`` is shared).
    :class:`~eas_kernels.routing.hf.HFRoutedForward` is the Hugging Face variant.
    """

    row_dims = 3

    def __init__(
        self,
        layer: int,
        column: int | None,
        block: nn.Module,
        layout: BlockLayout,
        router: nn.Linear | None,
        pia: PIA | None,
        adapter: PIA | None,
        unit: str,
        control: RouteControl,
    ) -> None:
        self.layer, self.column, self.block, self.unit = layer, column, block, unit
        self.attention = getattr(block, layout.attention)
        self.attention_norm = getattr(block, layout.attention_norm)
        self.ffn_norm = getattr(block, layout.ffn_norm)
        self.feed_forward = getattr(block, layout.feed_forward)
        self.attention_linears = layout.attention_linears(block)
        self.ffn_linears = layout.ffn_linears(block)
        self.router, self.pia, self.adapter, self.control = router, pia, adapter, control
        self.route: LayerRoute | None = None
        self.merged: list[MergeRecord] = []
        self.merged_adapter: PIA | None = None  # the adapter now in the weights
        # per adapter (by id): (frozen state, parameter versions, W_u, β) of the route
        self._mixed: dict[int, tuple] = {}
        # the low-rank path of the shortcut: (frozen state, a forward per W1/W3), and the
        # factors F per W1/W3, kept while the weights stay
        self._lowrank: tuple[PIAState, list[_LowrankLinear]] | None = None
        self._factors = KeptFactors()

    @property
    def routed(self) -> bool:
        return self.router is not None

    # ------------------------------------------------------------------ branches
    def _kept(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        args: tuple,
        kwargs: dict,
        mask: torch.Tensor | None,
        state: PIAState | None,
    ) -> tuple[torch.Tensor, PIAState | None]:
        """The whole block on ``x``: ``h = x + Attn(u + A_k(u))``, ``h + FFN(ffn_norm(h))``."""
        if self.adapter is None:
            return self._block(x, start_pos, args, kwargs), None
        h, state = self._attended(x, start_pos, args, kwargs, mask, state)
        return h + self.feed_forward(self.ffn_norm(h)), state

    def _attended(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        args: tuple,
        kwargs: dict,
        mask: torch.Tensor | None,
        state: PIAState | None,
    ) -> tuple[torch.Tensor, PIAState | None]:
        """The attention half of the kept branch: ``h = x + Attn(u + A_k(u))``."""
        u = self.attention_norm(x)
        if self.adapter is None or self.merged_adapter is self.adapter:  # none, or in wq/wk/wv
            z = u
        else:
            z, state = self._adapted(self.adapter, u, mask, state)
        return x + self._attend(z, start_pos, args, kwargs), state

    def _block(self, x: torch.Tensor, start_pos: int | None, args: tuple, kwargs: dict):
        """The block's own forward on ``x``."""
        return type(self.block).forward(self.block, x, start_pos, *args, **kwargs)

    def _attend(self, z: torch.Tensor, start_pos: int | None, args: tuple, kwargs: dict):
        """The attention's output on the adapted input ``z``."""
        return self.attention(z, start_pos, *args, **kwargs)

    def _gather(self, args: tuple, kwargs: dict, index: torch.Tensor, batch: int):
        """The per-example arguments of examples ``index``; the others unchanged."""
        return (
            tuple(_rows(a, index, batch, self.row_dims) for a in args),
            {k: _rows(v, index, batch, self.row_dims) for k, v in kwargs.items()},
        )

    def _shortcut(
        self, x: torch.Tensor, mask: torch.Tensor | None, state: PIAState | None
    ) -> tuple[torch.Tensor, PIAState | None]:
        """The shortcut of ``x``, with a state computed over ``mask`` (fresh) or ``state``."""
        assert self.pia is not None
        if self.unit == "block":
            u = self.attention_norm(x)
            if state is None:
                state = self.pia.compute_state(u, mask, mask_checked=True)
            return x + self._frozen_delta(self.pia, u, state), state
        v = self.ffn_norm(x)
        if self.merged_adapter is self.pia:  # PIA_s is in W1/W3
            return x + self.feed_forward(v), state
        if state is not None and self.control.lowrank:  # a decode call: the frozen state
            rows = torch.arange(x.shape[0], device=x.device)
            with self._lowrank_path(state, rows, x.shape[0]):
                return x + self.feed_forward(v), state
        z, state = self._adapted(self.pia, v, mask, state)
        return x + self.feed_forward(z), state

    def _adapted(
        self, pia: PIA, u: torch.Tensor, mask: torch.Tensor | None, state: PIAState | None
    ) -> tuple[torch.Tensor, PIAState]:
        """``u + PIA(u)`` with a state over ``mask`` (fresh) or the frozen ``state``."""
        if state is None:
            return pia.adapt(u, mask, mask_checked=True)
        return u + self._frozen_delta(pia, u, state), state

    def _frozen_delta(self, pia: PIA, u: torch.Tensor, state: PIAState) -> torch.Tensor:
        """``PIA(u)`` on a frozen state, ``(u W_d1ᵀ) W_u + β`` (EAS_SPEC §4), as
        :meth:`PIA.forward` computes it. Without gradients (decoding) the state's
        ``(W_u, β)`` is built once per route and adapter, while the adapter's weights are
        unchanged, instead of at every step; with gradients it is :meth:`PIA.forward`."""
        key = tensor_versions(list(pia.parameters()))
        if torch.is_grad_enabled() or key is None:
            return pia(u, state=state)
        cached = self._mixed.get(id(pia))
        if cached is None or cached[0] is not state or cached[1] != key:
            pia.check_state(state, u.shape[0])
            cached = (state, key, *pia.mixed_up_projection(state))
            self._mixed[id(pia)] = cached
        w_u, beta = cached[2], cached[3]
        return torch.baddbmm(beta.unsqueeze(1), F.linear(u, pia.down1.weight), w_u)

    @contextlib.contextmanager
    def _lowrank_path(self, state: PIAState, rows: torch.Tensor, batch: int) -> Iterator[None]:
        """``W1/W3`` add ``PIA_s`` of each skipped example through the low-rank path while
        the body runs (EAS_SPEC §4, :mod:`eas_kernels.ops.lowrank`): ``(v + PIA_s(v)) Wᵀ =
        v Wᵀ + κ_e F`` with the state-free factors ``F = U Wᵀ`` (kept across prompts while
        the weights and the PIA are unchanged) and ``κ_e`` from the example's frozen state:
        per decode step one down projection and one add per target, instead of the eager
        PIA's per-example ``W_u`` and products. The adds of the route's state are built at
        its first decode step and dropped at the next fresh call. They replace the
        targets' ``forward`` on the instance for the body only. ``state`` holds the
        examples ``rows`` of a batch of ``batch``; the other rows get ``κ = 0`` (kept
        examples, whose FFN input is not adapted, in the same call)."""
        if self._lowrank is None or self._lowrank[0] is not state:
            self._lowrank = (state, self._lowrank_forwards(state, rows, batch))
        linears = self.ffn_linears
        previous = [linear.__dict__.get("forward") for linear in linears]
        for linear, forward in zip(linears, self._lowrank[1], strict=True):
            linear.__dict__["forward"] = forward
        try:
            yield
        finally:
            for linear, before in zip(linears, previous, strict=True):
                if before is None:
                    del linear.__dict__["forward"]
                else:
                    linear.__dict__["forward"] = before

    def _lowrank_forwards(
        self, state: PIAState, rows: torch.Tensor, batch: int
    ) -> list[_LowrankLinear]:
        assert self.pia is not None
        pia, linears = self.pia, self.ffn_linears
        factors = self._factors.of(pia, linears)
        with torch.no_grad():
            mix = pia.state_mix(state)
            if len(rows) != batch:
                full = mix.new_zeros(batch, mix.shape[1])
                mix = full.index_copy(0, rows.to(mix.device), mix)
            hooks = lowrank_hooks_of(pia, factors, mix)
        return [_LowrankLinear(linear, hook) for linear, hook in zip(linears, hooks, strict=True)]

    def route_logits(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``g = router(ū)`` ``(B, 2)`` in at least float32, ``ū`` over the prompt tokens of
        ``attention_norm(x)``."""
        assert self.router is not None
        mean = masked_token_mean(self.attention_norm(x), mask)
        return torch.nn.functional.linear(mean, self.router.weight.to(mean.dtype))

    # ------------------------------------------------------------------ calls
    def __call__(
        self, x: torch.Tensor, start_pos: int | None, *args: object, **kwargs: object
    ) -> torch.Tensor:
        if start_pos is None or start_pos == 0:
            return self._fresh(x, start_pos, args, kwargs)
        return self._decode(x, start_pos, args, kwargs)

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.control.state_mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"prompt mask has shape {tuple(mask.shape)} but layer {self.layer} "
                f"sees {tuple(x.shape[:2])} (B, n) tokens"
            )
        return mask

    def _decide(self, x: torch.Tensor, start_pos: int | None, mask: torch.Tensor | None):
        """``(skip (B,) bool, None)`` under hard, random or forced routes, or ``(None,
        weights (B, 2))`` under soft routes (recorded in ``control.skip_weights``)."""
        control, batch = self.control, x.shape[0]
        if not self.routed:
            return torch.zeros(batch, dtype=torch.bool, device=x.device), None
        skip = control.forced_route(self.column, batch, x.device)
        if skip is None and control.mode == "random":
            skip = control.random_route(batch, x.device)
        if skip is None and control.mode == "soft":
            if start_pos is not None:
                raise ValueError(
                    "soft routing mixes both branches and belongs to training forwards "
                    "(start_pos=None); set the mode to 'hard' before a prefill"
                )
            logits = self.route_logits(x, mask)
            bias = logits.new_tensor([control.keep_bias, 0.0])
            weights = torch.softmax((logits + bias) / control.temperature, dim=-1)
            control.skip_weights[self.layer] = weights[:, 1]
            return None, weights
        if skip is None:
            logits = self.route_logits(x, mask)
            skip = logits[:, 1] > logits[:, 0]
        control.skip_weights[self.layer] = skip.float()
        return skip, None

    def _fresh(
        self, x: torch.Tensor, start_pos: int | None, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        self.release()
        self.route = None
        mask = self._mask(x)
        skip, weights = self._decide(x, start_pos, mask)
        if weights is not None:
            return self._recomputable(
                lambda x, weights: self._soft(x, args, kwargs, mask, weights), x, weights
            )
        runs = ~skip
        if self.control.batch_rule == "any_keeps" and self.routed and bool(runs.any()):
            runs = torch.ones_like(skip)  # RoE's release: the whole batch runs the unit
        route = LayerRoute.of(skip, runs)

        def branches(x: torch.Tensor) -> torch.Tensor:
            route.kept_state = route.skip_state = None  # a re-run computes them afresh too
            return self._run(x, start_pos, args, kwargs, route, mask)

        out = self._recomputable(branches, x)
        if start_pos == 0:
            self.route = route
        return out

    def _recomputable(
        self, branches: Callable[..., torch.Tensor], *inputs: torch.Tensor
    ) -> torch.Tensor:
        """``branches(*inputs)``: the branches of a fresh call, on a route already decided.
        :class:`~eas_kernels.routing.hf.HFRoutedForward` runs them under gradient
        checkpointing when the model trains with it; the decision stays outside, so the
        backward pass's re-run takes the same route and ``ρ̂`` keeps its gradient."""
        return branches(*inputs)

    def _soft(
        self,
        x: torch.Tensor,
        args: tuple,
        kwargs: dict,
        mask: torch.Tensor | None,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """``w_keep · keep + w_skip · skip`` per example (a training forward), each branch
        computed only on the examples whose weight for it reaches the machine epsilon of
        ``x``'s dtype: a smaller weight changes the sum by less than its rounding, and as τ
        anneals towards 0.01 the losing weight underflows towards subnormals (exp(−100)),
        whose products made a CPU step 2.9× slower (measured on a d = 256, 8-layer model,
        batch 8 × 96 tokens: 794 ms at τ = 0.01 against 274 ms at τ = 1 when both branches
        ran for every example; 152 ms with this rule, 138 ms under hard routes): late in
        training each example runs one branch."""
        weights = weights.to(x.dtype)
        weights = torch.where(weights < torch.finfo(x.dtype).eps, 0.0, weights)
        out = torch.zeros_like(x)
        batch = x.shape[0]
        for column, branch in ((0, self._kept_of), (1, self._shortcut_of)):
            rows = weights[:, column].nonzero().flatten()
            if len(rows) == 0:
                continue
            if len(rows) == batch:
                out = out + weights[:, column, None, None] * branch(x, args, kwargs, mask)
                continue
            part = branch(
                x.index_select(0, rows),
                *self._gather(args, kwargs, rows, batch),
                None if mask is None else mask.index_select(0, rows),
            )
            out = out.index_add(0, rows, weights[rows, column, None, None] * part)
        return out

    def _kept_of(self, x: torch.Tensor, args: tuple, kwargs: dict, mask: torch.Tensor | None):
        return self._kept(x, None, args, kwargs, mask, None)[0]

    def _shortcut_of(self, x: torch.Tensor, args: tuple, kwargs: dict, mask: torch.Tensor | None):
        return self._shortcut(x, mask, None)[0]

    def _decode(self, x: torch.Tensor, start_pos: int, args: tuple, kwargs: dict) -> torch.Tensor:
        route = self.route
        if route is None:
            raise RuntimeError(
                f"layer {self.layer} has no route: a decode call (start_pos > 0) must "
                "follow a prefill (start_pos=0)"
            )
        if route.skip.shape[0] != x.shape[0]:
            raise ValueError(
                f"decode batch size {x.shape[0]} differs from the prefill's {route.skip.shape[0]}"
            )
        if x.shape[0] == 1 and self.control.merge and self.merged_adapter is None:
            self.merge()
        for adapter, state in ((self.adapter, route.kept_state), (self.pia, route.skip_state)):
            if state is not None and adapter is not None and adapter is not self.merged_adapter:
                adapter.check_state_placement(state)  # a model converted mid-prompt
        return self._run(x, start_pos, args, kwargs, route, None)

    def _run(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        args: tuple,
        kwargs: dict,
        route: LayerRoute,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each example through the branch of ``route``: the kept branch on the kept rows,
        the shortcut on the others (a whole batch on one side runs without gathering). A
        fresh call (``mask`` given or not, states None) stores the states in ``route``."""
        if route.all_kept:
            out, route.kept_state = self._kept(x, start_pos, args, kwargs, mask, route.kept_state)
            return out
        if route.all_skipped:
            out, route.skip_state = self._shortcut(x, mask, route.skip_state)
            return out
        batch = x.shape[0]
        kept_args, kept_kwargs = self._gather(args, kwargs, route.kept, batch)
        kept_mask = None if mask is None else mask.index_select(0, route.kept)
        skipped_mask = None if mask is None else mask.index_select(0, route.skipped)
        if self.unit == "mha":
            return self._run_mixed_mha(
                x, start_pos, kept_args, kept_kwargs, route, kept_mask, skipped_mask
            )
        out = torch.full_like(x, float("nan"))  # poison: every row is written below
        kept, route.kept_state = self._kept(
            x.index_select(0, route.kept), start_pos, kept_args, kept_kwargs, kept_mask,
            route.kept_state,
        )  # fmt: skip
        shortcut, route.skip_state = self._shortcut(
            x.index_select(0, route.skipped), skipped_mask, route.skip_state
        )
        return out.index_copy(0, route.kept, kept).index_copy(0, route.skipped, shortcut)

    def _run_mixed_mha(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        kept_args: tuple,
        kept_kwargs: dict,
        route: LayerRoute,
        kept_mask: torch.Tensor | None,
        skipped_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """A batch whose examples split between an MHA and its shortcut: the attention runs
        on the kept examples only, ``h_k = x_k + Attn(u_k + A_k(u_k))``, the skipped ones
        keep ``h_s = x_s``; then **one** FFN call for the whole batch on ``z = ffn_norm(h)``,
        with ``PIA_s`` added to the skipped rows (eagerly, or by the low-rank path at a
        decode call), ``out = h + FFN(z)``. Each example computes what its branch computes
        alone; the FFN's weights are read once per call instead of once per branch."""
        kept_rows, skipped_rows = route.kept, route.skipped
        h_kept, route.kept_state = self._attended(
            x.index_select(0, kept_rows), start_pos, kept_args, kept_kwargs, kept_mask,
            route.kept_state,
        )  # fmt: skip
        h = x.index_copy(0, kept_rows, h_kept)
        z = self.ffn_norm(h)
        state = route.skip_state
        if state is not None and self.control.lowrank:
            with self._lowrank_path(state, skipped_rows, x.shape[0]):
                return h + self.feed_forward(z)
        assert self.pia is not None
        adapted, route.skip_state = self._adapted(
            self.pia, z.index_select(0, skipped_rows), skipped_mask, state
        )
        return h + self.feed_forward(z.index_copy(0, skipped_rows, adapted))

    def select_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Make the frozen route that of the examples ``index`` of the last prefill (a beam
        search's reorder, a batch selection or repetition: :meth:`LayerRoute.select`);
        returns where the new kept examples are among the old kept ones, the rows a cache
        of the kept examples keeps. A batch-1 merge is put back first."""
        if self.route is None:
            raise RuntimeError(f"layer {self.layer} has no route to select rows of")
        self.release()
        self.route, kept_rows = self.route.select(index)
        return kept_rows

    # ------------------------------------------------------------------ batch-1 merge
    def merge(self) -> None:
        """Write the (one) example's adapter of this layer into the weights that read it
        (EAS_SPEC §4): ``A_k`` into ``wq/wk/wv`` where it keeps, ``PIA_s`` into ``W1/W3``
        where it skips an MHA; ``W' = W + (W W_uᵀ) W_d1``, ``b' = b + W βᵀ``. NaN/Inf is
        refused before any weight changes. Nothing to do for a block shortcut (an adapter)
        or a kept layer without ``A_k``."""
        route = self.route
        if route is None:
            return
        if route.all_kept and self.adapter is not None and route.kept_state is not None:
            pia, state, linears = self.adapter, route.kept_state, self.attention_linears
        elif route.all_skipped and self.unit == "mha" and route.skip_state is not None:
            pia, state, linears = self.pia, route.skip_state, self.ffn_linears
        else:
            return
        with torch.no_grad():
            w_u, beta = pia.mixed_up_projection(state)
            merged = merged_linear(
                [linear.weight for linear in linears],
                [linear.bias for linear in linears],
                pia.down1.weight,
                w_u[0],
                beta[0],
            )
        records: list[MergeRecord] = []
        try:
            for linear, target in zip(linears, merged, strict=True):
                records.append(MergeRecord.install(linear, target))
        except BaseException:
            for record in reversed(records):
                record.restore()
            raise
        self.merged, self.merged_adapter = records, pia

    def release(self) -> None:
        """Put the weights a :meth:`merge` changed back (bitwise) and drop the low-rank
        path's adds: what a route installed for its decode."""
        self.unmerge()
        self._lowrank = None
        self._mixed.clear()

    def unmerge(self) -> None:
        """Put the weights a :meth:`merge` changed back, bitwise (a ``RuntimeWarning`` when
        one was changed in place meanwhile: that change is discarded)."""
        merged, self.merged, self.merged_adapter = self.merged, [], None
        warn_discarded(restore_records(merged))


class _LowrankLinear:
    """The ``forward`` of ``W1`` or ``W3`` while a low-rank path is on: ``z Wᵀ + b + κ F``
    (``add``: :class:`~eas_kernels.runtime.LowrankHook` of the skipped examples)."""

    def __init__(self, linear: nn.Linear, add: LowrankHook) -> None:
        self.linear, self.add = linear, add

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        return self.add(linear, (z,), F.linear(z, linear.weight, linear.bias))
