"""The batched low-rank path: per-token cost of W1/W3 with and without it, in one run.

LLaMA-7B shapes (d = 4096, out = 11008, r = 32), one decoded token for each of B = 8 or 32
examples with distinct PIA states, float32 and bfloat16 (EAS_SPEC §4):

* ``without`` — ``x W1ᵀ`` and ``x W3ᵀ`` (``F.linear``), the projections of the model without
  the PIA;
* ``with_path`` — the same plus the site's ``p = x W_d1ᵀ`` and, per target,
  ``add_lowrank(y, p, M_e, g_e)`` (the compiled kernel; the pytest-benchmark figure);
* ``shared_factor_prototype`` — a PyTorch prototype of a variant the kernels do not
  implement: ``M_e = α₁ (W_u1ᵀ Wᵀ) + α₂ (W_u2ᵀ Wᵀ)``, so the two ``r × out`` factors are
  shared by all examples and only ``[α₁ p, α₂ p]`` (``B × 2r``) is per example.

``ratio_with_vs_without`` is the median of paired timings (target: ≤ 1.05). The build of
``M_e, g_e`` (once per batch of examples) is timed too, against ``torch.matmul``.
``pytest benchmarks/test_lowrank.py --benchmark-only``. Nothing is asserted about speed.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from benchmarks.roofline import DEVICE, machine, timed
from eas_kernels.ops import add_lowrank, lowrank_factors, lowrank_factors_reference

DIM, OUT, RANK = 4096, 11008, 32
PAIRS = 40


class Layer:
    """W1, W3, one PIA with two up projections, and B examples' states."""

    def __init__(self, batch: int, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(batch)

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            sample = torch.randn(*shape, generator=generator) * scale
            return sample.to(device=DEVICE, dtype=dtype)

        self.weights = [randn(OUT, DIM, scale=0.02) for _ in range(2)]
        self.down = randn(RANK, DIM, scale=0.05)
        ups = [randn(RANK, DIM, scale=0.05) for _ in range(2)]  # W_u1ᵀ, W_u2ᵀ
        self.alpha = torch.softmax(randn(batch, 2), dim=-1)
        self.up_mix = self.alpha[:, 0, None, None] * ups[0] + self.alpha[:, 1, None, None] * ups[1]
        self.beta = randn(batch, DIM, scale=0.05)
        self.x = randn(batch, 1, DIM)
        self.build_seconds = timed(self.build)
        self.reference_build_seconds = timed(
            lambda: lowrank_factors_reference(self.weights[0], self.up_mix, self.beta)
        )
        # the prototype's shared factors: [W_u1ᵀ Wᵀ; W_u2ᵀ Wᵀ] (2r × out) per target
        self.shared = [torch.cat([u @ w.t() for u in ups]) for w in self.weights]

    def build(self) -> None:
        self.factors = [lowrank_factors(w, self.up_mix, self.beta) for w in self.weights]

    def without(self) -> None:
        for weight in self.weights:
            F.linear(self.x, weight)

    def with_path(self) -> None:
        projected = F.linear(self.x, self.down)
        for weight, (factor, offset) in zip(self.weights, self.factors, strict=True):
            add_lowrank(F.linear(self.x, weight), projected, factor, offset)

    def shared_factor_prototype(self) -> None:
        projected = F.linear(self.x, self.down)[:, 0]  # (B, r)
        mixed = torch.cat([self.alpha[:, :1] * projected, self.alpha[:, 1:] * projected], dim=1)
        for weight, shared, (_, offset) in zip(
            self.weights, self.shared, self.factors, strict=True
        ):
            y = F.linear(self.x, weight)[:, 0]
            torch.addmm(y + offset.to(y.dtype), mixed, shared)


def paired_ratio(fn, baseline, pairs: int = PAIRS) -> float:
    fn(), baseline()
    return statistics.median(timed(fn) / timed(baseline) for _ in range(pairs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [8, 32])
def test_lowrank_token(benchmark, batch, dtype):
    layer = Layer(batch, dtype)
    without = statistics.median(timed(layer.without) for _ in range(PAIRS))
    with_path = statistics.median(timed(layer.with_path) for _ in range(PAIRS))
    factor_bytes = sum(f.nbytes + g.nbytes for f, g in layer.factors)
    benchmark.extra_info.update(
        shape=dict(d=DIM, out=OUT, r=RANK, batch=batch, tokens=1, targets=2, dtype=str(dtype)),
        ratio_with_vs_without=round(paired_ratio(layer.with_path, layer.without), 3),
        ratio_shared_factor_prototype=round(
            paired_ratio(layer.shared_factor_prototype, layer.without), 3
        ),
        median_ms=dict(without=round(without * 1e3, 3), with_path=round(with_path * 1e3, 3)),
        factor_build_ms=dict(
            native_per_target=round(layer.build_seconds / 2 * 1e3, 1),
            torch_matmul_per_target=round(layer.reference_build_seconds * 1e3, 1),
        ),
        factor_bytes=factor_bytes,
        **machine(),
    )
    benchmark.pedantic(layer.with_path, rounds=PAIRS, warmup_rounds=2)
