"""RoE in miniature (issue 19, ROE_SPEC §6): per-example routing against static EAS with
the same mean number of skipped units, LaVIN-style tuning and the floors, public API only.

On the SmolLM2 + easy-vqa workload of ``eas_kernels.demo`` (one workload seed), every
method trains ``--epochs`` (4) from the same frozen model (lr 1e-3, batch 8; the projector
trains):

* ``RoE <unit>`` for each ``--units`` (``mha``: dynamic EAS; ``block``: RoE as published),
  target ratio ``--ratio``: ``RouteTuner`` (``--pretune-epochs`` with every unit kept,
  then RoE's three stages in the rest); the routes of the test
  prompts give the realised ratio (mean, spread of skipped units per example, per layer);
* ``static <unit>``: EAS's default schedule and search (``greedy`` until 2026-12-02) with
  ``k`` = the RoE run's mean skipped units per example, rounded: the same mean skip count
  for every example;
* ``LaVIN-style``: adapters before every MHA, nothing skipped.

Accuracy: greedy answers on the test questions (batches of 8; the routed model's batches
are tested equal to batch 1). Decode speed, batch 1: for each timing prompt the routed
model against the floor of *that prompt's* route (the unpatched model with its skipped
units removed), interleaved step by step; the static models against their floors and the
unpatched model the same way. Batch 8: the routed model's decode steps with per-example
skipping against RoE's released any-keeps rule, interleaved. Writes ``<out>/roe.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eas_kernels import SkipPlan, current_plan, patch_lavin
from eas_kernels.demo.workload import WorkloadConfig, build_workload, evaluate_accuracy
from eas_kernels.routing import RoutePlan, patch_routes, route_control
from eas_kernels.tuning import EASTuner, TuningConfig
from eas_kernels.tuning.evaluate import floor_model, paired_ratio, route_matrix, time_models
from eas_kernels.tuning.route_trainer import RouteConfig, RouteTuner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_experiments import log, write_report  # noqa: E402

CANDIDATES = {"mha": "mha", "block": "block"}  # the static candidate set of each unit


def options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/roe"))
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--train", type=int, default=WorkloadConfig.train)
    parser.add_argument("--held-out", type=int, default=WorkloadConfig.held_out)
    parser.add_argument("--test", type=int, default=WorkloadConfig.test)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--units", nargs="+", choices=tuple(CANDIDATES), default=["mha", "block"])
    parser.add_argument("--epochs", type=int, default=4, help="every method's epochs")
    parser.add_argument(
        "--pretune-epochs",
        type=int,
        default=RouteConfig.pretune_epochs,
        help="of RoE's --epochs, those that train with every unit kept first",
    )
    parser.add_argument("--timing-prompts", type=int, default=6)
    parser.add_argument("--timing-tokens", type=int, default=16)
    parser.add_argument("--batch-steps", type=int, default=16, help="decode steps at batch 8")
    parser.add_argument("--batch-rounds", type=int, default=5, help="interleaved rounds")
    return parser.parse_args(argv)


def route_plan_of(row: torch.Tensor, layers: Sequence[int], unit: str, count: int) -> SkipPlan:
    """The static plan of one example's route: its skipped MHAs, or blocks."""
    skipped = [layer for layer, skip in zip(layers, row.tolist(), strict=True) if skip]
    return SkipPlan(count, skipped, skipped_ffns=skipped if unit == "block" else ())


def time_routed_batch_one(model, base, work, unit: str, args) -> dict[str, Any]:
    """Each timing prompt: the routed model against the floor of its own route."""
    plan = route_control(model).plan
    prompts = work.test[: args.timing_prompts]
    ratios, routed_ms, floor_ms = [], [], []
    for example in prompts:
        row = route_matrix(model, [example], pad_id=work.pad_id, batch_size=1)[0]
        floor = floor_model(base, route_plan_of(row, plan.layers, unit, plan.num_layers))
        timing = time_models(
            {"routed": (model, None), "floor": (floor, None)},
            [example, example],
            args.timing_tokens,
        )
        ratios.append(paired_ratio(timing, "routed", "floor")["median"])
        routed_ms.append(timing["routed"]["ms_per_token"])
        floor_ms.append(timing["floor"]["ms_per_token"])
    return {
        "routed_over_route_floor": {
            "median": statistics.median(ratios),
            "per_prompt": ratios,
        },
        "routed_ms_per_token": statistics.median(routed_ms),
        "route_floor_ms_per_token": statistics.median(floor_ms),
    }


@torch.no_grad()
def time_batch(model, work, args) -> dict[str, Any]:
    """Decode steps of one batch of 8 test prompts, per-example skipping against RoE's
    any-keeps rule, the rules alternating round by round (order rotated)."""
    control = route_control(model)
    examples = work.test[:8]
    width = max(len(e.prompt) for e in examples)
    tokens = torch.full((len(examples), width), work.pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for row, example in enumerate(examples):
        tokens[row, width - len(example.prompt) :] = torch.tensor(example.prompt)
        prompt_mask[row, width - len(example.prompt) :] = True
    images = torch.stack([e.image for e in examples])
    steps: dict[str, list[float]] = {"per_example": [], "any_keeps": []}
    rules = list(steps)
    for round_ in range(args.batch_rounds + 1):  # round 0 warms up
        for rule in rules[round_ % 2 :] + rules[: round_ % 2]:
            control.set_batch_rule(rule)
            logits = model(tokens, start_pos=0, prompt_mask=prompt_mask, images=images)[:, -1]
            position = width
            for _ in range(args.batch_steps):
                began = time.perf_counter()
                logits = model(logits.argmax(-1, keepdim=True), start_pos=position)[:, -1]
                if round_:
                    steps[rule].append((time.perf_counter() - began) * 1e3)
                position += 1
    control.set_batch_rule("per_example")
    medians = {rule: statistics.median(values) for rule, values in steps.items()}
    return {
        "ms_per_step": medians,
        "any_keeps_over_per_example": medians["any_keeps"] / medians["per_example"],
        "steps_timed": {rule: len(values) for rule, values in steps.items()},
    }


def routed(unit: str, work, args) -> tuple[Any, dict[str, Any]]:
    layers = work.model.llm.n_layers
    model = patch_routes(copy.deepcopy(work.model), RoutePlan(layers, unit=unit, ratio=args.ratio))
    model.projector.requires_grad_(True)
    config = RouteConfig(
        epochs=args.epochs - args.pretune_epochs, pretune_epochs=args.pretune_epochs, seed=args.seed
    )
    result = RouteTuner(model, work.train, config, pad_id=work.pad_id).run()
    accuracy = evaluate_accuracy(model, work, None)
    routes = route_matrix(model, work.test, pad_id=work.pad_id).float()
    per_example = routes.sum(dim=1)
    return model, {
        **accuracy,
        "realized_ratio": float(routes.mean()),
        "skipped_per_example": {
            "mean": float(per_example.mean()),
            "std": float(per_example.std()),
            "min": float(per_example.min()),
            "max": float(per_example.max()),
        },
        "per_layer": routes.mean(dim=0).tolist(),
        "rho_hat_last_epoch": statistics.mean(
            r["realized_ratio"] for r in result.history if r["epoch"] == args.epochs - 1
        ),
        "tuning_seconds": result.seconds,
    }


def static(unit: str, k: int, work, args) -> tuple[Any, dict[str, Any]]:
    layers = work.model.llm.n_layers
    model = patch_lavin(copy.deepcopy(work.model), SkipPlan(layers, []), search=CANDIDATES[unit])
    model.projector.requires_grad_(True)
    config = TuningConfig(k=k, candidates=CANDIDATES[unit], seed=args.seed)
    result = EASTuner(model, work.train, work.held_out, config, pad_id=work.pad_id).run()
    plan = current_plan(model)
    mode = "merge" if unit == "mha" else "eager"
    return model, {
        "k": k,
        "plan": plan.to_dict(),
        **evaluate_accuracy(model, work, mode),
        "tuning_seconds": result.seconds,
    }


def lavin(work, args) -> tuple[Any, dict[str, Any]]:
    layers = work.model.llm.n_layers
    model = patch_lavin(copy.deepcopy(work.model), SkipPlan(layers, []))
    model.projector.requires_grad_(True)
    config = TuningConfig(
        warmup_epochs=0, search_epochs=0, finetune_epochs=args.epochs, seed=args.seed
    )
    result = EASTuner(model, work.train, work.held_out, config, pad_id=work.pad_id).run()
    return model, {**evaluate_accuracy(model, work, "eager"), "tuning_seconds": result.seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = options(argv)
    started = time.perf_counter()
    config = WorkloadConfig(
        model=args.model, train=args.train, held_out=args.held_out, test=args.test, seed=args.seed
    )
    work = build_workload(config, cache_dir=args.out / "cache", log=log)
    base = work.model
    rows: dict[str, dict[str, Any]] = {}
    lavin_model, rows["LaVIN-style"] = lavin(work, args)
    log(f"LaVIN-style: accuracy {rows['LaVIN-style']['accuracy']:.3f}")
    timed_static: dict[str, tuple[Any, str | None]] = {"unpatched": (base, None)}
    timed_static["LaVIN-style"] = (lavin_model, "eager")
    for unit in args.units:
        model, row = routed(unit, work, args)
        row["batch_1"] = time_routed_batch_one(model, base, work, unit, args)
        row["batch_8"] = time_batch(model, work, args)
        rows[f"RoE {unit}"] = row
        log(
            f"RoE {unit}: accuracy {row['accuracy']:.3f}, realised ratio "
            f"{row['realized_ratio']:.3f}, {row['skipped_per_example']['mean']:.1f} ± "
            f"{row['skipped_per_example']['std']:.1f} units per example; batch 1 "
            f"{row['batch_1']['routed_over_route_floor']['median']:.3f}x its routes' floors; "
            f"batch 8 any-keeps / per-example {row['batch_8']['any_keeps_over_per_example']:.3f}"
        )
        k = max(1, round(row["skipped_per_example"]["mean"]))
        static_model, rows[f"static {unit} (k={k})"] = static(unit, k, work, args)
        plan = SkipPlan.from_dict(rows[f"static {unit} (k={k})"]["plan"])
        timed_static[f"static {unit} (k={k})"] = (
            static_model, "merge" if unit == "mha" else "eager",
        )  # fmt: skip
        timed_static[f"floor {unit} (k={k})"] = (floor_model(base, plan), None)
        log(f"static {unit} k={k}: accuracy {rows[f'static {unit} (k={k})']['accuracy']:.3f}")
    timings = time_models(timed_static, work.test[: args.timing_prompts], args.timing_tokens)
    speed = {name: paired_ratio(timings, "unpatched", name) for name in timed_static}
    lines = [
        "| method | accuracy | skipped units / example | decode, batch 1 |",
        "|---|---:|---:|---|",
    ]
    for name, row in rows.items():
        if name.startswith("RoE"):
            spread = row["skipped_per_example"]
            units = f"{spread['mean']:.1f} ± {spread['std']:.1f}"
            decode = (
                f"{row['batch_1']['routed_over_route_floor']['median']:.3f}× its routes' floors"
            )
        else:
            units = str(row.get("k", 0))
            ratio = speed.get(name)
            decode = "-" if ratio is None else f"{ratio['median']:.3f}× faster than unpatched"
        lines.append(f"| {name} | {row['accuracy']:.3f} | {units} | {decode} |")
    text = "\n".join(lines)
    print(text, flush=True)
    body = {"rows": rows, "timings": timings, "speedup_over_unpatched": speed, "markdown": text}
    return write_report(args.out / "roe.json", "roe_miniature.py", argv, args, body, started)


if __name__ == "__main__":
    main()
