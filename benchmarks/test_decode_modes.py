"""Decode-step cost of each EAS variant against its floor, in one run.

Variants, batch 1, one decode step after a prefill of ``PROMPT`` tokens, on a 32-layer
LLaMA of the LaVIN layout (scaled-down width on CPU, LLaMA-7B width on a GPU):

* ``unpatched`` — the pretrained model;
* ``floor`` — the unpatched model with the same ``K`` MHAs deleted and no adapter at all;
* ``lavin_style`` — rank-8 router adapters before every MHA, not merged (eager);
* ``eas_eager`` / ``eas_merge`` / ``eas_lowrank`` — ``K`` MHAs skipped, PIAs applied eagerly,
  merged into the weights, or through the low-rank path.

``pytest benchmarks/ --benchmark-only``. Each test times its variant with pytest-benchmark
and, in the same run, interleaves its variant with the floor to record
``ratio_vs_floor`` (median of paired timings) in ``extra_info``, with shapes, device and
versions. ``test_merge_break_even`` times a prefill plus the first decode step (which
writes the PIAs into the weights) merged and eager, and one decode step of each, and
records after how many decoded tokens merging has paid for itself. Nothing is asserted
about speed.
"""

from __future__ import annotations

import copy
import platform
import statistics

import pytest
import torch

import eas_kernels
from benchmarks.roofline import (
    FixedPositionDecoder,
    median_ratio,
    paired_times,
    randomize_trainables,
    timed,
)
from eas_kernels.models.lavin import ModelArgs, Transformer
from eas_kernels.tuning.evaluate import floor_model

K = 8
PROMPT = 96
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ARGS = (
    ModelArgs(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=512, max_batch_size=1
    )
    if DEVICE == "cuda"
    else ModelArgs(
        dim=256, n_layers=32, n_heads=8, vocab_size=4096, max_seq_len=512, max_batch_size=1
    )
)
SKIPPED = list(range(ARGS.n_layers - K - 1, ARGS.n_layers - 1))  # deep layers (paper Fig. 6)


@pytest.fixture(scope="module")
def variants() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = Transformer(ARGS).to(device=DEVICE, dtype=DTYPE).eval()
    built: dict[str, torch.nn.Module] = {"unpatched": base}
    built["floor"] = floor_model(base, eas_kernels.SkipPlan(ARGS.n_layers, SKIPPED))
    lavin = eas_kernels.patch_lavin(copy.deepcopy(base), eas_kernels.SkipPlan(ARGS.n_layers, []))
    randomize_trainables(lavin, 0)
    built["lavin_style"] = eas_kernels.reparameterize(lavin, "eager")
    for mode in ("eager", "merge", "lowrank"):
        model = copy.deepcopy(base)
        eas_kernels.patch_lavin(model, eas_kernels.SkipPlan(ARGS.n_layers, SKIPPED))
        randomize_trainables(model, 0)
        built[f"eas_{mode}"] = eas_kernels.reparameterize(model, mode)
    return built


def decoder(model: torch.nn.Module) -> FixedPositionDecoder:
    prompt = torch.randint(1, ARGS.vocab_size, (1, PROMPT), device=DEVICE)
    return FixedPositionDecoder(model, prompt)


def _environment() -> dict[str, object]:
    return dict(
        shape=dict(
            dim=ARGS.dim,
            n_layers=ARGS.n_layers,
            n_heads=ARGS.n_heads,
            vocab=ARGS.vocab_size,
            prompt=PROMPT,
            batch=1,
            dtype=str(DTYPE),
        ),
        device=torch.cuda.get_device_name()
        if DEVICE == "cuda"
        else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        eas_kernels=eas_kernels.__version__,
    )


@pytest.mark.parametrize(
    "name", ["unpatched", "floor", "lavin_style", "eas_eager", "eas_merge", "eas_lowrank"]
)
def test_decode_step(benchmark, variants, name):
    step, floor_step = decoder(variants[name]).step, decoder(variants["floor"]).step
    benchmark.extra_info.update(
        variant=name,
        skipped=SKIPPED,
        **_environment(),
        ratio_vs_floor=round(median_ratio(*paired_times(step, floor_step, 30)), 4),
    )
    benchmark.pedantic(step, rounds=60, warmup_rounds=5, iterations=1)


def _median_seconds(function, rounds: int) -> float:
    return statistics.median(timed(function) for _ in range(rounds))


def test_merge_break_even(benchmark, variants):
    """Prefill + first decode step (the merge happens there) vs eager, and the per-token
    saving of merged decoding: ``break_even_tokens = extra start-up / saving per token``."""
    prompt = torch.randint(1, ARGS.vocab_size, (1, PROMPT), device=DEVICE)
    token = torch.tensor([[7]], device=DEVICE)

    def start(model: torch.nn.Module):
        @torch.no_grad()
        def run() -> None:
            model(prompt, start_pos=0)  # a new prefill first restores the merged weights
            model(token, start_pos=PROMPT)

        return run

    merged, eager = variants["eas_merge"], variants["eas_eager"]
    start_merged = _median_seconds(start(merged), 15)
    start_eager = _median_seconds(start(eager), 15)
    step_merged = _median_seconds(decoder(merged).step, 40)
    step_eager = _median_seconds(decoder(eager).step, 40)
    saving = step_eager - step_merged
    extra = start_merged - start_eager
    benchmark.extra_info.update(
        skipped=SKIPPED,
        **_environment(),
        prefill_and_first_step_merged_ms=round(1e3 * start_merged, 3),
        prefill_and_first_step_eager_ms=round(1e3 * start_eager, 3),
        decode_step_merged_ms=round(1e3 * step_merged, 3),
        decode_step_eager_ms=round(1e3 * step_eager, 3),
        break_even_tokens=round(extra / saving, 2) if saving > 0 else None,
    )
    benchmark.pedantic(start(merged), rounds=15, warmup_rounds=2, iterations=1)
