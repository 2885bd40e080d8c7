"""The forward of a routed block: each example takes its kept branch or its shortcut.

For routed layer ``i`` with input ``x`` ``(B, n, d)`` and ``u = attention_norm(x)``
(ROE_SPEC §2–§5)::

    ū      = masked mean of u over the prompt tokens                (B, d)
    g      = router(ū) = ū Wᵀ,  W (2, d), no bias                    (B, 2): (keep, skip)
    keep   = Layer(x)       = h + FFN(ffn_norm(h)),  h = x + Attn(u)
    skip   = x + FFN(v + PIA_s(v)),  v = ffn_norm(x)                 (unit "mha": dynamic EAS)
           = x + A(u)                                                (unit "block": RoE)

    soft  (training):  out = w_keep · keep + w_skip · skip,  w = softmax((g + [b, 0]) / τ)
    hard  (inference): out_e = skip_e if g_e,skip > g_e,keep else keep_e

Under hard, random or forced routes every unit runs **only on the examples that take it**
(gather, compute, scatter): the kept branch's attention sees, and its KV cache holds, the
kept examples only. The route, and the shortcut's PIA state, are computed at the fresh call
from the prompt and frozen for the decode calls that follow (the route never sees an
answer token). At batch 1 a skipped ``mha`` unit's PIA is merged into ``W1/W3`` for the
decode (EAS_SPEC §4) and put back bitwise at the next fresh call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layout import BlockLayout
from ..ops import merged_linear
from ..pia import PIA, PIAState, masked_token_mean
from ..runtime import MergeRecord
from .control import RouteControl


@dataclass
class LayerRoute:
    """The frozen route of one layer for the examples of a prefill."""

    skip: torch.Tensor  # (B,) bool: the route's decision
    kept: torch.Tensor  # indices of the examples that run the layer (batch rule applied)
    skipped: torch.Tensor  # indices of the examples that take the shortcut
    all_kept: bool
    all_skipped: bool
    state: PIAState | None  # the shortcut PIA's state of the skipped examples


def _rows(value: object, index: torch.Tensor, batch: int) -> object:
    """``value[index]`` for a per-example tensor (first dim ``batch``, at least 3-D: RoPE
    rotations ``(B, n, hd/2)``, masks ``(B, 1, n, keys)``), else ``value`` unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[0] == batch:
        return value.index_select(0, index)
    return value


class RoutedForward:
    """The replaced ``forward`` of routed block ``layer`` (a callable object, so that a deep
    copy of the model points at the copied modules).

    Called as the block is, ``(x, start_pos, freqs_cis, mask, ...)`` (LaVIN layout):
    ``start_pos`` None (training) or 0 (prefill) routes afresh, > 0 decodes on the frozen
    route of the last prefill.
    """

    def __init__(
        self,
        layer: int,
        column: int,
        block: nn.Module,
        layout: BlockLayout,
        router: nn.Linear,
        pia: PIA,
        unit: str,
        control: RouteControl,
    ) -> None:
        self.layer, self.column, self.block, self.unit = layer, column, block, unit
        self.attention_norm = getattr(block, layout.attention_norm)
        self.ffn_norm = getattr(block, layout.ffn_norm)
        self.feed_forward = getattr(block, layout.feed_forward)
        self.ffn_linears = layout.ffn_linears(block)
        self.router, self.pia, self.control = router, pia, control
        self.route: LayerRoute | None = None
        self.merged: list[MergeRecord] = []

    # ------------------------------------------------------------------ branches
    def _kept(self, x: torch.Tensor, start_pos: int | None, *args: object) -> torch.Tensor:
        return type(self.block).forward(self.block, x, start_pos, *args)

    def _shortcut(
        self, x: torch.Tensor, mask: torch.Tensor | None, state: PIAState | None
    ) -> tuple[torch.Tensor, PIAState | None]:
        """The shortcut of ``x``, with a state computed over ``mask`` (fresh) or ``state``."""
        if self.unit == "block":
            u = self.attention_norm(x)
            if state is None:
                state = self.pia.compute_state(u, mask, mask_checked=True)
            return x + self.pia(u, state=state), state
        v = self.ffn_norm(x)
        if self.merged:  # the PIA is in W1/W3
            return x + self.feed_forward(v), state
        if state is None:
            z, state = self.pia.adapt(v, mask, mask_checked=True)
        else:
            z = v + self.pia(v, state=state)
        return x + self.feed_forward(z), state

    def route_logits(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``g = router(ū)`` ``(B, 2)`` in at least float32, ``ū`` over the prompt tokens of
        ``attention_norm(x)``."""
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
                f"prompt mask has shape {tuple(mask.shape)} but routed layer {self.layer} "
                f"sees {tuple(x.shape[:2])} (B, n) tokens"
            )
        return mask

    def _fresh(
        self, x: torch.Tensor, start_pos: int | None, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        self.unmerge()
        self.route = None
        control, batch = self.control, x.shape[0]
        mask = self._mask(x)
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
            kept = self._kept(x, start_pos, *args, **kwargs)
            shortcut, _ = self._shortcut(x, mask, None)
            w = weights.to(x.dtype)[:, :, None, None]
            return w[:, 0] * kept + w[:, 1] * shortcut
        if skip is None:
            logits = self.route_logits(x, mask)
            skip = logits[:, 1] > logits[:, 0]
        control.skip_weights[self.layer] = skip.float()
        runs = ~skip
        if control.batch_rule == "any_keeps" and bool(runs.any()):
            runs = torch.ones_like(skip)  # RoE's release: the whole batch runs the unit
        kept_rows, skipped_rows = runs.nonzero().flatten(), (~runs).nonzero().flatten()
        route = LayerRoute(
            skip, kept_rows, skipped_rows, len(skipped_rows) == 0, len(kept_rows) == 0, None
        )
        out, route.state = self._run(x, start_pos, args, kwargs, route, mask, None)
        if start_pos == 0:
            self.route = route
        return out

    def _decode(self, x: torch.Tensor, start_pos: int, args: tuple, kwargs: dict) -> torch.Tensor:
        route = self.route
        if route is None:
            raise RuntimeError(
                f"routed layer {self.layer} has no route: a decode call (start_pos > 0) must "
                "follow a prefill (start_pos=0)"
            )
        if route.skip.shape[0] != x.shape[0]:
            raise ValueError(
                f"decode batch size {x.shape[0]} differs from the prefill's {route.skip.shape[0]}"
            )
        if x.shape[0] == 1 and route.all_skipped and self.control.merge and not self.merged:
            self.merge()
        out, _ = self._run(x, start_pos, args, kwargs, route, None, route.state)
        return out

    def _run(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        args: tuple,
        kwargs: dict,
        route: LayerRoute,
        mask: torch.Tensor | None,
        state: PIAState | None,
    ) -> tuple[torch.Tensor, PIAState | None]:
        """Each example through the branch of ``route``: the kept branch on the kept rows,
        the shortcut on the others (a whole batch on one side runs without gathering)."""
        if route.all_kept:
            return self._kept(x, start_pos, *args, **kwargs), None
        if route.all_skipped:
            return self._shortcut(x, mask, state)
        batch = x.shape[0]
        out = torch.full_like(x, float("nan"))  # poison: every row is written below
        kept_args = [_rows(a, route.kept, batch) for a in args]
        kept_kwargs = {k: _rows(v, route.kept, batch) for k, v in kwargs.items()}
        kept = self._kept(x.index_select(0, route.kept), start_pos, *kept_args, **kept_kwargs)
        skipped_mask = None if mask is None else mask.index_select(0, route.skipped)
        shortcut, state = self._shortcut(x.index_select(0, route.skipped), skipped_mask, state)
        out = out.index_copy(0, route.kept, kept).index_copy(0, route.skipped, shortcut)
        return out, state

    # ------------------------------------------------------------------ batch-1 merge
    def merge(self) -> None:
        """Write the frozen PIA state of the (one) example into ``W1/W3`` (unit ``mha``;
        EAS_SPEC §4): ``W' = W + (W W_uᵀ) W_d1``, ``b' = b + W βᵀ``; NaN/Inf refused
        before any weight changes."""
        route = self.route
        if self.unit != "mha" or route is None or route.state is None:
            return
        with torch.no_grad():
            w_u, beta = self.pia.mixed_up_projection(route.state)
            merged = merged_linear(
                [linear.weight for linear in self.ffn_linears],
                [linear.bias for linear in self.ffn_linears],
                self.pia.down1.weight,
                w_u[0],
                beta[0],
            )
        records: list[MergeRecord] = []
        try:
            for linear, target in zip(self.ffn_linears, merged, strict=True):
                records.append(MergeRecord.install(linear, target))
        except BaseException:
            for record in reversed(records):
                record.restore()
            raise
        self.merged = records

    def unmerge(self) -> None:
        """Put the weights a :meth:`merge` changed back, bitwise."""
        for record in reversed(self.merged):
            record.restore()
        self.merged = []
