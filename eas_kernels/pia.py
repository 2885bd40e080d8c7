"""PIA, the propagation-of-information adapter (EAS_SPEC §1, paper Eq. 4–6).

For one example with tokens ``u`` (``n × d``) and a token mask ``m`` (``n``, bool):

    ū  = Σ_t m_t u_t / Σ_t m_t                  masked mean over tokens
    c  = b_d1 + down2(ū)                         (c = b_d1 when token_mixing=False)
    α  = softmax(router(ū) / τ)                  two weights per example
    H  = u W_d1ᵀ + c                             n × r
    PIA(u) = α₁·up1(H) + α₂·up2(H)               n × d   (the delta; the caller adds u)

The pair ``S = (c, α)`` is the example's *state*. With ``S`` fixed the adapter is affine
in ``u`` (EAS_SPEC §4):

    W_u = α₁ W_u1ᵀ + α₂ W_u2ᵀ                    r × d
    β   = c W_u + α₁ b_u1 + α₂ b_u2               1 × d
    PIA(u) = (u W_d1ᵀ) W_u + β

which is how :meth:`PIA.forward` evaluates it (one ``n × r × d`` product instead of two)
and what the re-parameterisation writes into the weights that read ``u + PIA(u)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_finite, check_positive_int, check_tensor, check_token_mask


def masked_token_mean(u: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``ū = Σ_t m_t u_t / Σ_t m_t`` of ``u`` ``(B, n, d)`` over a ``(B, n)`` bool mask with a
    token in every row (None: all tokens), ``(B, d)``, accumulated and returned in at least
    float32: the prompt summary a PIA's state (§1) and a route (ROE_SPEC §3) are read from."""
    compute = torch.promote_types(u.dtype, torch.float32)
    if mask is None:
        return u.to(compute).mean(dim=1)
    summed = torch.where(mask.unsqueeze(-1), u.to(compute), 0.0).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True)


def router_softmax(
    mean: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``α = softmax(router(ū) / τ)`` (Eq. 5), computed in at least float32, not rounded."""
    compute = torch.promote_types(mean.dtype, torch.float32)
    logits = F.linear(mean, router_weight, router_bias).to(compute)
    return torch.softmax(logits / temperature, dim=-1)


def mix_up(
    alpha: torch.Tensor,
    c: torch.Tensor,
    up1_t: torch.Tensor,
    up2_t: torch.Tensor,
    up1_bias: torch.Tensor,
    up2_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_u = α₁ W_u1ᵀ + α₂ W_u2ᵀ`` and ``β = c W_u + α₁ b_u1 + α₂ b_u2`` (EAS_SPEC §4) of
    ``N`` states of one PIA: ``alpha`` ``(N, 2)``, ``c`` ``(N, r)``; its up weights
    transposed ``(r, d)`` and up biases ``(d,)``. Returns ``(N, r, d)`` and ``(N, d)``: the
    PyTorch form of the mixed up projection (:meth:`PIA.mixed_up_projection`; the merge
    takes the same sums from the factors, :func:`eas_kernels.ops.products_from_factors`)."""
    a1, a2 = alpha[:, 0, None], alpha[:, 1, None]
    w_u = a1[..., None] * up1_t + a2[..., None] * up2_t
    beta = torch.bmm(c.unsqueeze(1), w_u).squeeze(1) + (a1 * up1_bias + a2 * up2_bias)
    return w_u, beta


def state_from_mean(
    mean: torch.Tensor,
    down1_bias: torch.Tensor,
    down2_weight: torch.Tensor | None,
    down2_bias: torch.Tensor | None,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, α)`` from the token means ``ū`` (``(B, d)``, in the weights' dtype):
    ``c = b_d1 + down2(ū)`` (``b_d1`` without ``down2``), ``α`` rounded to ``ū``'s dtype.

    The one implementation of the state epilogue, shared by :meth:`PIA.compute_state` and
    the fused kernels (:mod:`eas_kernels.ops.pia_fused`).
    """
    if down2_weight is None:
        c = down1_bias.expand(mean.shape[0], down1_bias.shape[0])
    else:
        c = down1_bias + F.linear(mean, down2_weight, down2_bias)
    alpha = router_softmax(mean, router_weight, router_bias, temperature).to(mean.dtype)
    return c, alpha


@dataclass(frozen=True)
class PIAState:
    """The frozen per-example state of a PIA: ``c`` is ``(B, rank)``, ``alpha`` is ``(B, 2)``."""

    c: torch.Tensor
    alpha: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.c.shape[0])

    def detach(self) -> PIAState:
        return PIAState(self.c.detach(), self.alpha.detach())


@dataclass(frozen=True)
class RunningSums:
    """What a running-state PIA carries between calls (``SkipPlan(state="running")``):
    the sum of the tokens averaged so far, ``(B, dim)``, and their count, ``(B,)``, both in
    at least float32."""

    total: torch.Tensor
    count: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.total.shape[0])

    def detach(self) -> RunningSums:
        return RunningSums(self.total.detach(), self.count.detach())


class PIA(nn.Module):
    """Two-path low-rank adapter with token averaging and a softmax router.

    Args:
        dim: width ``d`` of the hidden states it adapts.
        rank: bottleneck ``r``.
        token_mixing: whether the second down path (``down2``, on the token mean) exists.
            ``False`` gives LaVIN's rank-8 router adapter used before kept MHAs.
        temperature: router temperature ``τ``.

    ``up1`` and ``up2`` start at zero, so a fresh PIA returns an exact zero delta.
    """

    def __init__(
        self, dim: int, rank: int, *, token_mixing: bool = True, temperature: float = 10.0
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.rank = check_positive_int(rank, "rank")
        if not isinstance(token_mixing, bool):
            raise TypeError(f"token_mixing must be a bool, got {type(token_mixing).__name__}")
        self.token_mixing = token_mixing
        self.temperature = check_positive_finite(temperature, "temperature")
        self.down1 = nn.Linear(dim, rank)
        self.down2 = nn.Linear(dim, rank) if token_mixing else None
        self.up1 = nn.Linear(rank, dim)
        self.up2 = nn.Linear(rank, dim)
        self.router = nn.Linear(dim, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier down projections with zero biases, zero up projections, default router."""
        downs = [self.down1] + ([self.down2] if self.down2 is not None else [])
        for down in downs:
            nn.init.xavier_uniform_(down.weight)
            nn.init.zeros_(down.bias)
        for up in (self.up1, self.up2):
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.router.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, rank={self.rank}, token_mixing={self.token_mixing}, "
            f"temperature={self.temperature}"
        )

    # ------------------------------------------------------------------ validation
    def _check_input(self, u: object, name: str = "u") -> torch.Tensor:
        weight = self.down1.weight
        check_tensor(u, name, ndim=3, floating=True)
        assert isinstance(u, torch.Tensor)
        if u.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape (B, n, {self.dim}), got {tuple(u.shape)}")
        if u.device != weight.device:
            raise ValueError(
                f"{name} is on device {u.device} but the PIA is on device {weight.device}"
            )
        if u.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {u.dtype} but the PIA's weights are {weight.dtype}")
        if u.shape[1] == 0:
            raise ValueError(f"{name} has no tokens (shape {tuple(u.shape)})")
        return u

    def check_state(self, state: object, batch_size: int) -> PIAState:
        """Validate a frozen state against this PIA and a batch size."""
        if not isinstance(state, PIAState):
            raise TypeError(f"state must be a PIAState, got {type(state).__name__}")
        fields = (("c", self.rank), ("alpha", 2))
        for field, _ in fields:
            check_tensor(getattr(state, field), f"state.{field}", ndim=2)
        self.check_state_placement(state)
        for field, width in fields:
            value = getattr(state, field)
            if tuple(value.shape) != (batch_size, width):
                raise ValueError(
                    f"state.{field} must have shape ({batch_size}, {width}), "
                    f"got {tuple(value.shape)}"
                )
        return state

    def check_state_placement(self, state: PIAState) -> None:
        """Refuse (``TypeError``) a state whose dtype or device is not the weights': a
        frozen state belongs to the prefill that computed it, so a model converted
        (``.to``, ``.double()``, ``.half()``) in the middle of a prompt must start a new
        one. A merged model decodes on (its weights carry the state); the eager and
        low-rank paths read the state and stop here."""
        weight = self.down1.weight
        for held in ((state.c.dtype, state.c.device), (state.alpha.dtype, state.alpha.device)):
            if held == (weight.dtype, weight.device):
                continue
            raise TypeError(
                f"state is {held[0]} on {held[1]} but the PIA's weights are {weight.dtype} "
                f"on {weight.device}: a frozen state keeps the dtype and device of the "
                "prefill that computed it, so after converting a model (.to, .double(), "
                ".half()) start a new prompt (a prefill, start_pos=0)"
            )

    # ------------------------------------------------------------------ math
    def compute_state(
        self, u: torch.Tensor, mask: torch.Tensor | None = None, *, mask_checked: bool = False
    ) -> PIAState:
        """State ``(c, α)`` of each example from its tokens ``u`` (``(B, n, d)``).

        ``mask`` (``(B, n)`` bool) selects the tokens averaged into ``ū``; ``None`` averages
        all tokens. The mean and the softmax accumulate in at least float32.
        ``mask_checked=True``: the caller has validated ``mask`` (shape, device, a token in
        every row) — the runtime does, once per model call — so no host sync happens here.
        """
        self._check_input(u)
        if mask is not None and not mask_checked:
            check_token_mask(mask, "mask", shape=tuple(u.shape[:2]), device=u.device)
        mean = masked_token_mean(u, mask).to(u.dtype)
        return PIAState(*self._state_of_means(mean))

    def _state_of_means(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, α)`` of token means ``(N, dim)`` (:func:`state_from_mean` on this PIA)."""
        return state_from_mean(
            means,
            self.down1.bias,
            None if self.down2 is None else self.down2.weight,
            None if self.down2 is None else self.down2.bias,
            self.router.weight,
            self.router.bias,
            self.temperature,
        )

    def mixed_up_projection(self, state: PIAState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_u, β)`` of each example: ``(B, rank, dim)`` and ``(B, dim)`` (EAS_SPEC §4)."""
        up1, up2 = self.up1, self.up2
        return mix_up(state.alpha, state.c, up1.weight.t(), up2.weight.t(), up1.bias, up2.bias)

    def up_basis(self) -> torch.Tensor:
        """``U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]``, ``(2·rank + 2, dim)``: the state-free rows that
        every example's ``W_u`` and ``β`` combine (EAS_SPEC §4), for the low-rank path
        (:func:`eas_kernels.ops.lowrank_factors`)."""
        up1, up2 = self.up1, self.up2
        return torch.cat([up1.weight.t(), up2.weight.t(), up1.bias[None], up2.bias[None]])

    def state_mix(self, state: PIAState) -> torch.Tensor:
        """``[α₁, α₂, c]`` of each example, ``(B, rank + 2)``: with ``U`` = :meth:`up_basis`,
        ``W_u = α₁ U[:r] + α₂ U[r:2r]`` and ``β = c W_u + α₁ U[2r] + α₂ U[2r+1]``."""
        return torch.cat([state.alpha.to(state.c.dtype), state.c], dim=1)

    def adapt(
        self, u: torch.Tensor, mask: torch.Tensor | None = None, *, mask_checked: bool = False
    ) -> tuple[torch.Tensor, PIAState]:
        """A fresh call (training forward or prefill): ``(u + PIA(u), state)``.

        The state is computed from ``u`` over ``mask`` (EAS_SPEC §3) and returned with
        gradients attached (the runtime detaches the copy it freezes). CUDA tensors run the
        fused Triton kernels of :mod:`eas_kernels.ops.pia_fused` when triton is installed
        (``EAS_PIA_BACKEND`` forces either path: :func:`eas_kernels.ops.pia_backend`).
        ``mask_checked`` as for :meth:`compute_state`.
        """
        from .ops import pia_backend

        if pia_backend(u) == "triton":
            from .ops.pia_fused import pia_adapt

            return pia_adapt(self, u, mask, mask_checked=mask_checked)
        state = self.compute_state(u, mask, mask_checked=mask_checked)
        return u + self(u, state=state), state

    def forward(
        self,
        u: torch.Tensor,
        mask: torch.Tensor | None = None,
        state: PIAState | None = None,
    ) -> torch.Tensor:
        """Return the delta ``PIA(u)`` (``(B, n, dim)``).

        Args:
            u: ``(B, n, dim)`` input tokens, same dtype and device as the PIA.
            mask: ``(B, n)`` bool, tokens averaged into the state (None: all). Ignored
                when ``state`` is given.
            state: a frozen :class:`PIAState` to use instead of computing one from ``u``.
        """
        self._check_input(u)
        if state is None:
            state = self.compute_state(u, mask)
        else:
            self.check_state(state, u.shape[0])
        w_u, beta = self.mixed_up_projection(state)
        projected = F.linear(u, self.down1.weight)
        return torch.baddbmm(beta.unsqueeze(1), projected, w_u)

    def running(
        self, u: torch.Tensor, mask: torch.Tensor | None = None, carry: RunningSums | None = None
    ) -> tuple[torch.Tensor, RunningSums]:
        """The delta with a *running* state (the Table 4 ablation without the frozen bias
        term; not re-parameterisable): ``(PIA(u), sums)``.

        Token ``t`` of an example uses the state of the causal mean
        ``ū_t = (Σ_{s≤t} m_s u_s + total) / (Σ_{s≤t} m_s + count)``, where ``(total,
        count)`` come from ``carry`` (the earlier calls of a decode; zeros without it)::

            c_t = b_d1 + down2(ū_t),  α_t = softmax(router(ū_t) / τ)
            PIA(u)_t = α_t1·up1(u_t W_d1ᵀ + c_t) + α_t2·up2(u_t W_d1ᵀ + c_t)

        ``mask`` (``(B, n)`` bool, None: all) selects the tokens that enter the sums; a
        token before the first selected one is averaged over nothing and gets ``ū_t = 0``.
        Returns the sums after the last token, for the next call.
        """
        self._check_input(u)
        batch, tokens, dim = u.shape
        compute = torch.promote_types(u.dtype, torch.float32)
        if mask is None:
            weights = torch.ones(batch, tokens, dtype=compute, device=u.device)
        else:
            check_tensor(mask, "mask", ndim=2, dtype=torch.bool, device=u.device)
            if tuple(mask.shape) != (batch, tokens):
                raise ValueError(
                    f"mask must have shape {(batch, tokens)} (B, n), got {tuple(mask.shape)}"
                )
            weights = mask.to(compute)
        totals = (u.to(compute) * weights.unsqueeze(-1)).cumsum(dim=1)
        counts = weights.cumsum(dim=1)
        if carry is not None:
            if not isinstance(carry, RunningSums) or carry.batch_size != batch:
                raise ValueError(f"carry must be the RunningSums of {batch} examples")
            totals = totals + carry.total.unsqueeze(1)
            counts = counts + carry.count.unsqueeze(1)
        means = (totals / counts.clamp(min=1).unsqueeze(-1)).to(u.dtype)
        c, alpha = self._state_of_means(means.reshape(batch * tokens, dim))
        hidden = F.linear(u, self.down1.weight) + c.reshape(batch, tokens, -1)
        alpha = alpha.reshape(batch, tokens, 2)
        delta = alpha[..., :1] * self.up1(hidden) + alpha[..., 1:] * self.up2(hidden)
        return delta, RunningSums(totals[:, -1], counts[:, -1])
