"""Fused Triton training kernels of PIA: ``z = u + PIA(u)`` and its backward (EAS_SPEC §1).

One call of :func:`pia_adapt` computes what :meth:`eas_kernels.PIA.adapt` computes (a
training forward or a prefill of a skipped layer, ``u = ffn_norm(x)``, or of a kept layer's
adapter, ``u = attention_norm(x)``). Paper Eq. 4-6, per example ``e`` with tokens ``u``
(``n × d``), prompt mask ``m`` (``n``, bool, at least one True; EAS_SPEC §3) and
``N = Σ_t m_t``::

    ū  = Σ_t m_t u_t / N                           (Eq. 5, accumulated in fp32, cast to u.dtype)
    c  = b_d1 + down2(ū)                           (= b_d1 when token_mixing=False)
    α  = softmax(router(ū) / τ)                    (Eq. 6, in fp32, cast to u.dtype)
    H  = u W_d1ᵀ + c                               n × r
    z  = u + H W_u + b_mix,   W_u = α₁ W_u1ᵀ + α₂ W_u2ᵀ (r × d),  b_mix = α₁ b_u1 + α₂ b_u2
                                                   (Eq. 4: u + α₁ up1(H) + α₂ up2(H))

Shapes: ``u``, ``z`` ``(B, n, d)``; ``mask`` ``(B, n)`` bool; ``down1.weight`` ``W_d1`` and
``down2.weight`` ``W_d2`` ``(r, d)``; ``up1.weight`` ``W_u1``, ``up2.weight`` ``W_u2``
``(d, r)``; ``router.weight`` ``W_r`` ``(2, d)``; the state ``c`` ``(B, r)`` and ``α``
``(B, 2)``. Every product accumulates in fp32 (fp64 for fp64 inputs) and ``z`` is rounded
once to ``u.dtype``.

Forward, two passes over ``u``:

* down kernel (grid ``B × ⌈n/BN⌉``): ``P = u W_d1ᵀ`` ``(B, n, r)`` and per-tile masked
  token sums ``(B, ⌈n/BN⌉, d)``, one read of ``u``; a torch epilogue of ``O(B·(r+2)·d)``
  gives ``ū, c, α`` with :meth:`PIA.compute_state`'s arithmetic;
* up kernel (grid ``B × ⌈n/BN⌉ × ⌈d/BD⌉``): ``z`` as above, the per-example router mix
  done on the weight tiles; one read of ``u``, one write of ``z``.

Backward, given ``G = ∂L/∂z`` and the gradients ``ĝc``, ``ĝα`` of the returned state;
only ``u``, ``ū``, ``c``, ``α`` and the mask are saved, ``P`` is recomputed:

* token kernel (grid ``B × ⌈n/BN⌉``): ``P``, ``Q_k = G W_uk`` (one read of ``u`` and
  ``G``), ``H = P + c``, ``dH = α₁ Q₁ + α₂ Q₂`` and
  ``∂L/∂α_k = Σ_t (Q_k,t · H_t + G_t · b_uk) + ĝα_k``;
* epilogue (torch, ``O(B·(r+2)·d)``): ``dc = Σ_t dH_t + ĝc``; the softmax backward
  ``dl = α ⊙ (dα − α·dα) / τ``; ``dū = dc W_d2 + dl W_r``; the gradients of ``down2``,
  ``router`` and ``b_d1``;
* weight kernel (grid ``⌈d/BD⌉ × splits``): ``du = G + dH W_d1 + m_t dū / N``,
  ``dW_uk = Σ_e,t G_tᵀ (α_k H_t)``, ``db_uk = Σ_e,t α_k G_t``, ``dW_d1 = Σ_e,t dH_tᵀ u_t``
  (one more read of ``u`` and ``G``, one write of ``du``).

The two kernels of each direction are ``torch.library`` custom ops
(``eas_kernels::pia_fused_forward`` / ``pia_fused_backward``, with fake implementations)
tied together by :class:`PIAFusedFunction`, so a patched model compiles with
``torch.compile``. On a CPU the kernels run under ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._checks import check_token_mask
from ..pia import PIA, PIAState, router_softmax, state_from_mean

Result = TypeVar("Result")

# Tile configurations (BN tokens, BD features, software-pipelining stages), largest first;
# the rank is padded to BR >= 16 (tl.dot's minimum). Shared memory grows with the tiles,
# the stages, BR and the element size: e.g. the backward kernels at (64, 64, 3) need
# 114,944 B in fp32 at r = 32, over the 101,376 B of sm_86/sm_89, and 180,480 B in fp64 at
# r = 8, over the A100's 166,912 B. A launch whose kernel needs more than the device has
# raises OutOfResources before anything runs; the op then retries with the next
# configuration and remembers the one that fits (per device, op, dtype and BR).
_GPU_TILES = ((64, 64, 3), (64, 64, 2), (64, 32, 2), (32, 32, 2), (32, 32, 1), (16, 32, 1))
_INTERPRETER_TILES = ((16, 32, 1),)  # small tiles so that the tests' small shapes span several
_FITTING: dict[tuple, int] = {}  # (device, op, dtype, BR) -> index into _GPU_TILES


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (the tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def kernel_config(on_gpu: bool, dtype: torch.dtype, rank: int, tiles: tuple[int, int, int]) -> dict:
    """The compile-time constants and launch options of the kernels for ``tiles``.

    Products accumulate in fp32 (fp64 for fp64 inputs). Two kinds of dots:

    * dots of two stored operands (``u W_d1ᵀ`` in the forward and backward, ``G W_uk`` in
      the backward) take them in their storage type ``OPD``: 16-bit inputs go to the
      tensor cores at the 16-bit rate, and the products are exact in the fp32 accumulator,
      so nothing is lost against upcasting. (In Triton's CPU interpreter ``tl.dot`` does
      not support bf16 operands, so bf16 is fed there as fp32: the same exact products.)
    * dots that multiply values the kernel computed in fp32 (``H``, ``dH``, ``α·H``, the
      router mix of ``W_u``) use full precision (``ieee``) for fp32 and fp64, and ``tf32x3``
      (three tf32 tensor-core products per dot, about fp32's accuracy) for 16-bit inputs,
      which plain tf32 would round to 10 bits.
    """
    block_n, block_d, stages = tiles
    wide = dtype == torch.float64
    exact = wide or dtype == torch.float32 or not on_gpu
    stored = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16 if on_gpu else tl.float32}
    return {
        "BN": block_n,
        "BD": block_d,
        "BR": max(16, triton.next_power_of_2(rank)),
        "ACC": tl.float64 if wide else tl.float32,
        "OPD": stored.get(dtype, tl.float64 if wide else tl.float32),
        "PREC": "ieee" if exact else "tf32x3",
        "num_stages": stages,
    }


def with_fitting_tiles(
    op: str, u: torch.Tensor, rank: int, run: Callable[[dict], Result]
) -> Result:
    """``run(config)`` with the largest tile configuration whose kernels fit the device.

    ``run`` launches the kernels of one op into freshly allocated buffers; a configuration
    that needs more shared memory than ``u``'s device has fails at its launch
    (``OutOfResources``, nothing written) and the next one is tried. Launches happen with
    ``u``'s device current (Triton launches on the current device).
    """
    if not u.is_cuda:
        return run(kernel_config(False, u.dtype, rank, _INTERPRETER_TILES[0]))
    key = (u.device.index, op, u.dtype, max(16, triton.next_power_of_2(rank)))
    with torch.cuda.device(u.device):
        for index in range(_FITTING.get(key, 0), len(_GPU_TILES)):
            try:
                result = run(kernel_config(True, u.dtype, rank, _GPU_TILES[index]))
            except OutOfResources:
                continue
            _FITTING[key] = index
            return result
    raise RuntimeError(
        f"{op}: no tile configuration of {_GPU_TILES} fits the shared memory of {u.device} "
        f"for {u.dtype} at rank {rank}; use EAS_PIA_BACKEND=torch"
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------- kernels
@triton.jit
def _down_kernel(
    u_ptr, mask_ptr, wd_ptr, p_ptr, sums_ptr, n, d, r,
    BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr, OPD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles = tl.num_programs(1)
    tok = tile * BN + tl.arange(0, BN)
    rk = tl.arange(0, BR)
    in_tok = tok < n
    chosen = tl.load(mask_ptr + e * n + tok, mask=in_tok, other=0) != 0
    p = tl.zeros((BN, BR), ACC)
    for d0 in range(0, d, BD):
        col = d0 + tl.arange(0, BD)
        in_col = col < d
        x = tl.load(
            u_ptr + (e * n + tok[:, None]) * d + col[None, :],
            mask=in_tok[:, None] & in_col[None, :],
            other=0.0,
        )
        wd_t = tl.load(
            wd_ptr + rk[None, :] * d + col[:, None],
            mask=(rk[None, :] < r) & in_col[:, None],
            other=0.0,
        )
        p += tl.dot(x.to(OPD), wd_t.to(OPD), input_precision="ieee", out_dtype=ACC)
        tile_sum = tl.sum(tl.where(chosen[:, None], x.to(ACC), 0.0), axis=0)
        tl.store(sums_ptr + (e * tiles + tile) * d + col, tile_sum, mask=in_col)
    tl.store(
        p_ptr + (e * n + tok[:, None]) * r + rk[None, :],
        p,
        mask=in_tok[:, None] & (rk[None, :] < r),
    )


@triton.jit
def _up_kernel(
    u_ptr, p_ptr, c_ptr, alpha_ptr, wu1_ptr, bu1_ptr, wu2_ptr, bu2_ptr, z_ptr, n, d, r,
    BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr, OPD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64)
    tok = tl.program_id(1) * BN + tl.arange(0, BN)
    col = tl.program_id(2) * BD + tl.arange(0, BD)
    rk = tl.arange(0, BR)
    in_tok = tok < n
    in_col = col < d
    in_rank = rk < r
    a1 = tl.load(alpha_ptr + e * 2).to(ACC)
    a2 = tl.load(alpha_ptr + e * 2 + 1).to(ACC)
    p = tl.load(
        p_ptr + (e * n + tok[:, None]) * r + rk[None, :],
        mask=in_tok[:, None] & in_rank[None, :],
        other=0.0,
    )
    h = p + tl.load(c_ptr + e * r + rk, mask=in_rank, other=0.0).to(ACC)[None, :]
    w_at = rk[:, None] + col[None, :] * r  # W_ukᵀ tile (BR × BD) of up_k.weight (d × r)
    w_in = in_rank[:, None] & in_col[None, :]
    w1 = tl.load(wu1_ptr + w_at, mask=w_in, other=0.0).to(ACC)
    w2 = tl.load(wu2_ptr + w_at, mask=w_in, other=0.0).to(ACC)
    b1 = tl.load(bu1_ptr + col, mask=in_col, other=0.0).to(ACC)
    b2 = tl.load(bu2_ptr + col, mask=in_col, other=0.0).to(ACC)
    w_mix = a1 * w1 + a2 * w2
    b_mix = a1 * b1 + a2 * b2
    at = (e * n + tok[:, None]) * d + col[None, :]
    inside = in_tok[:, None] & in_col[None, :]
    x = tl.load(u_ptr + at, mask=inside, other=0.0).to(ACC)
    z = x + tl.dot(h, w_mix, input_precision=PREC, out_dtype=ACC) + b_mix[None, :]
    tl.store(z_ptr + at, z.to(z_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _bwd_token_kernel(
    u_ptr, g_ptr, wd_ptr, c_ptr, alpha_ptr, wu1_ptr, bu1_ptr, wu2_ptr, bu2_ptr,
    h_ptr, dh_ptr, dalpha_ptr, n, d, r,
    BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr, OPD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles = tl.num_programs(1)
    tok = tile * BN + tl.arange(0, BN)
    rk = tl.arange(0, BR)
    in_tok = tok < n
    in_rank = rk < r
    p = tl.zeros((BN, BR), ACC)
    q1 = tl.zeros((BN, BR), ACC)
    q2 = tl.zeros((BN, BR), ACC)
    gb1 = tl.zeros((BN,), ACC)
    gb2 = tl.zeros((BN,), ACC)
    for d0 in range(0, d, BD):
        col = d0 + tl.arange(0, BD)
        in_col = col < d
        at = (e * n + tok[:, None]) * d + col[None, :]
        inside = in_tok[:, None] & in_col[None, :]
        x = tl.load(u_ptr + at, mask=inside, other=0.0).to(OPD)
        g = tl.load(g_ptr + at, mask=inside, other=0.0)
        w_in = in_col[:, None] & in_rank[None, :]
        wd_t = tl.load(wd_ptr + rk[None, :] * d + col[:, None], mask=w_in, other=0.0).to(OPD)
        w_at = col[:, None] * r + rk[None, :]  # up_k.weight tile (BD × BR)
        wu1 = tl.load(wu1_ptr + w_at, mask=w_in, other=0.0).to(OPD)
        wu2 = tl.load(wu2_ptr + w_at, mask=w_in, other=0.0).to(OPD)
        p += tl.dot(x, wd_t, input_precision="ieee", out_dtype=ACC)
        q1 += tl.dot(g.to(OPD), wu1, input_precision="ieee", out_dtype=ACC)
        q2 += tl.dot(g.to(OPD), wu2, input_precision="ieee", out_dtype=ACC)
        g = g.to(ACC)
        gb1 += tl.sum(g * tl.load(bu1_ptr + col, mask=in_col, other=0.0).to(ACC)[None, :], axis=1)
        gb2 += tl.sum(g * tl.load(bu2_ptr + col, mask=in_col, other=0.0).to(ACC)[None, :], axis=1)
    a1 = tl.load(alpha_ptr + e * 2).to(ACC)
    a2 = tl.load(alpha_ptr + e * 2 + 1).to(ACC)
    h = p + tl.load(c_ptr + e * r + rk, mask=in_rank, other=0.0).to(ACC)[None, :]
    at = (e * n + tok[:, None]) * r + rk[None, :]
    inside = in_tok[:, None] & in_rank[None, :]
    tl.store(h_ptr + at, h, mask=inside)
    tl.store(dh_ptr + at, a1 * q1 + a2 * q2, mask=inside)
    # rows past n have G = 0, hence Q = 0 and gb = 0: they add nothing
    tl.store(dalpha_ptr + (e * tiles + tile) * 2, tl.sum(tl.sum(q1 * h, axis=1) + gb1, axis=0))
    tl.store(dalpha_ptr + (e * tiles + tile) * 2 + 1, tl.sum(tl.sum(q2 * h, axis=1) + gb2, axis=0))


@triton.jit
def _bwd_weight_kernel(
    u_ptr, g_ptr, mask_ptr, h_ptr, dh_ptr, alpha_ptr, wd_ptr, dmean_ptr, du_ptr,
    dwu1_ptr, dwu2_ptr, dbu1_ptr, dbu2_ptr, dwd_ptr, batch, n, d, r, tiles_per_example,
    BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr, OPD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    col = tl.program_id(0) * BD + tl.arange(0, BD)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rk = tl.arange(0, BR)
    in_col = col < d
    in_rank = rk < r
    wd = tl.load(
        wd_ptr + rk[:, None] * d + col[None, :],
        mask=in_rank[:, None] & in_col[None, :],
        other=0.0,
    ).to(ACC)
    dwu1 = tl.zeros((BD, BR), ACC)
    dwu2 = tl.zeros((BD, BR), ACC)
    dwd_t = tl.zeros((BD, BR), ACC)
    dbu1 = tl.zeros((BD,), ACC)
    dbu2 = tl.zeros((BD,), ACC)
    for job in range(split, batch * tiles_per_example, splits):
        e = (job // tiles_per_example).to(tl.int64)
        tok = (job % tiles_per_example) * BN + tl.arange(0, BN)
        in_tok = tok < n
        at = (e * n + tok[:, None]) * d + col[None, :]
        inside = in_tok[:, None] & in_col[None, :]
        x = tl.load(u_ptr + at, mask=inside, other=0.0).to(ACC)
        g = tl.load(g_ptr + at, mask=inside, other=0.0).to(ACC)
        r_at = (e * n + tok[:, None]) * r + rk[None, :]
        r_in = in_tok[:, None] & in_rank[None, :]
        h = tl.load(h_ptr + r_at, mask=r_in, other=0.0)
        dh = tl.load(dh_ptr + r_at, mask=r_in, other=0.0)
        chosen = tl.load(mask_ptr + e * n + tok, mask=in_tok, other=0) != 0
        dmean = tl.load(dmean_ptr + e * d + col, mask=in_col, other=0.0)
        du = g + tl.dot(dh, wd, input_precision=PREC, out_dtype=ACC)
        du += tl.where(chosen[:, None], dmean[None, :], 0.0)
        tl.store(du_ptr + at, du.to(du_ptr.dtype.element_ty), mask=inside)
        a1 = tl.load(alpha_ptr + e * 2).to(ACC)
        a2 = tl.load(alpha_ptr + e * 2 + 1).to(ACC)
        g_t = tl.trans(g)
        dwu1 += tl.dot(g_t, a1 * h, input_precision=PREC, out_dtype=ACC)
        dwu2 += tl.dot(g_t, a2 * h, input_precision=PREC, out_dtype=ACC)
        dbu1 += a1 * tl.sum(g, axis=0)
        dbu2 += a2 * tl.sum(g, axis=0)
        dwd_t += tl.dot(tl.trans(x), dh, input_precision=PREC, out_dtype=ACC)
    w_at = split * d * r + col[:, None] * r + rk[None, :]
    w_in = in_col[:, None] & in_rank[None, :]
    tl.store(dwu1_ptr + w_at, dwu1, mask=w_in)
    tl.store(dwu2_ptr + w_at, dwu2, mask=w_in)
    tl.store(dwd_ptr + split * r * d + rk[None, :] * d + col[:, None], dwd_t, mask=w_in)
    tl.store(dbu1_ptr + split * d + col, dbu1, mask=in_col)
    tl.store(dbu2_ptr + split * d + col, dbu2, mask=in_col)


# ---------------------------------------------------------------------- custom ops
@torch.library.custom_op("eas_kernels::pia_fused_forward", mutates_args=())
def pia_fused_forward(
    u: torch.Tensor,
    mask: torch.Tensor,
    down1_weight: torch.Tensor,
    down1_bias: torch.Tensor,
    down2_weight: torch.Tensor | None,
    down2_bias: torch.Tensor | None,
    up1_weight: torch.Tensor,
    up1_bias: torch.Tensor,
    up2_weight: torch.Tensor,
    up2_bias: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, c, α, ū)`` for contiguous inputs (see the module docstring)."""
    batch, n, d = u.shape
    r = down1_weight.shape[0]
    acc = _acc_dtype(u.dtype)
    mask_bytes = mask.view(torch.int8)

    def run(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tiles = triton.cdiv(n, cfg["BN"])
        projected = _alloc((batch, n, r), acc, u.device)
        sums = _alloc((batch, tiles, d), acc, u.device)
        _down_kernel[(batch, tiles)](u, mask_bytes, down1_weight, projected, sums, n, d, r, **cfg)
        count = mask.sum(1, keepdim=True)
        mean = (sums.sum(1) / count).to(u.dtype)
        c, alpha = state_from_mean(
            mean, down1_bias, down2_weight, down2_bias, router_weight, router_bias, temperature
        )
        c = c.contiguous()  # an op's outputs must not alias its inputs (the expanded bias)
        z = _alloc(tuple(u.shape), u.dtype, u.device)
        grid = (batch, tiles, triton.cdiv(d, cfg["BD"]))
        _up_kernel[grid](
            u, projected, c, alpha, up1_weight, up1_bias, up2_weight, up2_bias, z, n, d, r, **cfg
        )
        return z, c, alpha, mean

    return with_fitting_tiles("pia_fused_forward", u, r, run)


@pia_fused_forward.register_fake
def _(u, mask, down1_weight, *_args):
    batch, r = u.shape[0], down1_weight.shape[0]
    return (
        torch.empty_like(u),
        u.new_empty((batch, r)),
        u.new_empty((batch, 2)),
        u.new_empty((batch, u.shape[2])),
    )


def _weight_splits(u: torch.Tensor, column_tiles: int, jobs: int) -> int:
    """Token splits of the weight kernel: enough programs to fill the GPU (partials summed)."""
    if not u.is_cuda:
        return min(2, jobs)
    programs = 2 * torch.cuda.get_device_properties(u.device).multi_processor_count
    return max(1, min(jobs, triton.cdiv(programs, column_tiles)))


@torch.library.custom_op("eas_kernels::pia_fused_backward", mutates_args=())
def pia_fused_backward(
    grad_z: torch.Tensor,
    grad_c: torch.Tensor,
    grad_alpha: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    c: torch.Tensor,
    alpha: torch.Tensor,
    down1_weight: torch.Tensor,
    down1_bias: torch.Tensor,
    down2_weight: torch.Tensor | None,
    down2_bias: torch.Tensor | None,
    up1_weight: torch.Tensor,
    up1_bias: torch.Tensor,
    up2_weight: torch.Tensor,
    up2_bias: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    temperature: float,
) -> list[torch.Tensor]:
    """Gradients of ``u`` and of the ten parameters in :func:`pia_fused_forward`'s order
    (``down2``'s are empty tensors when it is absent), in fp32 sums rounded once."""
    batch, n, d = u.shape
    r = down1_weight.shape[0]
    acc = _acc_dtype(u.dtype)
    dev = u.device

    def run(cfg: dict) -> list[torch.Tensor]:
        tiles = triton.cdiv(n, cfg["BN"])
        hidden = _alloc((batch, n, r), acc, dev)
        d_hidden = _alloc((batch, n, r), acc, dev)
        d_alpha_tiles = _alloc((batch, tiles, 2), acc, dev)
        _bwd_token_kernel[(batch, tiles)](
            u, grad_z, down1_weight, c, alpha, up1_weight, up1_bias, up2_weight, up2_bias,
            hidden, d_hidden, d_alpha_tiles, n, d, r, **cfg,
        )  # fmt: skip

        # epilogue on (B, r), (B, 2) and (B, d) vectors
        d_c = d_hidden.sum(1) + grad_c.to(acc)
        d_alpha = d_alpha_tiles.sum(1) + grad_alpha.to(acc)
        mean_acc = mean.to(acc)
        soft = router_softmax(mean, router_weight, router_bias, temperature)
        d_logits = soft * (d_alpha - (soft * d_alpha).sum(-1, keepdim=True)) / temperature
        d_mean = d_logits @ router_weight.to(acc)
        if down2_weight is not None:
            d_mean = d_mean + d_c @ down2_weight.to(acc)
            grad_down2 = [
                (d_c.t() @ mean_acc).to(down2_weight.dtype),
                d_c.sum(0).to(down2_bias.dtype),
            ]
        else:
            grad_down2 = [u.new_empty(0), u.new_empty(0)]
        d_mean = (d_mean / mask.sum(1, keepdim=True)).contiguous()

        column_tiles = triton.cdiv(d, cfg["BD"])
        splits = _weight_splits(u, column_tiles, batch * tiles)
        grad_u = _alloc(tuple(u.shape), u.dtype, dev)
        d_up1 = _alloc((splits, d, r), acc, dev)
        d_up2 = _alloc((splits, d, r), acc, dev)
        d_up1_bias = _alloc((splits, d), acc, dev)
        d_up2_bias = _alloc((splits, d), acc, dev)
        d_down1 = _alloc((splits, r, d), acc, dev)
        _bwd_weight_kernel[(column_tiles, splits)](
            u, grad_z, mask.view(torch.int8), hidden, d_hidden, alpha, down1_weight, d_mean, grad_u,
            d_up1, d_up2, d_up1_bias, d_up2_bias, d_down1, batch, n, d, r, tiles, **cfg,
        )  # fmt: skip
        return [
            grad_u,
            d_down1.sum(0).to(down1_weight.dtype),
            d_c.sum(0).to(down1_bias.dtype),
            *grad_down2,
            d_up1.sum(0).to(up1_weight.dtype),
            d_up1_bias.sum(0).to(up1_bias.dtype),
            d_up2.sum(0).to(up2_weight.dtype),
            d_up2_bias.sum(0).to(up2_bias.dtype),
            (d_logits.t() @ mean_acc).to(router_weight.dtype),
            d_logits.sum(0).to(router_bias.dtype),
        ]

    return with_fitting_tiles("pia_fused_backward", u, r, run)


@pia_fused_backward.register_fake
def _(grad_z, grad_c, grad_alpha, u, mask, mean, c, alpha, *params_and_temperature):
    params = params_and_temperature[:-1]
    return [torch.empty_like(u)] + [
        u.new_empty(0) if p is None else torch.empty_like(p) for p in params
    ]


# ---------------------------------------------------------------------- autograd
class PIAFusedFunction(torch.autograd.Function):
    """``(z, c, α)`` with the fused backward; ``params`` as in :func:`pia_fused_forward`."""

    @staticmethod
    def forward(ctx, u, mask, temperature, *params):  # type: ignore[override]
        z, c, alpha, mean = pia_fused_forward(u, mask, *params, temperature)
        ctx.save_for_backward(u, mask, mean, c, alpha, *params)
        ctx.temperature = temperature
        return z, c, alpha

    @staticmethod
    def backward(ctx, grad_z, grad_c, grad_alpha):  # type: ignore[override]
        u, mask, mean, c, alpha, *params = ctx.saved_tensors
        grads = pia_fused_backward(
            grad_z.contiguous(), grad_c, grad_alpha, u, mask, mean, c, alpha, *params,
            ctx.temperature,
        )  # fmt: skip
        grad_params = [None if p is None else g for p, g in zip(params, grads[1:], strict=True)]
        return grads[0], None, None, *grad_params


def pia_parameters(pia: PIA) -> list[torch.Tensor | None]:
    """The ten parameters of ``pia`` in the custom ops' order (``down2``'s None if absent)."""
    down2 = pia.down2
    return [
        pia.down1.weight,
        pia.down1.bias,
        None if down2 is None else down2.weight,
        None if down2 is None else down2.bias,
        pia.up1.weight,
        pia.up1.bias,
        pia.up2.weight,
        pia.up2.bias,
        pia.router.weight,
        pia.router.bias,
    ]


def pia_adapt(
    pia: PIA, u: torch.Tensor, mask: torch.Tensor | None = None, *, mask_checked: bool = False
) -> tuple[torch.Tensor, PIAState]:
    """:meth:`PIA.adapt` with the fused kernels: ``(u + PIA(u), state)``, gradients attached.

    ``mask`` ``(B, n)`` bool selects the averaged tokens (None: all); an example whose row
    selects no token is refused with a ValueError before anything is computed, as
    :meth:`PIA.compute_state` refuses it.
    """
    pia._check_input(u)
    if mask is None:
        mask = torch.ones(u.shape[:2], dtype=torch.bool, device=u.device)
    elif not mask_checked:  # the runtime checks it once per model call
        check_token_mask(mask, "mask", shape=tuple(u.shape[:2]), device=u.device)
    params = [None if p is None else p.contiguous() for p in pia_parameters(pia)]
    z, c, alpha = PIAFusedFunction.apply(
        u.contiguous(), mask.contiguous(), pia.temperature, *params
    )
    return z, PIAState(c, alpha)
