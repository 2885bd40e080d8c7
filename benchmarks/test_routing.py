"""What per-example routing (RoE, issue 19) costs: a training step as the router
temperature anneals, and decoding against each route's floor and against RoE's any-keeps
batch rule.

A LaVIN-layout model (d = 256, 8 layers, random weights) routed on every layer
(``RoutePlan(unit=...)``) with random, non-zero routers, shortcuts and kept adapters:

* **training step vs temperature** (``mha``): forward, backward and AdamW on a batch of 8
  × 48-token prompts under soft routes at τ = 1 and τ = 0.01, and under hard routes,
  interleaved. As τ anneals the losing soft weight underflows; a branch whose weight is
  below the dtype's epsilon is not computed (``RoutedForward``), which removed a
  subnormal slowdown (a scratch script before the fix: 794 ms at τ = 0.01 against 274 ms
  at τ = 1). The ratio τ = 0.01 / τ = 1 guards that fix.
* **batch 1** (``mha`` and ``block``): one prompt routed by a fixed route (3 of 8 units
  skipped, ``force_routes``) against the floor of that route (the unpatched model with
  those units removed), interleaved step by step (``tuning.evaluate.time_models``).
* **batch 8** (``mha`` and ``block``): 8 prompts with 8 different fixed routes (3 of 8
  units each), per-example skipping against the any-keeps rule (a unit runs for the whole
  batch when any example keeps it), and for ``mha`` per-example skipping with the skipped
  MHAs' PIAs run eagerly against the low-rank path (``RouteControl.lowrank``), decode
  steps rotating between the variants; at the short shape above (op-bound) and at a
  KV-bound one (``LONG_ARGS``: d = 512, full multi-head KV, 768-token prompts), where a
  skipped example's attention no longer reads its keys and values.

``pytest benchmarks/test_routing.py --benchmark-only``; ``extra_info`` holds the ratios,
shapes, device and versions. Nothing is asserted about speed.
"""

from __future__ import annotations

import copy
import datetime
import statistics
import time

import pytest
import torch

from benchmarks.roofline import machine, paired_medians, randomize_trainables
from eas_kernels import SkipPlan
from eas_kernels.models.lavin import ModelArgs, Transformer
from eas_kernels.routing import RoutePlan, force_routes, patch_routes, route_control, set_routing
from eas_kernels.tuning import Example, answer_loss, collate
from eas_kernels.tuning.evaluate import floor_model, paired_ratio, time_models

ARGS = dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=1000, multiple_of=64,
            max_seq_len=128, max_batch_size=8)  # fmt: skip
LAYERS, BATCH, PROMPT, ANSWER = 8, 8, 48, 2
# the batch-8 decode also at a KV-bound shape: 768-token prompts, full multi-head KV
LONG_ARGS = dict(ARGS, dim=512, n_kv_heads=8, max_seq_len=800)
LONG_PROMPT = 768
ROUTE = [False, True, False, False, True, False, True, False]  # 3 of 8 skipped
BATCH_ROUTES = [[(i + j) % LAYERS in (0, 3, 5) for j in range(LAYERS)] for i in range(BATCH)]


def base_model(args: dict = ARGS) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(**args)).eval()


def routed(unit: str, args: dict = ARGS) -> tuple[torch.nn.Module, Transformer]:
    base = base_model(args)
    model = patch_routes(copy.deepcopy(base), RoutePlan(LAYERS, unit=unit, ratio=0.3))
    randomize_trainables(model, seed=1)
    return model, base


def examples(prompt: int = PROMPT) -> list[Example]:
    generator = torch.Generator().manual_seed(2)
    return [
        Example(
            tuple(torch.randint(1, 900, (prompt,), generator=generator).tolist()),
            tuple(torch.randint(1, 900, (ANSWER,), generator=generator).tolist()),
        )
        for _ in range(BATCH)
    ]


def info(args: dict = ARGS, prompt: int = PROMPT, **entries: object) -> dict[str, object]:
    return dict(
        entries,
        shape=dict(args, batch=BATCH, prompt=prompt),
        date=datetime.date.today().isoformat(),
        **machine(),
    )


def test_training_step_as_the_temperature_anneals(benchmark):
    """Soft routes at τ = 1 and τ = 0.01, and hard routes: forward, backward, AdamW."""
    model, _ = routed("mha")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collate(examples(), 0)
    model.train()

    def step(mode: str, temperature: float):
        def run() -> None:
            set_routing(model, mode, temperature=temperature)
            loss = answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    variants = {
        "soft_tau_1": step("soft", 1.0),
        "soft_tau_0.01": step("soft", 0.01),
        "hard": step("hard", 1.0),
    }
    medians = benchmark.pedantic(
        lambda: paired_medians(variants, rounds=15), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        info(
            median_step_ms={k: round(1e3 * v, 2) for k, v in medians.items()},
            tau_0_01_over_tau_1=medians["soft_tau_0.01"] / medians["soft_tau_1"],
            hard_over_soft_tau_1=medians["hard"] / medians["soft_tau_1"],
        )
    )


@pytest.mark.parametrize("unit", ["mha", "block"])
def test_batch_one_decode_against_the_route_floor(benchmark, unit):
    model, base = routed(unit)
    set_routing(model, "hard")
    force_routes(model, torch.tensor([ROUTE]))
    skipped = [i for i, skip in enumerate(ROUTE) if skip]
    ffns = skipped if unit == "block" else ()
    floor = floor_model(base, SkipPlan(LAYERS, skipped, skipped_ffns=ffns))
    prompts = examples()[:4]
    timings = benchmark.pedantic(
        lambda: time_models({"routed": (model, None), "floor": (floor, None)}, prompts, 24),
        rounds=1,
        iterations=1,
    )
    ratio = paired_ratio(timings, "routed", "floor")
    benchmark.extra_info.update(
        info(
            unit=unit,
            route=skipped,
            routed_over_route_floor=ratio,
            ms_per_token={k: v["ms_per_token"] for k, v in timings.items()},
        )
    )


@pytest.mark.parametrize("shape", ["short", "long"])
@pytest.mark.parametrize("unit", ["mha", "block"])
def test_batch_eight_per_example_against_any_keeps(benchmark, unit, shape):
    args, prompt = (ARGS, PROMPT) if shape == "short" else (LONG_ARGS, LONG_PROMPT)
    model, _ = routed(unit, args)
    set_routing(model, "hard")
    force_routes(model, torch.tensor(BATCH_ROUTES))
    control = route_control(model)
    batch = collate([Example(e.prompt, ()) for e in examples(prompt)], 0)
    width = batch.tokens.shape[1]

    # (batch rule, low-rank path for skipped MHAs); block shortcuts have no low-rank path
    variants = {"per_example": ("per_example", True), "any_keeps": ("any_keeps", True)}
    if unit == "mha":
        variants["per_example_eager"] = ("per_example", False)

    @torch.no_grad()
    def decode(variant: str) -> list[float]:
        rule, control.lowrank = variants[variant]
        control.set_batch_rule(rule)
        logits = model(batch.tokens, start_pos=0, prompt_mask=batch.prompt_mask)[:, -1]
        steps = []
        for position in range(width, width + 12):
            began = time.perf_counter()
            logits = model(logits.argmax(-1, keepdim=True), start_pos=position)[:, -1]
            steps.append(time.perf_counter() - began)
        return steps

    def measure() -> dict[str, float]:
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        names = list(times)
        for round_ in range(9 if shape == "short" else 5):  # round 0 warms up; order rotates
            shift = round_ % len(names)
            for variant in names[shift:] + names[:shift]:
                steps = decode(variant)
                if round_:
                    times[variant].extend(steps)
        control.set_batch_rule("per_example")
        control.lowrank = True
        return {variant: statistics.median(values) for variant, values in times.items()}

    medians = benchmark.pedantic(measure, rounds=1, iterations=1)
    ratios = {"any_keeps_over_per_example": medians["any_keeps"] / medians["per_example"]}
    if unit == "mha":
        ratios["eager_over_lowrank"] = medians["per_example_eager"] / medians["per_example"]
    benchmark.extra_info.update(
        info(
            args,
            prompt,
            unit=unit,
            routes=[[i for i, s in enumerate(row) if s] for row in BATCH_ROUTES],
            ms_per_step={k: round(1e3 * v, 3) for k, v in medians.items()},
            **ratios,
        )
    )
