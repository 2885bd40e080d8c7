"""How good are the plans each search estimator finds? (issue 14), public API only.

For each seed and each k, on the SmolLM2-135M + easy-vqa miniature of the paper tables
(``paper_experiments``' workload), or with ``--task iris`` on the quick start's text task
(SmolLM2-135M answering the species of scikit-learn's iris flowers written as text:
``--search-batch`` training flowers are the search batch, the 45 test flowers the
validation set):

1. **Warm-up** once: the searching model (PIAs in every layer, projector trainable) trains
   ``--warmup-epochs`` (1) on random skip sets of k MHAs (``--ramp``: growing from 1 to k),
   as a tuning run's warm-up does. Every estimator then works on this same supernet.
2. **Search**: every estimator of ``eas_kernels.search.ESTIMATORS`` runs to its end on the
   *search batch* (``--search-batch`` held-out questions, eval mode) with the same budget
   of held-out passes (``--budget``; ``loo`` and ``cosine`` need fewer and use fewer).
   Its plan, passes and seconds are recorded; ``stable``'s probe of the untuned model is
   measured before the warm-up, as a tuning run does (``--estimators stable@1`` runs it
   with ``tie_se`` 1; ``--tie-se`` sets the default). (In a tuning run the bandits' rounds are
   interleaved with training steps; here all rounds score the frozen warmed-up supernet,
   so that only the estimator differs.) An ``untuned:NAME`` entry runs ``NAME`` on the
   *untuned* model instead, before the warm-up (skipping an MHA there removes it: the
   PIAs' up projections are still zero), so its plan is the same for every tuning seed
   (for every estimator but the two bandits, which draw skip sets from the seed); it is
   judged like the others, on each seed's warmed-up supernet, and searched again in each
   cell (for the bandits the seed matters).
3. **Baselines**: every contiguous window of k MHAs in the deeper half of the model (the
   best one by validation loss: an oracle choice, as the paper's released fine-tuning
   scripts fix deep windows) and
   ``--random`` uniformly random plans.
4. **Judged on data the search never saw**: every plan's answer loss on the *validation*
   set (``--validation`` other held-out questions) with the supernet's PIAs; the share of
   random plans each plan beats; and the rank correlation between search-batch and
   validation losses over the random plans (how well one search batch separates plans).
5. Optionally (``--finetune-seeds``, for ``--finetune-k``): each estimator's plan, the
   best window and the best random plan fine-tune 1 epoch from the warmed-up supernet;
   validation loss after it and test accuracy (greedy, batch 1, exact answer tokens).

Seed stability: Jaccard overlap of each estimator's plans across seeds (mean over pairs),
and, with one shared workload, *plan transfer*: every seed's plan judged on every seed's
warmed-up supernet (is a plan good only for the warm-up that found it?).
By default every seed tunes the same workload (``--workload-seed 0``: one vision tower,
projector and data split), so that the seeds vary the warm-up and the search only;
``--workload-seed -1`` gives each seed its own workload, as the runs recorded on 2026-11-30
did. Each (seed, k) cell seeds the PIAs' initialisation from its seed and k, so that it is
the same whatever else the command runs.
Writes ``<out>/search_quality.json`` and ``search_quality.png``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eas_kernels import SkipPlan, patch_lavin, set_skipped
from eas_kernels.demo.workload import WorkloadConfig, build_workload
from eas_kernels.search import (
    COSINE,
    ESTIMATORS,
    Candidates,
    HeldOutScorer,
    Measurement,
    SearchSettings,
    estimator_class,
    run_search,
)
from eas_kernels.tuning import EASTuner, Example, TuningConfig, answer_loss, collate
from eas_kernels.tuning.evaluate import answer_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_experiments import log, write_report  # noqa: E402

TRAINING = {"batch_size": 8, "lr": 1e-3}  # 3e-3 diverges on some plans (RESULTS.md)


def options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/search_quality"))
    parser.add_argument(
        "--task",
        choices=("easy-vqa", "iris"),
        default="easy-vqa",
        help="easy-vqa: the tables' multimodal workload; iris: the quick start's text task "
        "(scikit-learn's iris flowers as text, SmolLM2 only)",
    )
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--train", type=int, default=WorkloadConfig.train)
    parser.add_argument("--test", type=int, default=WorkloadConfig.test)
    parser.add_argument("--search-batch", type=int, default=24)
    parser.add_argument("--validation", type=int, default=48)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--workload-seed",
        type=int,
        default=0,
        help="seed of the workload (vision tower, projector alignment, data split) shared "
        "by every tuning seed; -1: each seed builds its own workload",
    )
    parser.add_argument("--budget", type=int, default=60, help="held-out passes per search")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--random", type=int, default=12, help="random plans per (seed, k)")
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=sorted(ESTIMATORS),
        help="estimators to compare; NAME@TIE runs NAME with tie_se TIE (e.g. stable@1); "
        "untuned:NAME searches the untuned model, before the warm-up (e.g. untuned:greedy)",
    )
    parser.add_argument("--ramp", choices=("on", "off", "both"), default="on")
    parser.add_argument("--finetune-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--finetune-k", type=int, default=8)
    parser.add_argument(
        "--tie-se",
        type=float,
        default=SearchSettings.tie_se,
        help="stable's tie, in paired standard errors (SearchSettings.tie_se; default %(default)s)",
    )
    args = parser.parse_args(argv)
    for entry in args.estimators:
        try:
            name, tie, _ = variant(entry, args.tie_se)
            if name not in ESTIMATORS:
                parser.error(f"--estimators: {entry!r} is not one of {sorted(ESTIMATORS)}")
            SearchSettings(tie_se=tie).validate()
        except ValueError as error:
            parser.error(f"--estimators {entry}: {error} (NAME@TIE takes a number)")
    if args.task == "iris" and args.model != "smollm2":
        parser.error("--task iris runs on --model smollm2 only (the quick start's model)")
    if args.warmup_epochs < 1:
        parser.error(f"--warmup-epochs must be >= 1, got {args.warmup_epochs}")
    return args


@dataclass
class Task:
    """A frozen model and its examples: the estimators score plans on ``search``, and every
    plan is judged on ``validation``, which no search sees."""

    model: nn.Module
    layers: int
    train: list[Example]
    search: list[Example]
    validation: list[Example]
    test: list[Example]
    pad_id: int


def build_task(args: argparse.Namespace, seed: int) -> Task:
    """``--task`` with data split ``seed``. iris: the quick start's stratified 70/30 split;
    the search batch is the first ``--search-batch`` training flowers (the rest train, at
    most ``--train``), and the 45 test flowers are the test set and (at most
    ``--validation`` of them) the validation set."""
    if args.task == "iris":
        from eas_quickstart import iris_examples

        from eas_kernels.models.smollm2 import load_smollm2_lavin

        model, tokenizer = load_smollm2_lavin(max_seq_len=64, max_batch_size=8)
        train, test, _ = iris_examples(tokenizer, seed)
        search = train[: args.search_batch]
        train = train[args.search_batch :][: args.train]
        validation = test[: args.validation]
        return Task(
            model, model.params.n_layers, train, search, validation, test, tokenizer.pad_token_id
        )
    config = WorkloadConfig(
        model=args.model,
        train=args.train,
        held_out=args.search_batch + args.validation,
        test=args.test,
        seed=seed,
    )
    work = build_workload(config, cache_dir=args.out / "cache", log=log)
    return Task(
        work.model,
        work.model.llm.n_layers,
        work.train,
        work.held_out[: args.search_batch],
        work.held_out[args.search_batch :],
        work.test,
        work.pad_id,
    )


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(values: Sequence[float]) -> list[int]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0] * len(values)
        for rank, index in enumerate(order):
            result[index] = rank
        return result

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in state:
                parameter.copy_(state[name])


UNTUNED = "untuned:"  # the prefix of a search run on the untuned model


def variant(entry: str, tie_se: float) -> tuple[str, float, bool]:
    """``--estimators`` entry ``[untuned:]NAME[@TIE]`` → (estimator, its ``tie_se``,
    whether it searches the untuned model)."""
    untuned = entry.startswith(UNTUNED)
    name, _, tie = entry.removeprefix(UNTUNED).partition("@")
    return name, float(tie) if tie else tie_se, untuned


def searched(
    entry: str,
    args: argparse.Namespace,
    cell: tuple[int, int, int],
    scorer: HeldOutScorer,
    untuned: dict[Measurement, Any],
) -> dict[str, Any]:
    """Run the ``--estimators`` entry on ``scorer``'s model as it is now, for ``cell`` =
    (layers, k, seed), its untuned probes answered from ``untuned``: its plan, passes and
    seconds."""
    layers, k, seed = cell
    name, tie, _ = variant(entry, args.tie_se)
    estimator = estimator_class(name)(
        layers,
        k,
        budget=budget_for(name, args.budget, layers),
        seed=seed,
        settings=SearchSettings(tie_se=tie),
    )
    began = time.perf_counter()
    if probes := estimator.untuned_probes():
        estimator.tell_untuned(probes, [untuned[m] for m in probes])
    plan = run_search(estimator, scorer)
    return {
        "plan": list(plan),
        "passes": estimator.passes,
        "seconds": time.perf_counter() - began,
    }


def budget_for(name: str, budget: int, layers: int) -> int:
    """The common budget; ``loo`` and ``cosine`` use what they need (never more)."""
    return {"loo": layers, "cosine": 1}.get(name, budget)


def one_setting(
    work: Task, args: argparse.Namespace, seed: int, k: int, ramp: bool
) -> tuple[dict[str, Any], nn.Module, dict[str, torch.Tensor]]:
    """One (seed, k, ramp) cell: its row, the warmed-up model and its trainable state."""
    layers = work.layers
    validation = collate(work.validation, work.pad_id)
    # the PIAs' initialisation draws from the global stream: seeded per cell, so that a
    # cell's supernet does not depend on the cells the command ran before it
    torch.manual_seed(20_000 + seed * 1_000 + k * 2 + ramp)
    model = patch_lavin(copy.deepcopy(work.model), SkipPlan(layers, []), search="mha")
    if hasattr(model, "projector"):  # easy-vqa: the projector trains with the PIAs
        model.projector.requires_grad_(True)
    candidates = Candidates("mha", layers)
    search = HeldOutScorer(model, collate(work.search, work.pad_id), candidates, answer_loss)
    untuned = {Measurement(COSINE): search.cosines()}  # what `stable` asks of the untuned model
    before: dict[str, dict[str, Any]] = {}  # untuned: entries search the untuned model
    for entry in args.estimators:
        if variant(entry, args.tie_se)[2]:
            before[entry] = searched(entry, args, (layers, k, seed), search, untuned)
            before[entry]["untuned_search_loss"] = search.loss(tuple(before[entry]["plan"]))
    warmup = TuningConfig(
        k=k,
        estimator="cosine",
        warmup_ramp=ramp,
        warmup_epochs=args.warmup_epochs,
        search_epochs=0,
        finetune_epochs=0,
        seed=seed,
        **TRAINING,
    )
    began = time.perf_counter()
    warmed = EASTuner(model, work.train, work.search, warmup, pad_id=work.pad_id).run()
    warmup_seconds = time.perf_counter() - began
    state = trainables(model)
    judge = HeldOutScorer(model, validation, candidates, answer_loss)
    row: dict[str, Any] = {
        "seed": seed,
        "k": k,
        "ramp": ramp,
        "warmup_loss": warmed.epoch_losses()[-1]["mean_loss"],
        "warmup_seconds": warmup_seconds,
        "full_model_validation_loss": judge.loss(()),
        "estimators": {},
    }
    for entry in args.estimators:
        result = before.get(entry) or searched(entry, args, (layers, k, seed), search, untuned)
        plan = tuple(result["plan"])
        result["search_loss"] = search.loss(plan)
        result["validation_loss"] = judge.loss(plan)
        row["estimators"][entry] = result
        log(f"seed {seed} k {k} ramp {ramp}: {entry} {list(plan)} {result}")
    first = (layers - k) // 2  # the deeper half
    windows = {start: tuple(range(start, start + k)) for start in range(first, layers - k + 1)}
    window_losses = {start: judge.loss(arms) for start, arms in windows.items()}
    best_start = min(window_losses, key=window_losses.get)
    row["best_window"] = {
        "plan": list(windows[best_start]),
        "validation_loss": window_losses[best_start],
        "all": {str(start): loss for start, loss in window_losses.items()},
    }
    generator = torch.Generator().manual_seed(10_000 + seed * 100 + k)
    randoms = [
        tuple(sorted(torch.randperm(layers, generator=generator)[:k].tolist()))
        for _ in range(args.random)
    ]
    random_validation = [judge.loss(arms) for arms in randoms]
    random_search = [search.loss(arms) for arms in randoms]
    best = min(range(len(randoms)), key=lambda i: random_validation[i])
    row["random"] = {
        "plans": [list(arms) for arms in randoms],
        "validation_losses": random_validation,
        "search_losses": random_search,
        "best": {"plan": list(randoms[best]), "validation_loss": random_validation[best]},
        "spearman_search_vs_validation": spearman(random_search, random_validation),
    }
    for result in row["estimators"].values():
        loss = result["validation_loss"]
        result["beats_random"] = sum(loss < other for other in random_validation) / len(randoms)
    if seed in args.finetune_seeds and k == args.finetune_k:
        row["finetuned"] = finetune_plans(model, state, row, work, args, seed)
    return row, model, state


def finetune_plans(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    row: dict[str, Any],
    work: Task,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune each plan 1 epoch from the warmed-up supernet; validation loss, accuracy."""
    plans = {name: tuple(r["plan"]) for name, r in row["estimators"].items()}
    plans["best window"] = tuple(row["best_window"]["plan"])
    plans["best random"] = tuple(row["random"]["best"]["plan"])
    validation = collate(work.validation, work.pad_id)
    config = TuningConfig(
        warmup_epochs=0, search_epochs=0, finetune_epochs=1, seed=seed, **TRAINING
    )
    results: dict[str, Any] = {}
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    for name, plan in plans.items():
        if plan not in done:
            restore(model, state)
            set_skipped(model, plan)
            tuned = EASTuner(model, work.train, [], config, pad_id=work.pad_id).run()
            with torch.no_grad():
                loss = float(answer_loss(model.eval(), validation))
            accuracy = answer_accuracy(
                model, work.test, pad_id=work.pad_id, mode="eager", batch_size=8
            )
            done[plan] = {
                "plan": list(plan),
                "validation_loss": loss,
                "test_accuracy": accuracy,
                "finetune_loss": tuned.epoch_losses()[-1]["mean_loss"],
            }
            log(f"seed {seed}: fine-tuned {name} {list(plan)}: {done[plan]}")
        results[name] = done[plan]
    restore(model, state)
    return results


def summarise(rows: list[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per (k, ramp) and estimator: mean validation loss, share of random plans beaten,
    wins over leave-one-out, Jaccard across seeds, passes and seconds."""
    table = []
    groups: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["k"], row["ramp"]), []).append(row)
    for (k, ramp), group in sorted(groups.items()):
        for name in [*names, "best window", "best random"]:
            if name in names:
                results = [r["estimators"][name] for r in group]
            elif name == "best window":
                results = [r["best_window"] for r in group]
            else:
                results = [r["random"]["best"] for r in group]
            plans = [r["plan"] for r in results]
            pairs = list(itertools.combinations(plans, 2))
            entry = {
                "k": k,
                "ramp": ramp,
                "method": name,
                "validation_loss": statistics.mean(r["validation_loss"] for r in results),
                "per_seed": [round(r["validation_loss"], 4) for r in results],
                "jaccard": statistics.mean(jaccard(a, b) for a, b in pairs) if pairs else None,
            }
            if name in names:
                entry["beats_random"] = statistics.mean(r["beats_random"] for r in results)
                entry["passes"] = statistics.mean(r["passes"] for r in results)
                entry["seconds"] = statistics.mean(r["seconds"] for r in results)
                if "loo" in names:
                    entry["beats_loo"] = sum(
                        r["estimators"][name]["validation_loss"]
                        < r["estimators"]["loo"]["validation_loss"]
                        for r in group
                    )
            table.append(entry)
    return table


def markdown(table: list[dict[str, Any]], seeds: int) -> str:
    lines = [
        "| k | ramp | method | validation loss (mean) | per seed | beats random | "
        f"beats loo (of {seeds}) | Jaccard | passes | seconds |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        jac = "–" if e["jaccard"] is None else f"{e['jaccard']:.2f}"
        lines.append(
            f"| {e['k']} | {'on' if e['ramp'] else 'off'} | {e['method']} | "
            f"{e['validation_loss']:.3f} | {e['per_seed']} | "
            + (f"{e['beats_random']:.0%} | " if "beats_random" in e else "– | ")
            + (f"{e['beats_loo']} | " if "beats_loo" in e else "– | ")
            + f"{jac} | "
            + (f"{e['passes']:.0f} | {e['seconds']:.1f} |" if "passes" in e else "– | – |")
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], names: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["k"], r["ramp"]) for r in rows})
    figure, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False)
    markers = {**dict(zip(names, itertools.cycle("os^vDPX"))), "best window": "*"}
    for ax, (k, ramp) in zip(axes[0], settings, strict=True):
        group = [r for r in rows if (r["k"], r["ramp"]) == (k, ramp)]
        for x, row in enumerate(group):
            ax.scatter(
                [x] * len(row["random"]["validation_losses"]),
                row["random"]["validation_losses"],
                color="lightgrey",
                s=12,
                label="random plans" if x == 0 else None,
            )
            for offset, name in enumerate(names, start=1):
                ax.scatter(
                    x + 0.06 * offset,  # side by side: near-equal losses stay visible
                    row["estimators"][name]["validation_loss"],
                    marker=markers[name],
                    color=f"C{offset - 1}",  # one colour per estimator on every seed
                    label=name if x == 0 else None,
                )
            ax.scatter(
                x,
                row["best_window"]["validation_loss"],
                marker=markers["best window"],
                color="black",
                label="best window" if x == 0 else None,
            )
        ax.set_xticks(range(len(group)), [f"seed {r['seed']}" for r in group])
        ax.set_title(f"k = {k}, warm-up ramp {'on' if ramp else 'off'}", fontsize=9)
        ax.set_yscale("log")  # a few random plans lose 10+ nats
        ax.set_ylabel("validation loss, supernet PIAs (log)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


Supernets = dict[tuple[int, bool], tuple[nn.Module, Task, dict[int, dict[str, torch.Tensor]]]]


def plan_transfer(
    rows: list[dict[str, Any]], supernets: Supernets, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every seed's plans judged on every seed's warmed-up supernet (one shared workload):
    is a plan good for the warm-up that found it only, or for any? Per (k, ramp, method):
    ``own``, the mean validation loss of each supernet's own plan; ``others``, the mean
    over supernets of the other seeds' plans on it; ``matrix[s][p]``, seed ``p``'s plan on
    seed ``s``'s supernet."""
    table = []
    for (k, ramp), (model, work, states) in sorted(supernets.items()):
        group = {r["seed"]: r for r in rows if (r["k"], r["ramp"]) == (k, ramp)}
        validation = collate(work.validation, work.pad_id)
        judge = HeldOutScorer(model, validation, Candidates("mha", work.layers), answer_loss)
        matrices: dict[str, dict[int, dict[int, float]]] = {name: {} for name in args.estimators}
        for supernet, state in states.items():
            restore(model, state)
            for name, matrix in matrices.items():
                matrix[supernet] = {
                    seed: judge.loss(tuple(row["estimators"][name]["plan"]))
                    for seed, row in group.items()
                }
        for name, matrix in matrices.items():
            own = [matrix[s][s] for s in matrix]
            others = [statistics.mean(v for p, v in matrix[s].items() if p != s) for s in matrix]
            table.append(
                {
                    "k": k,
                    "ramp": ramp,
                    "method": name,
                    "own": statistics.mean(own),
                    "others": statistics.mean(others),
                    "own_better": sum(o < x for o, x in zip(own, others, strict=True)),
                    "matrix": {
                        str(s): {str(p): v for p, v in row.items()} for s, row in matrix.items()
                    },
                }
            )
    return table


def transfer_markdown(table: list[dict[str, Any]], seeds: int) -> str:
    lines = [
        "| k | ramp | method | own plan (mean) | other seeds' plans (mean) | "
        f"own plan better (of {seeds}) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {e['k']} | {'on' if e['ramp'] else 'off'} | {e['method']} | {e['own']:.3f} | "
        f"{e['others']:.3f} | {e['own_better']} |"
        for e in table
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = options(argv)
    started = time.perf_counter()
    ramps = {"on": [True], "off": [False], "both": [True, False]}[args.ramp]
    rows = []
    supernets: Supernets = {}  # one model per (k, ramp), every seed's trainable state
    tasks: dict[int, Task] = {}  # by workload seed: built once
    for seed in args.seeds:
        workload_seed = seed if args.workload_seed < 0 else args.workload_seed
        if workload_seed not in tasks:
            tasks[workload_seed] = build_task(args, workload_seed)
        work = tasks[workload_seed]
        for k in args.ks:
            for ramp in ramps:
                row, model, state = one_setting(work, args, seed, k, ramp)
                rows.append(row)
                supernets.setdefault((k, ramp), (model, work, {}))[2][seed] = state
    table = summarise(rows, args.estimators)
    text = markdown(table, len(args.seeds))
    transfer = []
    if args.workload_seed >= 0 and len(args.seeds) > 1:
        transfer = plan_transfer(rows, supernets, args)
        text += "\n\n" + transfer_markdown(transfer, len(args.seeds))
    print(text, flush=True)
    figure = plot(rows, args.estimators, args.out / "search_quality.png")
    body = {
        "rows": rows,
        "summary": table,
        "transfer": transfer,
        "markdown": text,
        "plot": str(figure),
    }
    return write_report(
        args.out / "search_quality.json", "search_quality.py", argv, args, body, started
    )


if __name__ == "__main__":
    main()
