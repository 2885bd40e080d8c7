"""``eas-kernels``: search, fine-tune, evaluate and generate with EAS, and the demo.

Every command works on the LaVIN-style multimodal workload of
:mod:`eas_kernels.demo.workload` (easy-vqa; the real SmolLM2-135M or a tiny random
LLaMA) and writes into ``--out``:

* ``search``   warm-up + search (EAS_SPEC §5) → ``plan.json``, ``search/`` (all PIAs),
  ``preferences.png``, ``plan.png``; resumes from its checkpoint;
* ``finetune`` trains the PIAs of a plan (``--plan``; ``--init`` a search folder to start
  from its PIAs) → ``eas/`` (the plan's PIAs, the vision tower and the projector);
* ``evaluate`` accuracy (per question type; batched low-rank decoding, equal to merged)
  and decode speed of ``--checkpoint`` vs the unpatched model and the floor;
* ``generate`` answers one question about one easy-vqa image;
* ``demo``     all of it, LaVIN-style tuning vs EAS with k skipped MHAs, and a table;
* ``route``    per-example routing (RoE, ROE_SPEC): a pretune epoch with every unit kept,
  then routers and shortcuts trained with RoE's schedule and regularised loss →
  accuracy, the realised skip ratio (per layer, per example), ``routes.png``, batch-1
  decode speed against the unpatched model, and ``routes/`` (route plan, routers,
  adapters, vision tower and projector: ``demo.workload.load_routed``); resumes from its
  checkpoint.

Each command also writes ``<command>_report.json`` (arguments, results, timings,
versions). Bad arguments — and files that are missing, unreadable, unwritable or not what
they should be — end with exit status 2 and one line naming the argument, before any
work. Ctrl-C during training finishes the step, saves the checkpoint and ends with exit
status 130 and one line saying how to resume; running the same command again resumes.

``search`` and ``finetune`` also run data-parallel under ``torchrun`` (or ``accelerate
launch``): ``torchrun --nproc-per-node N -m eas_kernels.cli search ...`` gives the
one-process result (:mod:`eas_kernels.tuning.distributed`); rank 0 builds the workload's
caches first, logs, and writes every file. A second run in the same ``--out`` is refused
while one is running there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from ._checks import SEED_LIMIT
from .demo.easy_vqa import easy_vqa_images, vqa_prompt
from .demo.workload import (
    MODELS,
    Workload,
    WorkloadConfig,
    build_workload,
    evaluate_accuracy,
    load_tuned,
    save_routed,
    save_tuned,
)
from .generation import greedy_generate
from .patch import current_plan, patch_lavin, runtime_of, set_skipped
from .plan import SkipPlan
from .reparam import reparameterize
from .roles import CANDIDATE_SETS, DEFAULT_CANDIDATES
from .routing import UNITS, RoutePlan, patch_routes
from .runtime import MODES
from .search import ESTIMATORS, Candidates
from .tuning import EASTuner, TuningConfig, TuningInterrupted, TuningResult
from .tuning.distributed import Distributed, RankFailed, setup_distributed
from .tuning.evaluate import (
    TIMING_METHOD,
    floor_model,
    paired_ratio,
    pretrained_parameter_count,
    route_matrix,
    time_models,
    tuned_parameter_count,
)
from .tuning.plots import plot_plan, plot_preferences, plot_routes
from .tuning.route_trainer import RouteConfig, RouteTuner


# ----------------------------------------------------------------------------- arguments
def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _layer_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be FIRST-LAST or one layer, got {text}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"must be FIRST-LAST with 0 <= FIRST <= LAST, got {text}")
    return list(range(low, high + 1))


def _workload_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    defaults = WorkloadConfig()
    group.add_argument("--model", choices=MODELS, default=defaults.model, help="language model")
    group.add_argument(
        "--train", type=_positive(int), default=defaults.train, help="training questions"
    )
    group.add_argument(
        "--held-out", type=_positive(int), default=defaults.held_out, help="search batch"
    )
    group.add_argument("--test", type=_positive(int), default=defaults.test, help="test questions")
    group.add_argument(
        "--question-mix",
        choices=("balanced", "natural"),
        default="balanced" if defaults.balanced else "natural",
        help="balanced: colour, shape and yes/no questions in turn; natural: easy-vqa's own "
        "mix (3/4 yes/no)",
    )
    group.add_argument("--vision-epochs", type=_positive(int), default=defaults.vision_epochs)
    group.add_argument(
        "--align-epochs",
        type=_non_negative,
        default=defaults.align_epochs,
        help="epochs aligning the projector with the LLM's colour and shape words (0: none)",
    )
    group.add_argument("--seed", type=_seed, default=defaults.seed)
    group.add_argument("--out", type=Path, default=Path("runs/eas"), help="output folder")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _grad_norm(text: str) -> float | None:
    return None if text == "none" else _positive(float)(text)


def _training_options(parser: argparse.ArgumentParser, *, search: bool) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--batch-size", type=_positive(int), default=8)
    group.add_argument("--lr", type=_positive(float), default=TuningConfig.lr)
    group.add_argument(
        "--max-grad-norm",
        type=_grad_norm,
        default=TuningConfig.max_grad_norm,
        help="clip the trainable parameters' gradient norm before each step ('none': no "
        "clipping; default %(default)s)",
    )
    group.add_argument("--checkpoint-every", type=_positive(int), default=25)
    group.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    group.add_argument("--halt-after-step", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument(
        "--halt-signal", choices=("KILL", "INT"), default="KILL", help=argparse.SUPPRESS
    )
    if search:
        group.add_argument("--k", type=_positive(int), default=8, help="arms to skip")
        group.add_argument(
            "--candidates", choices=sorted(CANDIDATE_SETS), default=DEFAULT_CANDIDATES
        )
        group.add_argument(
            "--estimator",
            choices=sorted(ESTIMATORS),
            default=TuningConfig.estimator,
            help="how the search ranks the arms (see README)",
        )
        group.add_argument(
            "--search-budget",
            type=_non_negative,
            default=None,
            help="held-out passes the estimator may use (default: its own)",
        )
        group.add_argument(
            "--warmup-ramp",
            action=argparse.BooleanOptionalAction,
            default=TuningConfig.warmup_ramp,
            help="grow the warm-up's random skip sets from 1 to k arms",
        )
        group.add_argument(
            "--warmup-epochs", type=_non_negative, default=TuningConfig.warmup_epochs
        )
        group.add_argument(
            "--search-epochs", type=_non_negative, default=TuningConfig.search_epochs
        )
        group.add_argument(
            "--eval-every",
            type=_positive(int),
            default=2,
            help="T: training steps between bandit rounds in the search epochs (default 2, "
            "for this CLI's short runs; TuningConfig's default is the paper's 10)",
        )
        group.add_argument(
            "--num-subnets", type=_positive(int), default=None, help="m (default: the estimator's)"
        )
        group.add_argument("--policy-lr", type=_positive(float), default=1.0, help="η")
        group.add_argument("--policy-temperature", type=_positive(float), default=1.0)
        group.add_argument(
            "--tie-se",
            type=_non_negative_float,
            default=TuningConfig.tie_se,
            help="stable: choices within this many paired standard errors of the lowest "
            "loss go to the untuned model's prior (default %(default)s; 0: no ties)",
        )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="eas-kernels", description=__doc__.split("\n\n")[0])
    root.add_argument("--version", action="version", version=f"eas_kernels {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="warm-up and bandit search for a skip plan")
    _workload_options(search)
    _training_options(search, search=True)
    finetune = commands.add_parser("finetune", help="train the PIAs of a plan")
    _workload_options(finetune)
    _training_options(finetune, search=False)
    finetune.add_argument("--plan", type=Path, required=True, help="plan.json")
    finetune.add_argument("--init", type=Path, default=None, help="a search folder")
    finetune.add_argument("--epochs", type=_positive(int), default=TuningConfig.finetune_epochs)
    evaluate = commands.add_parser("evaluate", help="accuracy and decode speed of a checkpoint")
    _workload_options(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="a finetune eas/ folder")
    evaluate.add_argument("--timing-prompts", type=_positive(int), default=6)
    evaluate.add_argument("--timing-tokens", type=_positive(int), default=16)
    generate = commands.add_parser("generate", help="answer a question about an image")
    _workload_options(generate)
    generate.add_argument("--checkpoint", type=Path, required=True)
    generate.add_argument("--image-id", type=_non_negative, required=True)
    generate.add_argument("--split", choices=("train", "test"), default="test")
    generate.add_argument("--question", required=True)
    generate.add_argument("--max-new-tokens", type=_positive(int), default=4)
    generate.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="how the decode steps apply the PIAs (auto: the cheapest for --max-new-tokens)",
    )
    route = commands.add_parser(
        "route", help="per-example routing (RoE): routers learn which units each example skips"
    )
    _workload_options(route)
    group = route.add_argument_group("routing")
    group.add_argument("--unit", choices=UNITS, default="mha", help="what a route skips")
    group.add_argument("--ratio", type=_ratio, default=0.3, help="target skip ratio ρ in [0, 1)")
    group.add_argument(
        "--layers", type=_layer_range, default=None, help="routed layers, FIRST-LAST (default: all)"
    )
    group.add_argument("--skip-rank", type=_positive(int), default=32)
    group.add_argument("--epochs", type=_positive(int), default=RouteConfig.epochs)
    group.add_argument(
        "--pretune-epochs",
        type=_non_negative,
        default=RouteConfig.pretune_epochs,
        help="epochs that train the kept adapters with every unit kept, before RoE's stages",
    )
    group.add_argument("--batch-size", type=_positive(int), default=8)
    group.add_argument("--lr", type=_positive(float), default=RouteConfig.lr)
    group.add_argument("--router-lr", type=_positive(float), default=RouteConfig.router_lr)
    group.add_argument("--max-grad-norm", type=_grad_norm, default=RouteConfig.max_grad_norm)
    group.add_argument(
        "--random-ramp",
        action=argparse.BooleanOptionalAction,
        default=RouteConfig.random_ramp,
        help="raise stage 1's random skip probability from 0 to ρ (default %(default)s)",
    )
    group.add_argument(
        "--checkpoint-every", type=_positive(int), default=RouteConfig.checkpoint_every
    )
    group.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    route.add_argument("--timing-prompts", type=_positive(int), default=6)
    route.add_argument("--timing-tokens", type=_positive(int), default=16)
    demo = commands.add_parser("demo", help="LaVIN-style tuning vs EAS, end to end")
    _workload_options(demo)
    _training_options(demo, search=True)
    demo.add_argument("--finetune-epochs", type=_non_negative, default=TuningConfig.finetune_epochs)
    demo.add_argument("--timing-prompts", type=_positive(int), default=6)
    demo.add_argument("--timing-tokens", type=_positive(int), default=16)
    return root


# ----------------------------------------------------------------------------- helpers
class Console:
    """Log lines with elapsed time; a progress bar over training steps (tqdm if present).

    In a distributed run (``torchrun``) only rank 0 writes; ``distributed`` says where
    this process is.
    """

    def __init__(self, quiet: bool, distributed: Distributed | None = None) -> None:
        self.distributed = distributed or Distributed()
        self.quiet = quiet or not self.distributed.is_main
        self.started = time.perf_counter()
        self.bar: Any = None

    def log(self, message: str) -> None:
        if not self.distributed.is_main:
            return
        line = f"[{time.perf_counter() - self.started:6.1f} s] {message}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, total: int, description: str) -> Any:
        """A callback for :class:`EASTuner` that advances a bar of ``total`` steps."""
        self._bar(total, description)

        def update(record: dict[str, Any]) -> None:
            skipped = list(record["plan"].skipped) + [f"f{i}" for i in record["plan"].skipped_ffns]
            postfix = {"phase": record["phase"], "loss": f"{record['loss']:.3f}"}
            if "held_out_loss" in record:
                postfix["held-out"] = f"{record['held_out_loss']:.3f}"
            postfix["plan"] = ",".join(map(str, skipped)) or "-"
            self._advance(record["step"], total, postfix)

        return update

    def _bar(self, total: int, description: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None and not self.quiet:
            self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, file=sys.stdout)

    def _advance(self, step: int, total: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif not self.quiet and step % 25 == 0:
            self.log(f"step {step}/{total} {postfix}")

    def route_progress(self, total: int, description: str) -> Any:
        """A callback for :class:`RouteTuner`: stage, loss and ``ρ̂`` on a bar of ``total``."""
        self._bar(total, description)

        def update(record: dict[str, Any]) -> None:
            postfix = {
                "stage": record["stage"],
                "ce": f"{record['ce']:.3f}",
                "ρ̂": f"{record['realized_ratio']:.2f}",
                "τ": f"{record['temperature']:.2g}",
            }
            self._advance(record["step"], total, postfix)

        return update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _workload(
    args: argparse.Namespace, console: Console, *, pretrain_vision: bool = True
) -> Workload:
    config = WorkloadConfig(
        model=args.model,
        train=args.train,
        held_out=args.held_out,
        test=args.test,
        vision_epochs=args.vision_epochs,
        align_epochs=args.align_epochs,
        seed=args.seed,
        max_batch_size=getattr(args, "batch_size", 8),
        balanced=args.question_mix == "balanced",
    )
    distributed = console.distributed
    if not distributed.is_main:
        distributed.barrier()  # rank 0 builds first and fills the cache; the others read it
    workload = build_workload(
        config, cache_dir=args.out / "cache", pretrain_vision=pretrain_vision, log=console.log
    )
    if distributed.is_main:
        distributed.barrier()
    console.log(
        f"easy-vqa: {len(workload.train)} training, {len(workload.held_out)} held-out, "
        f"{len(workload.test)} test questions"
    )
    return workload


def _tuning_config(
    args: argparse.Namespace, *, searches: bool, finetune_epochs: int
) -> TuningConfig:
    common = {
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "finetune_epochs": finetune_epochs,
    }
    if not searches:
        return TuningConfig(warmup_epochs=0, search_epochs=0, **common)
    return TuningConfig(
        k=args.k,
        candidates=args.candidates,
        estimator=args.estimator,
        search_budget=args.search_budget,
        warmup_ramp=args.warmup_ramp,
        warmup_epochs=args.warmup_epochs,
        search_epochs=args.search_epochs,
        num_subnets=args.num_subnets,
        eval_every=args.eval_every,
        policy_lr=args.policy_lr,
        policy_temperature=args.policy_temperature,
        tie_se=args.tie_se,
        **common,
    )


def _tune(
    model: nn.Module,
    workload: Workload,
    config: TuningConfig,
    run_dir: Path,
    args: argparse.Namespace,
    console: Console,
    name: str,
) -> TuningResult:
    model.projector.requires_grad_(True)  # trains with the adapters; the LLM stays frozen
    tuner = EASTuner(
        model,
        workload.train,
        workload.held_out,
        config,
        pad_id=workload.pad_id,
        run_dir=run_dir,
        run_key=_run_key(args, model),
        distributed=console.distributed,
    )
    epochs = config.warmup_epochs + config.search_epochs + config.finetune_epochs
    total = epochs * math.ceil(len(workload.train) / config.batch_size)
    tuner.progress = console.progress(total, name)
    try:
        result = tuner.run(
            resume=not args.no_resume,
            halt_after_step=args.halt_after_step,
            halt_signal=getattr(signal, f"SIG{args.halt_signal}"),
        )
    finally:
        console.close()
    console.log(f"{name}: plan {_describe(result.plan)} ({result.seconds:.0f} s)")
    return result


def _run_key(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The arguments that change a tuning run's result beyond its :class:`TuningConfig`
    and examples: a checkpoint written under other values is not resumed."""
    key = _data_key(args)
    key["plan"] = current_plan(model).to_dict()
    if getattr(args, "init", None) is not None:
        key["--init"] = str(args.init.resolve())
    return key


def _data_key(args: argparse.Namespace) -> dict[str, Any]:
    """The data arguments of a run key: a checkpoint written under others is not resumed."""
    return {name: getattr(args, name.lstrip("-").replace("-", "_")) for name in _DATA_ARGUMENTS}


_DATA_ARGUMENTS = (
    "--model",
    "--train",
    "--held-out",
    "--test",
    "--question-mix",
    "--vision-epochs",
    "--align-epochs",
    "--seed",
)


def _describe(plan: SkipPlan) -> str:
    parts = []
    if plan.skipped:
        parts.append(f"MHAs {list(plan.skipped)}")
    if plan.skipped_ffns:
        parts.append(f"FFNs {list(plan.skipped_ffns)}")
    return ", ".join(parts) or "nothing skipped"


def _environment() -> dict[str, Any]:
    return {
        "eas_kernels": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _write_report(args: argparse.Namespace, report: dict[str, Any], console: Console) -> Path:
    report = {
        "command": args.command,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **report,
        "environment": _environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - console.started,
    }
    path = args.out / f"{args.command}_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    console.log(f"report: {path}")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, SkipPlan):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _plots(result: TuningResult, candidates: Candidates, out: Path) -> dict[str, str]:
    names = candidates.arm_names()
    preferences = plot_preferences(result.history["updates"], names, out / "preferences.png")
    plan = plot_plan(result.scores, result.arms, names, out / "plan.png")
    return {"preferences": str(preferences), "plan": str(plan)}


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse paths that cannot work before anything runs: ``--out`` must be a writable
    folder (created if missing), ``--plan`` a file, ``--checkpoint``/``--init`` folders."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} is not a writable folder: {error.strerror}") from None
    for flag, kind in (("--plan", "file"), ("--checkpoint", "folder"), ("--init", "folder")):
        path = getattr(args, flag.lstrip("-"), None)
        if path is None:
            continue
        if not path.exists():
            raise ValueError(f"{flag} {path} does not exist")
        if (kind == "file") != path.is_file():
            raise ValueError(f"{flag} {path} is not a {kind}")


def _load(flag: str, load: Any, *arguments: Any) -> Any:
    """``load(*arguments)``, with any refusal of the file reworded to name ``flag``."""
    try:
        return load(*arguments)
    except (ValueError, TypeError, OSError) as error:
        raise ValueError(f"{flag}: {error}") from None


# ----------------------------------------------------------------------------- commands
def cmd_search(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workload = _workload(args, console)
    layers = workload.model.llm.n_layers
    model = patch_lavin(copy.deepcopy(workload.model), SkipPlan(layers, []), search=args.candidates)
    config = _tuning_config(args, searches=True, finetune_epochs=0)
    result = _tune(model, workload, config, args.out / "search_state", args, console, "search")
    if not console.distributed.is_main:
        return {}  # rank 0 writes the plan, the PIAs, the plots and the report
    result.plan.save(args.out / "plan.json")
    save_tuned(model, args.out / "search", active_only=False)
    candidates = Candidates(args.candidates, layers)
    return {
        "workload": workload.info,
        "plan": result.plan,
        "arms": list(result.arms),
        "arm_names": candidates.arm_names(),
        "estimator": config.estimator,
        "search_passes": result.search_passes,
        "search_seconds": result.search_seconds,
        "scores": result.scores,
        "updates": result.history["updates"],
        "losses": [step["loss"] for step in result.history["steps"]],
        "plots": _plots(result, candidates, args.out),
        "files": {"plan": str(args.out / "plan.json"), "search": str(args.out / "search")},
        "tuning_seconds": result.seconds,
        "distributed": result.distributed,
    }


def cmd_finetune(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    plan = _load("--plan", SkipPlan.load, args.plan)
    workload = _workload(args, console)
    if args.init is not None:
        model = _load("--init", load_tuned, workload.model, args.init)
        searched = current_plan(model)
        if (searched.skip_rank, searched.adapter_rank, searched.temperature) != (
            plan.skip_rank,
            plan.adapter_rank,
            plan.temperature,
        ):
            raise ValueError(f"--plan {args.plan} has other adapter sizes than --init {args.init}")
        set_skipped(model, plan.skipped, ffns=plan.skipped_ffns)
    else:
        model = _load("--plan", patch_lavin, copy.deepcopy(workload.model), plan)
    config = _tuning_config(args, searches=False, finetune_epochs=args.epochs)
    result = _tune(model, workload, config, args.out / "finetune_state", args, console, "finetune")
    if not console.distributed.is_main:
        return {}  # rank 0 writes the PIAs and the report
    folder = save_tuned(model, args.out / "eas", active_only=True)
    return {
        "workload": workload.info,
        "plan": result.plan,
        "trainable_params": tuned_parameter_count(model),
        "losses": [step["loss"] for step in result.history["steps"]],
        "files": {"checkpoint": str(folder)},
        "tuning_seconds": result.seconds,
        "distributed": result.distributed,
    }


def _timing(
    models: dict[str, tuple[nn.Module, str | None]],
    workload: Workload,
    args: argparse.Namespace,
    console: Console,
) -> dict[str, dict[str, float]]:
    prompts = workload.test[: args.timing_prompts]
    console.log(
        f"timing batch-1 decoding: {len(prompts)} prompts x {args.timing_tokens} tokens, "
        f"{len(models)} models, interleaved step by step"
    )
    return time_models(models, prompts, args.timing_tokens)


def _accuracy(
    model: nn.Module, workload: Workload, mode: str | None, console: Console, name: str
) -> dict[str, Any]:
    """Test accuracy, overall and per question type (:func:`evaluate_accuracy`)."""
    result = evaluate_accuracy(model, workload, mode)
    parts = ", ".join(f"{kind} {value:.3f}" for kind, value in result["accuracy_by_type"].items())
    decode = "" if result["decode"] is None else f"{result['decode']}, "  # None: routed
    console.log(
        f"{name}: test accuracy {result['accuracy']:.3f} ({parts}; {decode}"
        f"batch {result['batch_size']})"
    )
    return result


def cmd_evaluate(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workload = _workload(args, console, pretrain_vision=False)  # the checkpoint has it
    model = _load("--checkpoint", load_tuned, workload.model, args.checkpoint)
    plan = current_plan(model)
    accuracy = _accuracy(model, workload, "merge", console, "EAS")
    timings = _timing(
        {
            "unpatched": (workload.model, None),
            "EAS (merged)": (model, "merge"),
            "floor": (floor_model(workload.model, plan), None),
        },
        workload,
        args,
        console,
    )
    for name, timing in timings.items():
        console.log(f"{name}: {timing['ms_per_token']:.2f} ms/token")
    return {"workload": workload.info, "plan": plan, **accuracy, "timings": timings}


def cmd_generate(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workload = _workload(args, console, pretrain_vision=False)  # the checkpoint has it
    model = _load("--checkpoint", load_tuned, workload.model, args.checkpoint)
    try:
        image = easy_vqa_images(args.split, [args.image_id])[args.image_id]
    except KeyError:
        raise ValueError(
            f"--image-id {args.image_id}: easy-vqa's {args.split} split has no such image"
        ) from None
    prompt = [model.image_token_id] * model.num_image_tokens + workload.encode(
        vqa_prompt(args.question)
    )
    reparameterize(model, args.mode)
    generated = greedy_generate(
        model.eval(),
        [prompt],
        args.max_new_tokens,
        pad_id=workload.pad_id,
        prefill_kwargs={"images": image.unsqueeze(0)},
    )
    answer = workload.decode(generated.tokens[0])
    print(f"Q: {args.question}\nA:{answer}", flush=True)
    runtime = runtime_of(model)
    choice = runtime.auto_choice if args.mode == "auto" else None
    decoding = {
        "mode": args.mode,
        "realized": runtime.realized,  # None: no decode step (one new token)
        "auto": None if choice is None else dataclasses.asdict(choice),
    }
    console.log(
        f"decoding: mode {args.mode}, realised as {runtime.realized or 'nothing (no decode step)'}"
    )
    return {
        "question": args.question,
        "image_id": args.image_id,
        "answer": answer,
        "decoding": decoding,
    }


def cmd_demo(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workload = _workload(args, console)
    base, layers = workload.model, workload.model.llm.n_layers
    if not args.k < layers:
        raise ValueError(f"--k must be smaller than the number of layers ({layers}), got {args.k}")
    epochs = args.warmup_epochs + args.search_epochs + args.finetune_epochs
    methods: dict[str, dict[str, Any]] = {}

    lavin = patch_lavin(copy.deepcopy(base), SkipPlan(layers, []))
    config = _tuning_config(args, searches=False, finetune_epochs=epochs)
    result = _tune(lavin, workload, config, args.out / "lavin_state", args, console, "LaVIN-style")
    accuracy = _accuracy(lavin, workload, "eager", console, "LaVIN-style")
    methods["LaVIN-style"] = {
        "plan": result.plan,
        "trainable_params": tuned_parameter_count(lavin),
        **accuracy,
        "epoch_losses": result.epoch_losses(),
        "tuning_seconds": result.seconds,
        "epochs": epochs,
    }

    searching = patch_lavin(copy.deepcopy(base), SkipPlan(layers, []), search=args.candidates)
    config = _tuning_config(args, searches=True, finetune_epochs=args.finetune_epochs)
    result = _tune(searching, workload, config, args.out / "eas_state", args, console, "EAS")
    save_tuned(searching, args.out / "eas", active_only=True)
    result.plan.save(args.out / "plan.json")
    eas = load_tuned(base, args.out / "eas")
    accuracy = _accuracy(eas, workload, "merge", console, "EAS")
    eas_name = f"EAS, {args.k} {args.candidates.upper()} skipped"
    methods[eas_name] = {
        "plan": result.plan,
        "arms": list(result.arms),
        "trainable_params": tuned_parameter_count(eas),
        **accuracy,
        "epoch_losses": result.epoch_losses(),
        "tuning_seconds": result.seconds,
        "epochs": epochs,
    }
    candidates = Candidates(args.candidates, layers)
    plots = _plots(result, candidates, args.out)

    timings = _timing(
        {
            "unpatched": (base, None),
            "LaVIN-style": (lavin, "eager"),
            eas_name: (eas, "merge"),
            "floor": (floor_model(base, result.plan), None),
        },
        workload,
        args,
        console,
    )
    pretrained = pretrained_parameter_count(workload.model.llm)
    _print_table(methods, timings, pretrained)
    comparisons = {
        f"{eas_name} / floor": paired_ratio(timings, eas_name, "floor"),
        f"LaVIN-style / {eas_name}": paired_ratio(timings, "LaVIN-style", eas_name),
    }
    for label, ratio in comparisons.items():
        low, high = ratio["iqr"]
        print(f"decode time {label}: {ratio['median']:.3f}x (quartiles {low:.3f}-{high:.3f})")
    return {
        "workload": workload.info,
        "pretrained_params": pretrained,
        "methods": methods,
        "timings": timings,
        "timing_ratios": comparisons,
        "search": {
            "estimator": config.estimator,
            "passes": result.search_passes,
            "seconds": result.search_seconds,
            "scores": result.scores,
            "updates": result.history["updates"],
            "arm_names": candidates.arm_names(),
        },
        "plots": plots,
        "timing_method": TIMING_METHOD,
    }


def cmd_route(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workload = _workload(args, console)
    base, layers = workload.model, workload.model.llm.n_layers
    plan = RoutePlan(
        layers, unit=args.unit, ratio=args.ratio, layers=args.layers, skip_rank=args.skip_rank
    )
    model = patch_routes(copy.deepcopy(base), plan)
    model.projector.requires_grad_(True)  # trains with the routes; the LLM stays frozen
    config = RouteConfig(
        epochs=args.epochs,
        pretune_epochs=args.pretune_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        router_lr=args.router_lr,
        max_grad_norm=args.max_grad_norm,
        random_ramp=args.random_ramp,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    tuner = RouteTuner(
        model,
        workload.train,
        config,
        pad_id=workload.pad_id,
        run_dir=args.out / "route_state",
        run_key=_data_key(args),
    )
    tuner.progress = console.route_progress(tuner.total, f"RoE ({args.unit}, ρ={args.ratio})")
    try:
        result = tuner.run(resume=not args.no_resume)
    finally:
        console.close()
    folder = save_routed(model, args.out / "routes")
    accuracy = _accuracy(model, workload, None, console, "routed")
    size = workload.model.llm.params.max_batch_size
    routes = route_matrix(model, workload.test, pad_id=workload.pad_id, batch_size=size)
    per_example = routes.float().sum(dim=1)
    realized = {
        "mean": float(routes.float().mean()),
        "units_per_example_mean": float(per_example.mean()),
        "units_per_example_std": float(per_example.std()) if len(per_example) > 1 else 0.0,
        "per_layer": dict(zip(plan.layers, routes.float().mean(dim=0).tolist(), strict=True)),
    }
    console.log(
        f"realized skip ratio on the test set {realized['mean']:.3f} (target {args.ratio}); "
        f"{realized['units_per_example_mean']:.1f} ± {realized['units_per_example_std']:.1f} "
        f"units skipped per example of {len(plan.layers)}"
    )
    plot = plot_routes(
        routes.tolist(), plan.layers, result.history, args.ratio, args.out / "routes.png"
    )
    timings = _timing({"unpatched": (base, None), "routed": (model, None)}, workload, args, console)
    ratio = paired_ratio(timings, "unpatched", "routed")
    console.log(
        f"batch-1 decode: routed {timings['routed']['ms_per_token']:.2f} ms/token, unpatched "
        f"{timings['unpatched']['ms_per_token']:.2f} ({ratio['median']:.3f}x faster)"
    )
    return {
        "workload": workload.info,
        "route_plan": plan.to_dict(),
        "config": dataclasses.asdict(config),
        **accuracy,
        "realized_ratio": realized,
        "history": result.history,
        "tuning_seconds": result.seconds,
        "timings": timings,
        "speedup_over_unpatched": ratio,
        "plots": {"routes": str(plot)},
        "files": {"routes": str(folder)},
        "timing_method": TIMING_METHOD,
    }


def _print_table(
    methods: dict[str, dict[str, Any]], timings: dict[str, dict[str, Any]], pretrained: int
) -> None:
    """The demo's table; a speed-up is the median of the call-by-call ratios of the
    unpatched model's decode time to the method's, with their quartiles."""
    header = (
        f"{'method':28s} {'tuned params':>18s} {'test acc':>8s} {'ms/token':>9s} "
        f"{'speed-up [quartiles]':>22s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, timing in timings.items():  # unpatched, the tuned methods, the floor
        label = "unpatched (no tuning)" if name == "unpatched" else name
        info = methods.get(name)
        params = "-"
        accuracy = "-"
        if info is not None:
            share = 100.0 * info["trainable_params"] / pretrained
            params = f"{info['trainable_params']:,} ({share:.2f}%)"
            accuracy = f"{info['accuracy']:.3f}"
        ratio = paired_ratio(timings, "unpatched", name)
        speedup = f"{ratio['median']:.3f}x [{ratio['iqr'][0]:.3f}-{ratio['iqr'][1]:.3f}]"
        print(
            f"{label:28s} {params:>18s} {accuracy:>8s} {timing['ms_per_token']:9.2f} {speedup:>22s}"
        )
    print(flush=True)


COMMANDS = {
    "search": cmd_search,
    "finetune": cmd_finetune,
    "evaluate": cmd_evaluate,
    "generate": cmd_generate,
    "demo": cmd_demo,
    "route": cmd_route,
}


DISTRIBUTED_COMMANDS = ("search", "finetune")


def _distributed(command: str) -> Distributed:
    """The process group of a ``torchrun`` launch (search and finetune only)."""
    if command in DISTRIBUTED_COMMANDS:
        return setup_distributed()
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise ValueError(
            f"{command} runs in one process (WORLD_SIZE is {world}): only "
            f"{' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun"
        )
    return Distributed()


LOCK_FILE = ".eas-kernels.lock"


@contextlib.contextmanager
def _run_lock(out: Path, distributed: Distributed) -> Iterator[None]:
    """Refuse a second run in the same ``--out`` while one is running there (two runs
    would overwrite each other's checkpoints and reports): ``--out/.eas-kernels.lock``
    holds the running process's id, taken by rank 0 of a distributed run."""
    if not distributed.is_main:
        yield
        return
    lock = out / LOCK_FILE
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text().strip()
            if holder.isdigit() and _running(int(holder)):
                raise ValueError(
                    f"--out {out} is in use by another eas-kernels run (process {holder}): two "
                    "runs in one folder would overwrite each other's checkpoints; wait for it "
                    "or use another --out (under torchrun, one command runs every rank)"
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that ended without removing it
    else:
        raise ValueError(f"--out {out}: could not take {lock}")
    try:
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: a liveness probe
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prefix = f"eas-kernels {args.command}"
    console = Console(args.quiet)
    try:
        console = Console(args.quiet, _distributed(args.command))
        _check_paths(args)
        with _run_lock(args.out, console.distributed):
            report = COMMANDS[args.command](args, console)
            if console.distributed.is_main:
                _write_report(args, report, console)
    except TuningInterrupted as interrupt:
        console.close()
        resume = "run the same command again to resume" if interrupt.checkpoint else "no resume"
        print(f"{prefix}: {interrupt.args[0]}; {resume}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        console.close()
        print(
            f"{prefix}: interrupted; the same command resumes from the last checkpoint, if any",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError, RankFailed) as error:
        console.close()
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prefix}: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
