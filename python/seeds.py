"""The demo's comparison over several tuning seeds (issue 14), public API only.

One workload (``--workload-seed``: the vision tower, the projector's alignment and the data
split of ``eas_kernels.demo``), then for every tuning seed in ``--seeds`` each method of
``--methods`` trains 4 epochs from the same frozen model (lr 1e-3, batch 8, the projector
trains) and answers the test questions (greedy, exact answer tokens; EAS decodes with the
low-rank path, tested equal to merged):

* ``lavin``: LaVIN-style adapters before every MHA and FFN, nothing skipped;
* ``eas``: EAS with ``k`` skipped MHAs and today's default schedule and search
  (``TuningConfig()``: warm-up 1 epoch, greedy search on the warmed-up supernet,
  fine-tune 3);
* ``untuned``: the plan searched greedily on the *untuned* model (fresh PIAs output zero,
  so a skipped MHA is simply removed, as SLEB and FinerCut search a pretrained LLM), then
  fine-tuned 4 epochs: no warm-up, and the plan depends on no tuning seed.

``--max-grad-norm`` clips every method's gradient norm (``TuningConfig.max_grad_norm``);
each run records its largest gradient norm before clipping. Prints a table (accuracy per
seed, mean, min) and writes ``<out>/seeds.json``.
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

from eas_kernels import SkipPlan, current_plan, patch_lavin
from eas_kernels.demo.workload import WorkloadConfig, build_workload, evaluate_accuracy
from eas_kernels.search import Candidates, HeldOutScorer, estimator_class, run_search
from eas_kernels.tuning import EASTuner, TuningConfig, answer_loss, collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_experiments import log, write_report  # noqa: E402

METHODS = ("lavin", "eas", "untuned")
EPOCHS = 4


def options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--train", type=int, default=WorkloadConfig.train)
    parser.add_argument("--held-out", type=int, default=WorkloadConfig.held_out)
    parser.add_argument("--test", type=int, default=WorkloadConfig.test)
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--max-grad-norm",
        type=lambda text: None if text == "none" else float(text),
        default=TuningConfig.max_grad_norm,
        help="clip every method's gradient norm (TuningConfig.max_grad_norm; 'none': no "
        "clipping; default %(default)s)",
    )
    return parser.parse_args(argv)


def search_untuned(work: Any, k: int) -> dict[str, Any]:
    """The ``untuned`` method's plan: greedy on the untuned model (deterministic, so searched
    once for every tuning seed), with its passes and seconds."""
    layers = work.model.llm.n_layers
    searching = patch_lavin(copy.deepcopy(work.model), SkipPlan(layers, []), search="mha")
    scorer = HeldOutScorer(
        searching, collate(work.held_out, work.pad_id), Candidates("mha", layers), answer_loss
    )
    estimator = estimator_class("greedy")(layers, k)
    began = time.perf_counter()
    plan = run_search(estimator, scorer)
    return {
        "plan": list(plan),
        "search_passes": estimator.passes,
        "search_seconds": time.perf_counter() - began,
    }


def tune(
    method: str,
    work: Any,
    k: int,
    seed: int,
    max_grad_norm: float | None,
    untuned: dict[str, Any] | None,
) -> dict[str, Any]:
    """Tune one method from the workload's frozen model; its plan, accuracy and losses
    (``untuned``: :func:`search_untuned`'s result, for that method)."""
    layers = work.model.llm.n_layers
    fixed = TuningConfig(
        warmup_epochs=0,
        search_epochs=0,
        finetune_epochs=EPOCHS,
        seed=seed,
        max_grad_norm=max_grad_norm,
    )
    found: dict[str, Any] = {}
    if method == "lavin":
        model, config = patch_lavin(copy.deepcopy(work.model), SkipPlan(layers, [])), fixed
    elif method == "eas":
        model = patch_lavin(copy.deepcopy(work.model), SkipPlan(layers, []), search="mha")
        config = TuningConfig(k=k, seed=seed, max_grad_norm=max_grad_norm)
        assert config.warmup_epochs + config.search_epochs + config.finetune_epochs == EPOCHS
    else:
        assert untuned is not None
        found = {key: value for key, value in untuned.items() if key != "plan"}
        plan = SkipPlan(layers, untuned["plan"])
        model, config = patch_lavin(copy.deepcopy(work.model), plan), fixed
    model.projector.requires_grad_(True)
    tuned = EASTuner(model, work.train, work.held_out, config, pad_id=work.pad_id).run()
    accuracy = evaluate_accuracy(model, work, "eager" if method == "lavin" else "merge")
    return {
        "plan": list(current_plan(model).skipped),
        **accuracy,
        **found,
        "epoch_losses": [round(e["mean_loss"], 4) for e in tuned.epoch_losses()],
        "largest_grad_norm": max(step["grad_norm"] for step in tuned.history["steps"]),
        "tuning_seconds": tuned.seconds,
    }


def markdown(results: dict[str, dict[int, dict[str, Any]]], seeds: Sequence[int]) -> str:
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for method, runs in results.items():
        accuracies = [runs[s]["accuracy"] for s in seeds]
        cells = " | ".join(f"{a:.3f}" for a in accuracies)
        lines.append(
            f"| {method} | {cells} | {statistics.mean(accuracies):.3f} | {min(accuracies):.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = options(argv)
    started = time.perf_counter()
    config = WorkloadConfig(
        model=args.model,
        train=args.train,
        held_out=args.held_out,
        test=args.test,
        seed=args.workload_seed,
    )
    work = build_workload(config, cache_dir=args.out / "cache", log=log)
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    untuned = search_untuned(work, args.k) if "untuned" in args.methods else None
    for seed in args.seeds:
        for method in args.methods:
            results[method][seed] = tune(method, work, args.k, seed, args.max_grad_norm, untuned)
            run = results[method][seed]
            log(f"seed {seed} {method}: plan {run['plan']}, accuracy {run['accuracy']:.3f}")
    text = markdown(results, args.seeds)
    print(text, flush=True)
    body = {
        "results": {m: {str(s): r for s, r in runs.items()} for m, runs in results.items()},
        "markdown": text,
    }
    return write_report(args.out / "seeds.json", "seeds.py", argv, args, body, started)


if __name__ == "__main__":
    main()
