"""RoE's training of a routed model (ROE_SPEC §4) over a list of examples.

Optionally ``pretune_epochs`` first train the kept adapters (and whatever else trains, not
the routers) with every unit kept — RoE routes an MLLM that is already tuned; ours starts
from adapters at zero. Then ``epochs`` over the training examples follow
:class:`~eas_kernels.routing.RouteSchedule` step by step (random routes, then the routers
alone with soft routes, then routers and shortcuts together), minimising
:func:`~eas_kernels.routing.route_loss`: ``CE + exp(−5·CE).detach() · max(0, ρ − ρ̂)``.
The routers learn at ``router_lr`` (they start at zero and see a gradient scaled by
``exp(−5·CE)``), everything else that trains at ``lr``; both follow a linear warm-up and
cosine decay. Batch orders are a function of (seed, epoch) and random routes come from a
generator seeded by ``seed``.

With a ``run_dir``, a checkpoint (the trainable tensors, optimizer and schedule, the random
routes' generator, the step and the history) is written atomically every
``checkpoint_every`` steps and at the end, and :meth:`RouteTuner.run` resumes from it: a
run stopped at any point resumes to the same weights. As :class:`~.trainer.EASTuner`'s,
a checkpoint is resumed only under the same run key (the configuration, a fingerprint of
the examples, the route plan and the caller's entries), and every entry is checked before
anything of the run changes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_finite, check_positive_int, check_seed
from ..files import load_tensor_file, save_atomically
from ..routing import RouteSchedule, RouteStage, route_loss, routes_of, set_routing
from .data import Example, collate
from .trainer import (
    LossFunction,
    Progress,
    WarmupCosine,
    answer_loss,
    check_run_key,
    checked_elapsed,
    checked_trainables,
    example_fingerprint,
    load_entries,
    run_key_entries,
)

# Before RoE's stages: every unit forced kept, the routers frozen, the adapters training.
PRETUNE = RouteStage("pretune", "hard", 1.0, 0.0, False, True)
CHECKPOINT_FILE = "route_checkpoint.pt"
CHECKPOINT_KEYS = (
    "run_key", "step", "elapsed", "trainable", "optimizer", "scheduler", "routes_rng", "history",
)  # fmt: skip


@dataclass
class RouteConfig:
    """Sizes of one RoE training run; the stage fractions and annealing are
    :class:`~eas_kernels.routing.RouteSchedule`'s (RoE's defaults).

    The defaults spend the demo's 4 epochs as 1 of pretuning (every unit kept) and 3 of
    RoE's stages: on SmolLM2 + easy-vqa at ρ = 0.3 (``mha``, one run each) that answered
    0.820, against 0.704 and 0.537 with 4 epochs of RoE's stages alone
    (benchmarks/RESULTS.md). ``random_ramp`` is on for the same reason (0.537 against
    0.208 without it)."""

    epochs: int = 3
    pretune_epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    router_lr: float = 1e-2
    max_grad_norm: float | None = 10.0
    random_until: float = 0.3
    routers_until: float = 0.5
    random_ramp: bool = True
    seed: int = 0
    checkpoint_every: int = 25

    def validate(self) -> RouteConfig:
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.checkpoint_every, "checkpoint_every")
        if isinstance(self.pretune_epochs, bool) or not isinstance(self.pretune_epochs, int):
            raise TypeError(f"pretune_epochs must be an int >= 0, got {self.pretune_epochs!r}")
        if self.pretune_epochs < 0:
            raise ValueError(f"pretune_epochs must be an int >= 0, got {self.pretune_epochs!r}")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_finite(self.lr, "lr")
        check_positive_finite(self.router_lr, "router_lr")
        if self.max_grad_norm is not None:
            check_positive_finite(self.max_grad_norm, "max_grad_norm")
        check_seed(self.seed)
        RouteSchedule(
            1,
            random_until=self.random_until,
            routers_until=self.routers_until,
            random_ramp=self.random_ramp,
        )
        return self


@dataclass
class RouteResult:
    """Per-step history (stage, loss, CE, ρ̂, τ) and the wall time of a run."""

    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class RouteTuner:
    """Train a routed ``model`` (:func:`~eas_kernels.routing.patch_routes`) on ``train``.

    Args:
        model: a routed model; its routers and shortcuts train, and whatever else the
            caller left trainable (e.g. a multimodal projector).
        train: training examples (non-empty).
        config: :class:`RouteConfig`.
        pad_id: padding token of :func:`~eas_kernels.tuning.data.collate`.
        loss_fn: ``loss_fn(model, batch)`` → the batch's CE; default :func:`answer_loss`.
        progress: called after every step with its history record.
        run_dir: folder of the checkpoint (None: no checkpoints).
        run_key: more entries of the run key (names → JSON-like values).
    """

    def __init__(
        self,
        model: nn.Module,
        train: Sequence[Example],
        config: RouteConfig,
        *,
        pad_id: int,
        loss_fn: LossFunction = answer_loss,
        progress: Progress | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        run_key: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, RouteConfig):
            raise TypeError(f"config must be a RouteConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.patch = routes_of(model)
        if len(train) == 0:
            raise ValueError("train must hold at least one example")
        entries = run_key_entries(run_key)
        self.model, self.train, self.pad_id = model, list(train), pad_id
        self.loss_fn, self.progress = loss_fn, progress
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.run_key = {
            **entries,
            **asdict(self.config),
            "train": example_fingerprint(self.train),
            "route_plan": self.patch.plan.to_dict(),
        }
        self.steps_per_epoch = math.ceil(len(self.train) / config.batch_size)
        self.pretune_steps = config.pretune_epochs * self.steps_per_epoch
        self.total = self.pretune_steps + config.epochs * self.steps_per_epoch
        self.schedule = RouteSchedule(
            config.epochs * self.steps_per_epoch,
            random_until=config.random_until,
            routers_until=config.routers_until,
            random_ramp=config.random_ramp,
        )
        routers = [router.weight for router in self.patch.routers()]
        shortcuts = [p for pia in self.patch.shortcuts() for p in pia.parameters()]
        taken = {id(p) for p in routers + shortcuts}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        self.parameters = routers + shortcuts + others
        self.others = others  # what the caller left trainable (e.g. a projector)
        names = {id(p): n for n, p in model.named_parameters()}
        self.named = {names[id(p)]: p for p in self.parameters}  # what a checkpoint holds
        groups = [
            {"params": routers, "lr": config.router_lr},
            {"params": shortcuts + others, "lr": config.lr},
        ]
        self.groups = groups
        self.optimizer, self.scheduler = self._optimizer()
        self.routes_rng = torch.Generator().manual_seed(config.seed)
        self.step, self.elapsed = 0, 0.0
        self.history: list[dict[str, Any]] = []

    def _optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        groups = [{**group, "params": list(group["params"])} for group in self.groups]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(self.total))
        return optimizer, scheduler

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train), generator=generator).tolist()

    def run(self, *, resume: bool = True) -> RouteResult:
        """Train for ``config.epochs`` (after the pretune epochs), or continue from the
        checkpoint in ``run_dir`` with ``resume``; the model is left in eval mode with hard
        routes."""
        if resume:
            self._load_checkpoint()
        control = self.patch.control
        control.generator = self.routes_rng
        started = time.perf_counter() - self.elapsed
        limit = self.config.max_grad_norm
        others, routed = self.others, len(self.patch.plan.layers)
        orders: dict[int, list[int]] = {}
        while self.step < self.total:
            step = self.step
            epoch, first = divmod(step, self.steps_per_epoch)
            order = orders.setdefault(epoch, self._order(epoch))
            first *= self.config.batch_size
            batch = collate(
                [self.train[i] for i in order[first : first + self.config.batch_size]],
                self.pad_id,
            )
            if step < self.pretune_steps:
                stage = PRETUNE
                stage.apply(self.model)
                control.force(torch.zeros(len(batch), routed, dtype=torch.bool))
            else:
                control.force(None)
                stage = self.schedule.apply(self.model, step - self.pretune_steps)
            for parameter in others:  # RoE's stage 2 trains the routers alone
                parameter.requires_grad_(stage.train_shortcuts)
            self.model.train()
            ce = self.loss_fn(self.model, batch)
            loss, realized = route_loss(ce, self.model)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged: the loss is {loss.item()} at step {step + 1}; "
                    f"lower lr (now {self.config.lr}) or router_lr ({self.config.router_lr})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.parameters if p.grad is not None],
                math.inf if limit is None else limit,
            )
            self.optimizer.step()
            self.scheduler.step()
            self.step = step + 1
            record = {
                "step": self.step,
                "epoch": epoch,
                "stage": stage.name,
                "temperature": stage.temperature,
                "keep_bias": stage.keep_bias,
                "loss": float(loss.item()),
                "ce": float(ce.item()),
                "realized_ratio": float(realized),
                "grad_norm": float(norm),
            }
            self.history.append(record)
            if self.progress is not None:
                self.progress(record)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.total:
                self.elapsed = time.perf_counter() - started
                self._save_checkpoint()
        for parameter in others:
            parameter.requires_grad_(True)
        control.force(None)
        set_routing(self.model, "hard")
        self.model.eval()
        return RouteResult(list(self.history), time.perf_counter() - started)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT_FILE

    def _save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        state = {
            "run_key": self.run_key,
            "step": self.step,
            "elapsed": self.elapsed,
            "trainable": {n: p.detach().clone() for n, p in self.named.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "routes_rng": self.routes_rng.get_state(),
            "history": self.history,
        }
        save_atomically(state, path)

    def _load_checkpoint(self) -> None:
        """Continue from the checkpoint in ``run_dir``: every entry is checked, and the
        optimizer and schedule rebuilt, before anything of the run changes."""
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return
        state = load_tensor_file(path, "route checkpoint", CHECKPOINT_KEYS)

        def refuse(reason: str) -> ValueError:
            return ValueError(f"{path} is not a usable route checkpoint: {reason}")

        check_run_key(path, self.run_key, state["run_key"])
        step = state["step"]
        if type(step) is not int or not 0 <= step <= self.total:
            raise refuse(f"step must be an int in [0, {self.total}], got {step!r}")
        elapsed = checked_elapsed(state["elapsed"], refuse)
        trainable = checked_trainables(state["trainable"], self.named, refuse)
        history = state["history"]
        if not (isinstance(history, list) and len(history) == step):
            raise refuse(f"history must list the {step} steps taken")
        optimizer, scheduler = self._optimizer()
        routes_rng = torch.Generator()
        loads = [
            ("optimizer", optimizer.load_state_dict),
            ("scheduler", scheduler.load_state_dict),
            ("routes_rng", routes_rng.set_state),
        ]
        load_entries(state, loads, refuse)
        # Everything checked: the run changes from here on.
        with torch.no_grad():
            for name, value in trainable.items():
                self.named[name].copy_(value)
        self.step, self.elapsed, self.history = step, elapsed, history
        self.optimizer, self.scheduler, self.routes_rng = optimizer, scheduler, routes_rng
