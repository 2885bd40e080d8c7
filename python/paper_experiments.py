"""The shared harness of the paper-table recipes (``python/table*.py``), public API only.

Workload (``eas_kernels.demo.workload``): the real SmolLM2-135M-Instruct, frozen, in a
LaVIN-style multimodal model (a small CNN vision tower trained from scratch on easy-vqa's
colour and shape labels, then frozen; a projector aligned with the LLM's colour and shape
words, then trained with the adapters), on easy-vqa with colour, shape and yes/no questions
in equal numbers: 400 training, 16 held-out (the search's scoring batch) and 510 test
questions (the :class:`~eas_kernels.demo.workload.WorkloadConfig` defaults).

A :class:`Method` is one row of a table. :func:`run_method` tunes it on a fresh copy of the
frozen model and caches the result under ``<out>/methods/<hash>/`` (``result.json`` and
the tuned checkpoint), keyed by everything that determines the tuned model, so the tables
share rows (Table 1's EAS-4/8/12 are Table 3's MHA rows and Table 5's k sweep; Table 4's
last two rows are one model, eager and merged) and a rerun only re-times.

Tuning (``eas_kernels.tuning.EASTuner``, AdamW, batch 8, lr 1e-3, as ``eas-kernels
demo``):

* a method that searches: warm-up 1 epoch (random skip sets growing from 1 to k arms),
  then the default estimator's rounds back to back on the held-out batch (within its
  default budget: ``portfolio`` since 2026-12-02, when Tables 1, 3 and 5 in
  ``benchmarks/RESULTS.md`` were re-run with it; their earlier runs used ``greedy``), then
  fine-tuning of the chosen plan for 3 epochs (4 epochs in all);
* a method with a fixed plan (LaVIN-style, the ablations): 4 epochs of fine-tuning.

Accuracy (:func:`~eas_kernels.demo.workload.evaluate_accuracy`): greedy generation of
every test question, exact answer tokens, overall and per question type, with the
method's decode mode (``merge`` for EAS, decoded with the low-rank path in batches of 8,
tested equal to it; ``eager`` for LaVIN-style and DAS, whose adapters stay).

Decode speed (:func:`time_rows`): milliseconds per decode step at batch 1, median over
the steps after each prompt's first, 8 test prompts, all models of a table interleaved
step by step; each plan's *floor* (the unpatched model with the same parts deleted and no
adapter) is timed beside it, and ratios are medians of call-by-call ratios.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import eas_kernels
from eas_kernels import SkipPlan, current_plan, patch_lavin
from eas_kernels.demo.workload import (
    Workload,
    WorkloadConfig,
    build_workload,
    evaluate_accuracy,
    load_tuned,
    save_tuned,
)
from eas_kernels.tuning import EASTuner, TuningConfig
from eas_kernels.tuning.evaluate import (
    floor_model,
    paired_ratio,
    pretrained_parameter_count,
    time_models,
    tuned_parameter_count,
)
from eas_kernels.tuning.plots import plot_plan

EPOCHS = 4  # every method trains 4 epochs in all, as in `eas-kernels demo`
SEARCH = {"warmup_epochs": 1, "search_epochs": 0, "finetune_epochs": 3}
TRAINING = {"batch_size": 8, "lr": 1e-3, "eval_every": 2}


@dataclass(frozen=True)
class Method:
    """One row of a table.

    ``candidates`` names the searched candidate set (``"mha"``, ``"ffn"``,
    ``"mha_or_ffn"``, ``"block"``) with ``k`` arms skipped; ``None`` trains the fixed plan
    ``SkipPlan(L, skipped, **plan_options)`` (``skipped=()``: LaVIN-style); with
    ``plan_from``, the fixed plan is the skip set that the earlier row of that name
    searched (a diagnostic: its plan with a fixed-plan method's fine-tuning budget).
    ``mode`` is the decode mode it is evaluated and timed with.
    """

    name: str
    candidates: str | None = None
    k: int = 0
    skipped: tuple[int, ...] = ()
    plan_options: tuple[tuple[str, Any], ...] = ()
    mode: str = "merge"
    plan_from: str | None = None

    def plan(self, num_layers: int) -> SkipPlan:
        return SkipPlan(num_layers, list(self.skipped), **dict(self.plan_options))


@dataclass
class Row:
    """A tuned method: its model and what :func:`run_method` measured."""

    method: Method
    model: nn.Module
    result: dict[str, Any] = field(default_factory=dict)


def options(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("runs/paper"), help="shared folder")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument(
        "--train", type=int, default=WorkloadConfig.train, help="training questions"
    )
    parser.add_argument("--test", type=int, default=WorkloadConfig.test, help="test questions")
    parser.add_argument(
        "--held-out", type=int, default=WorkloadConfig.held_out, help="the search's batch"
    )
    parser.add_argument("--timing-prompts", type=int, default=8)
    parser.add_argument("--timing-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def workload(args: argparse.Namespace) -> Workload:
    return build_workload(workload_config(args), cache_dir=args.out / "cache", log=log)


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        model=args.model, train=args.train, held_out=args.held_out, test=args.test, seed=args.seed
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _config(method: Method, seed: int) -> TuningConfig:
    if method.candidates is None:
        return TuningConfig(
            warmup_epochs=0, search_epochs=0, finetune_epochs=EPOCHS, seed=seed, **TRAINING
        )
    return TuningConfig(k=method.k, candidates=method.candidates, seed=seed, **SEARCH, **TRAINING)


def _key(method: Method, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that determines a tuned model (not its name or decode mode)."""
    return {
        "candidates": method.candidates,
        "k": method.k,
        "skipped": list(method.skipped),
        "plan_options": dict(method.plan_options),
        "workload": asdict(workload_config(args)),
        "tuning": asdict(_config(method, args.seed)),
        "eas_kernels": eas_kernels.__version__,
    }


def run_method(method: Method, work: Workload, args: argparse.Namespace) -> Row:
    """Tune ``method`` (or load its cached tuning) and measure its test accuracy in its
    decode mode (cached per mode)."""
    key = _key(method, args)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = args.out / "methods" / digest
    result_file = folder / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if result.get("key") == key:
        log(f"{method.name}: tuned already ({folder})")
        model = load_tuned(work.model, folder / "tuned")
    else:
        result = {"key": key, **_tune(method, work, args, folder)}
        model = load_tuned(work.model, folder / "tuned")
        plan = current_plan(model)
        result.update(
            plan=plan.to_dict(),
            skipped_mhas=list(plan.skipped),
            skipped_ffns=list(plan.skipped_ffns),
            trainable_params=tuned_parameter_count(model),
            accuracy_by_mode={},
        )
    if method.mode not in result["accuracy_by_mode"]:
        began = time.perf_counter()
        accuracy = evaluate_accuracy(model, work, method.mode)
        result["accuracy_by_mode"][method.mode] = accuracy
        parts = ", ".join(f"{k} {v:.3f}" for k, v in accuracy["accuracy_by_type"].items())
        log(
            f"{method.name}: accuracy {accuracy['accuracy']:.3f} ({parts}; {method.mode}, "
            f"{time.perf_counter() - began:.0f} s)"
        )
        result_file.write_text(json.dumps(result, indent=2) + "\n")  # the folder exists
    summary = {k: v for k, v in result.items() if k not in ("key", "accuracy_by_mode")}
    summary.update(
        name=method.name,
        mode=method.mode,
        folder=str(folder),
        accuracy=result["accuracy_by_mode"][method.mode]["accuracy"],
        accuracy_by_type=result["accuracy_by_mode"][method.mode]["accuracy_by_type"],
    )
    return Row(method, model, summary)


def _tune(method: Method, work: Workload, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    layers = work.model.llm.n_layers
    base = copy.deepcopy(work.model)
    search = method.candidates if method.candidates is not None else False
    model = patch_lavin(base, method.plan(layers), search=search)
    model.projector.requires_grad_(True)  # the projector trains with the adapters
    tuner = EASTuner(
        model,
        work.train,
        work.held_out,
        _config(method, args.seed),
        pad_id=work.pad_id,
        run_dir=folder / "tuner",
    )

    def progress(record: dict[str, Any]) -> None:
        if record["step"] % 25 == 0:
            log(
                f"{method.name}: {record['phase']} step {record['step']}, loss {record['loss']:.3f}"
            )

    tuner.progress = progress
    how = f"search over {method.candidates}" if method.candidates else "fixed plan"
    log(f"{method.name}: tuning ({how})")
    tuned = tuner.run()
    save_tuned(model, folder / "tuned", active_only=True)
    log(f"{method.name}: plan {current_plan(model)} ({tuned.seconds:.0f} s)")
    result: dict[str, Any] = {
        "arms": list(tuned.arms),
        "scores": tuned.scores,
        "epoch_losses": tuned.epoch_losses(),
        "tuning_seconds": tuned.seconds,
    }
    if method.candidates is not None:
        names = eas_kernels.search.Candidates(method.candidates, layers).arm_names()
        result["plan_plot"] = str(plot_plan(tuned.scores, tuned.arms, names, folder / "plan.png"))
    return result


def time_rows(rows: Sequence[Row], work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved decode timing of every row, the unpatched model and each plan's floor.

    Adds ``ms_per_token`` and ``floor_ms_per_token`` (medians over decode calls),
    ``ratio_vs_floor`` and ``speedup_vs_unpatched`` (medians of the call-by-call ratios,
    :func:`~eas_kernels.tuning.evaluate.paired_ratio`, which a change of the machine's
    load cancels out of) to each row's result and returns the raw timings.
    """
    models: dict[str, tuple[nn.Module, str | None]] = {"unpatched": (work.model, None)}
    floors: dict[str, str] = {}
    for row in rows:
        models[row.method.name] = (row.model, row.method.mode)
        plan = current_plan(row.model)
        floor_name = f"floor of {row.method.name}"
        if plan.skipped or plan.skipped_ffns:
            models[floor_name] = (floor_model(work.model, plan), None)
            floors[row.method.name] = floor_name
    log(
        f"timing {len(models)} models: {args.timing_prompts} prompts x "
        f"{args.timing_tokens} tokens, interleaved step by step"
    )
    timings = time_models(models, work.test[: args.timing_prompts], args.timing_tokens)

    for row in rows:
        name = row.method.name
        floor_name = floors.get(name, "unpatched")
        row.result.update(
            ms_per_token=timings[name]["ms_per_token"],
            floor_ms_per_token=timings[floor_name]["ms_per_token"],
            ratio_vs_floor=paired_ratio(timings, name, floor_name)["median"],
            speedup_vs_unpatched=1 / paired_ratio(timings, name, "unpatched")["median"],
        )
    return timings


def environment() -> dict[str, Any]:
    return {
        "eas_kernels": eas_kernels.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def write_report(
    path: Path,
    script: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    body: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """``body`` with the command line, the parsed ``args``, the environment, the date and
    the seconds since ``started``, written as JSON to ``path`` (its folder created) and
    returned."""
    report = {
        "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **body,
        "environment": environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"report {path} ({report['seconds']:.0f} s)")
    return report


def print_table(title: str, rows: Sequence[Row], work: Workload, unpatched_ms: float) -> str:
    total = pretrained_parameter_count(work.model.llm)
    lines = [
        title,
        "",
        "| method | skipped | tuned params | test acc | colour / shape / yes-no | ms/token "
        "| vs floor | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| unpatched (no tuning) | – | – | – | – | {unpatched_ms:.2f} | – | 1.00× |",
    ]
    for row in rows:
        r = row.result
        skipped = (
            ", ".join(
                part
                for part in (
                    f"MHA {r['skipped_mhas']}" if r["skipped_mhas"] else "",
                    f"FFN {r['skipped_ffns']}" if r["skipped_ffns"] else "",
                )
                if part
            )
            or "–"
        )
        lines.append(
            f"| {row.method.name} | {skipped} | {r['trainable_params']:,} "
            f"({100 * r['trainable_params'] / total:.2f} %) | {r['accuracy']:.3f} | "
            f"{' / '.join(f'{v:.3f}' for v in r['accuracy_by_type'].values())} | "
            f"{r['ms_per_token']:.2f} | {r['ratio_vs_floor']:.2f} | "
            f"{r['speedup_vs_unpatched']:.2f}× |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot_rows(title: str, rows: Sequence[Row], unpatched_ms: float, path: Path) -> Path:
    """Accuracy (bars) and ms/token against each plan's floor, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.method.name for row in rows]
    positions = range(len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) + 4), 3.8))
    left.bar(positions, [row.result["accuracy"] for row in rows], color="tab:blue")
    left.set_ylabel("test accuracy (greedy, exact)")
    left.set_ylim(0, 1)
    right.bar(
        positions, [row.result["ms_per_token"] for row in rows], color="tab:orange", label="method"
    )
    right.scatter(
        positions,
        [row.result["floor_ms_per_token"] for row in rows],
        color="black",
        marker="_",
        s=400,
        label="floor (same parts deleted, no adapter)",
        zorder=3,
    )
    right.axhline(unpatched_ms, color="grey", linestyle="--", label="unpatched")
    right.set_ylabel("ms per decoded token (batch 1)")
    right.legend(fontsize=7, loc="lower right")
    for axes in (left, right):
        axes.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_table(
    name: str,
    title: str,
    methods: Sequence[Method],
    argv: Sequence[str] | None,
    paper: dict[str, Any],
) -> dict[str, Any]:
    """Tune (or load) every method, time them together, write ``<out>/<name>.json|.png``."""
    args = options(title, argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    work = workload(args)
    rows: list[Row] = []
    for method in methods:
        if method.plan_from is not None:
            source = next(row for row in rows if row.method.name == method.plan_from)
            searched = tuple(source.result["skipped_mhas"])
            method = dataclasses.replace(method, skipped=searched, plan_from=None)
        rows.append(run_method(method, work, args))
    timings = time_rows(rows, work, args)
    unpatched_ms = timings["unpatched"]["ms_per_token"]
    table = print_table(title, rows, work, unpatched_ms)
    plot = plot_rows(title, rows, unpatched_ms, args.out / f"{name}.png")
    body = {
        "table": name,
        "title": title,
        "rows": [
            {k: v for k, v in row.result.items() if k != "key"} | {"mode": row.method.mode}
            for row in rows
        ],
        "unpatched_ms_per_token": unpatched_ms,
        "timings": timings,
        "pretrained_params": pretrained_parameter_count(work.model.llm),
        "workload": work.info,
        "markdown": table,
        "plot": str(plot),
        "paper": paper,
    }
    script = os.path.basename(sys.argv[0])
    return write_report(args.out / f"{name}.json", script, argv, args, body, started)
