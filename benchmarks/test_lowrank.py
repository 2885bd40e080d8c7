"""The batched low-rank path: per-token cost of W1/W3 with and without it, in one run.

LLaMA-7B shapes (d = 4096, out = 11008, r = 32), one decoded token for each of B = 8 or 32
examples with distinct PIA states, float32 and bfloat16 (EAS_SPEC §4):

* ``without`` — ``x W1ᵀ`` and ``x W3ᵀ`` (``F.linear``), the projections of the model without
  the PIA;
* ``with_path`` — the same plus the site's ``p = x W_d1ᵀ`` and, per target, the bound
  ``LowrankAdd(mix, F)(y, p)`` that the runtime's hooks call (the compiled kernel; the
  pytest-benchmark figure), which adds ``κ F`` with the state-free factors
  ``F = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2] Wᵀ``;
* ``with_checked_calls`` — the same through ``add_lowrank(y, p, mix, F)``, which checks
  every argument at every call.

``ratio_with_vs_without`` is the median of paired timings (target: ≤ 1.05). The build of
``F`` (once per batch of examples, whatever B) is timed too, against ``torch.matmul``.
``pytest benchmarks/test_lowrank.py --benchmark-only``. Nothing is asserted about speed.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from benchmarks.roofline import DEVICE, machine, timed
from eas_kernels.ops import LowrankAdd, add_lowrank, lowrank_factors, lowrank_factors_reference

DIM, OUT, RANK = 4096, 11008, 32
PAIRS = 40


class Layer:
    """W1, W3, one PIA's down projection and up basis, and B examples' states."""

    def __init__(self, batch: int, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(batch)

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return torch.randn(*shape, generator=generator) * scale

        def stored(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=DEVICE, dtype=dtype)

        self.weights = [stored(randn(OUT, DIM, scale=0.02)) for _ in range(2)]
        self.down = stored(randn(RANK, DIM, scale=0.05))
        self.basis = stored(randn(2 * RANK + 2, DIM, scale=0.05))  # [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]
        alpha = torch.softmax(randn(batch, 2), dim=-1)
        self.mix = torch.cat([alpha, randn(batch, RANK, scale=0.05)], dim=1).to(DEVICE)
        self.x = stored(randn(batch, 1, DIM))
        self.build_seconds = timed(self.build)
        self.reference_build_seconds = timed(
            lambda: lowrank_factors_reference(self.weights[0], self.basis)
        )

    def build(self) -> None:
        self.factors = [lowrank_factors(w, self.basis) for w in self.weights]
        self.adds = [LowrankAdd(self.mix, factor) for factor in self.factors]

    def without(self) -> None:
        for weight in self.weights:
            F.linear(self.x, weight)

    def with_path(self) -> None:
        projected = F.linear(self.x, self.down)
        for weight, add in zip(self.weights, self.adds, strict=True):
            add(F.linear(self.x, weight), projected)

    def with_checked_calls(self) -> None:
        projected = F.linear(self.x, self.down)
        for weight, factor in zip(self.weights, self.factors, strict=True):
            add_lowrank(F.linear(self.x, weight), projected, self.mix, factor)


def paired_ratio(fn, baseline, pairs: int = PAIRS) -> float:
    fn(), baseline()
    return statistics.median(timed(fn) / timed(baseline) for _ in range(pairs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [8, 32])
def test_lowrank_token(benchmark, batch, dtype):
    layer = Layer(batch, dtype)
    without = statistics.median(timed(layer.without) for _ in range(PAIRS))
    with_path = statistics.median(timed(layer.with_path) for _ in range(PAIRS))
    factor_bytes = sum(factor.nbytes for factor in layer.factors)
    benchmark.extra_info.update(
        shape=dict(d=DIM, out=OUT, r=RANK, batch=batch, tokens=1, targets=2, dtype=str(dtype)),
        ratio_with_vs_without=round(paired_ratio(layer.with_path, layer.without), 3),
        ratio_checked_calls_vs_without=round(
            paired_ratio(layer.with_checked_calls, layer.without), 3
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
