"""Training cost of ``z = u + PIA(u)``: fused Triton kernels vs eager PyTorch, in one run.

Shape of issue 4: B = 4 examples, n = 512 tokens, d = 4096, bfloat16, prompt masks of
different lengths per example; the skipped layer's PIA (r = 32, averaged path) and the
kept layer's adapter (r = 8, ``token_mixing=False``). Variants, each forward + backward
(gradients of ``u`` and of every PIA parameter, ``∂L/∂z`` random):

* ``fused`` — :func:`eas_kernels.ops.pia_fused.pia_adapt` (the path ``PIA.adapt`` takes on
  CUDA tensors);
* ``eager`` — the package's PyTorch path (``PIA.compute_state`` then ``u + PIA(u)`` with
  the affine form, ``EAS_PIA_BACKEND=torch``), the baseline of the targets;
* ``eager_two_path`` — EAS_SPEC §1 literally, ``u + α₁ up1(H) + α₂ up2(H)`` (the public
  LaVIN/EAS style), for context.

Time: ``triton.testing.do_bench`` (median, 20 %/80 % quantiles; it flushes L2 between runs).
Memory: ``saved_bytes`` is what a forward leaves allocated besides its outputs (the
activations kept for backward), ``peak_bytes`` the ``max_memory_allocated`` of forward +
backward above the inputs. Targets (issue 4): ``fused`` at least 2x faster than ``eager``
and ``saved_bytes`` at most 0.5x; recorded as ``meets_targets``, not asserted. Needs a
CUDA GPU and triton; skipped otherwise.
``pytest benchmarks/test_pia_fused.py --benchmark-only``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.roofline import machine
from eas_kernels import PIA

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the fused PIA benchmark needs a CUDA GPU"
)

BATCH, TOKENS, DIM = 4, 512, 4096
PROMPT_LENGTHS = (512, 384, 200, 37)


def eager(pia: PIA, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    state = pia.compute_state(u, mask)
    return u + pia(u, state=state)


def eager_two_path(pia: PIA, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    state = pia.compute_state(u, mask)
    hidden = F.linear(u, pia.down1.weight) + state.c.unsqueeze(1)
    alpha = state.alpha.unsqueeze(-1).unsqueeze(-1)
    return u + alpha[:, 0] * pia.up1(hidden) + alpha[:, 1] * pia.up2(hidden)


def fused(pia: PIA, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from eas_kernels.ops.pia_fused import pia_adapt

    return pia_adapt(pia, u, mask)[0]


VARIANTS = {"fused": fused, "eager": eager, "eager_two_path": eager_two_path}


def memory(variant, pia, u, mask, grad) -> dict[str, int]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    z = variant(pia, u, mask)
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base - z.nbytes
    z.backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del z
    return {"saved_bytes": saved, "peak_bytes": peak}


@pytest.mark.parametrize("rank,token_mixing", [(32, True), (8, False)], ids=["skip", "kept"])
def test_pia_fused_training(benchmark, rank, token_mixing):
    triton = pytest.importorskip("triton")
    os.environ.pop("EAS_PIA_BACKEND", None)
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    pia = PIA(DIM, rank, token_mixing=token_mixing).to(device, dtype)
    with torch.no_grad():  # trained-looking: non-zero up projections
        for parameter in pia.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.02)
    u = torch.randn(BATCH, TOKENS, DIM, device=device, dtype=dtype, requires_grad=True)
    mask = torch.zeros(BATCH, TOKENS, dtype=torch.bool, device=device)
    for row, length in enumerate(PROMPT_LENGTHS):
        mask[row, :length] = True
    grad = torch.randn_like(u)
    leaves = [u, *pia.parameters()]

    with torch.no_grad():  # the fused kernels compute what the eager path computes
        torch.testing.assert_close(fused(pia, u, mask), eager(pia, u, mask), rtol=2e-2, atol=2e-2)

    results: dict[str, dict] = {}
    for name, variant in VARIANTS.items():

        def step(variant=variant) -> None:
            variant(pia, u, mask).backward(grad)

        median, low, high = triton.testing.do_bench(
            step, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves
        )
        for leaf in leaves:
            leaf.grad = None
        results[name] = {
            "ms": [round(low, 4), round(median, 4), round(high, 4)],
            **memory(variant, pia, u, mask, grad),
        }
        for leaf in leaves:
            leaf.grad = None

    speedup = results["eager"]["ms"][1] / results["fused"]["ms"][1]
    saved_ratio = results["fused"]["saved_bytes"] / max(1, results["eager"]["saved_bytes"])
    benchmark.extra_info.update(
        shape=dict(
            batch=BATCH, tokens=TOKENS, d=DIM, r=rank, token_mixing=token_mixing,
            prompt_lengths=PROMPT_LENGTHS, dtype=str(dtype),
        ),
        variants=results,
        speedup_fused_vs_eager=round(speedup, 3),
        saved_ratio_fused_vs_eager=round(saved_ratio, 3),
        peak_ratio_fused_vs_eager=round(
            results["fused"]["peak_bytes"] / max(1, results["eager"]["peak_bytes"]), 3
        ),
        targets=dict(speedup_at_least=2.0, saved_ratio_at_most=0.5),
        meets_targets=bool(speedup >= 2.0 and saved_ratio <= 0.5),
        triton=triton.__version__,
        cuda=torch.version.cuda,
        **machine(),
    )  # fmt: skip

    def fused_step() -> None:
        fused(pia, u, mask).backward(grad)
        for leaf in leaves:
            leaf.grad = None

    benchmark.pedantic(fused_step, rounds=20, warmup_rounds=3)
