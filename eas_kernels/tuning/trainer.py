"""The EAS tuning schedule on any patched model (EAS_SPEC §5; paper §4.3).

Phases, in order, over the training examples (before the first step, the measurements
the estimator asks of the untuned model, :meth:`~eas_kernels.search.Estimator.untuned_probes`,
are taken on the held-out batch: ``stable``'s cosine prior):

1. **warm-up** (``warmup_epochs``): every step skips a uniformly random set of arms and
   trains the PIAs of all layers on it: k arms, or with ``warmup_ramp`` ``⌈k (t+1) / T⌉``
   at warm-up step ``t`` of ``T`` (the public LLaVA-EAS code's ramp: a small model is
   not hurt by k random skips from the first step);
2. **search** (``search_epochs``): the estimator (``estimator``, a key of
   :data:`eas_kernels.search.ESTIMATORS`) chooses each step's skip set, and every
   ``eval_every`` steps asks for one round of measurements on the held-out batch (eval
   mode, no grad: losses of skip sets, or the one-pass cosine probe). When the search
   epochs end (or without any), the estimator's remaining rounds run back to back until
   it is finished or has spent ``search_budget`` held-out passes;
3. **fine-tune** (``finetune_epochs``): the plan (the k least important arms) is fixed
   and its PIAs train on.

Without warm-up and search epochs it only fine-tunes the model's current skip sets (how
LaVIN-style tuning, or a given plan, is trained); ``k`` is then unused.

Each phase group has its own AdamW (warm-up and search share one; fine-tuning starts a
fresh one) with a linear warm-up over the first 10 % of its steps and cosine decay. The
model must be patched with ``search=<candidates>`` (:func:`eas_kernels.patch_lavin`);
every parameter with ``requires_grad`` trains (the PIAs, and whatever the caller unfroze,
e.g. a multimodal projector).

Checkpoints (trainable tensors, optimizer and schedule, estimator, RNG states, position and
history) are written atomically every ``checkpoint_every`` steps and at each phase end;
:meth:`EASTuner.run` resumes from the last one, and a run killed at any point resumes to
the same final plan and weights (CPU, same versions): batch orders are a function of
(seed, phase, epoch), all sampling uses the estimator's own seeded generator.

A checkpoint is resumed only by the run that wrote it: its *run key* — the configuration,
a fingerprint of the training and held-out examples, and whatever the caller adds
(``run_key``, e.g. the command line's data arguments) — must match, else ``ValueError``
names the first entry that differs and both values. A checkpoint is read weights-only and
checked entry by entry before anything of the run changes; trainable parameters that hold
NaN or Inf are never written. SIGINT (Ctrl-C) during :meth:`EASTuner.run` finishes the
current step, writes a checkpoint there and raises :class:`TuningInterrupted`; a second
SIGINT interrupts at once.

Under ``torchrun`` (or with a process group initialised) every rank runs the same tuner:
each trains on its shard of every global batch and scores its shard of the held-out
batch, the search stays in lockstep, and rank 0 writes (:mod:`.distributed`). The result
does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    SEED_LIMIT,
    check_positive_finite,
    check_positive_int,
    check_seed,
    first_non_finite,
    takes_keyword,
)
from ..files import load_tensor_file, save_atomically
from ..patch import patch_of
from ..plan import SkipPlan
from ..roles import DEFAULT_CANDIDATES
from ..search import Candidates, Estimator, HeldOutScorer, SearchSettings, estimator_class
from ..search.estimator import COSINE, EXAMPLES, Measurement, loss_of
from .data import IGNORE_INDEX, Batch, Example, collate
from .distributed import Distributed, digest, full_tensor, laid_out_as, setup_distributed

PHASES = ("warmup", "search", "finetune")
CHECKPOINT_FILE = "tuner_checkpoint.pt"
# What a tuner checkpoint holds (read weights-only: tensors and plain containers).
CHECKPOINT_KEYS = (
    "run_key",
    "position",
    "elapsed",
    "trainable",
    "optimizer",
    "scheduler",
    "search",
    "torch_rng",
    "history",
)

POSITION_KEYS = ("phase", "epoch", "batch", "step", "search_step")

LossFunction = Callable[[nn.Module, Batch], torch.Tensor]
Progress = Callable[[dict[str, Any]], None]


@dataclass
class TuningConfig:
    """Sizes of one tuning run (paper, LaVIN: warm-up 5, search 5 epochs, m=3, T=10).

    The defaults (warm-up 1, no search epoch, fine-tune 3) suit ``portfolio`` and
    ``greedy``, whose rounds score the warmed-up supernet back to back: on the demo's
    workload the final plan then gets 3 of the 4 training epochs (EAS-8 0.892 against
    0.518 with 1 search epoch and 2 of fine-tuning, one seed; ``benchmarks/RESULTS.md``).
    The bandits (``paper``, ``bandit``) update between training steps and need
    ``search_epochs`` (or a ``search_budget``).

    ``estimator`` picks the search (:data:`eas_kernels.search.ESTIMATORS`; the default,
    ``portfolio``, had the best held-out plans on both tasks measured, "Search quality" in
    ``benchmarks/RESULTS.md``); ``search_budget`` caps its held-out passes (None: the
    estimator's default, e.g. the search phase's rounds for ``paper``, ``min(2 · arms,
    the full greedy)`` for ``greedy`` and ``portfolio``);
    ``num_subnets`` is the bandits' subnets per round (None: 3 for ``paper``, 8 for
    ``bandit``); ``policy_lr``/``policy_temperature`` are their ``η`` and ``τ``;
    ``tie_se`` is ``stable``'s tie in paired standard errors (the others ignore it).
    ``max_grad_norm`` clips the trainable parameters' gradient norm before each step
    (None: no clipping; each step's norm before clipping is in the history). The default,
    10, is near an ordinary step's norm (10–30 on the demo's workload) and cuts the rare
    spikes (150–1,100) that made single runs fail (benchmarks/RESULTS.md, "Gradient
    clipping").
    """

    k: int | None = None
    candidates: str = DEFAULT_CANDIDATES
    estimator: str = "portfolio"
    search_budget: int | None = None
    warmup_ramp: bool = True
    warmup_epochs: int = 1
    search_epochs: int = 0
    finetune_epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    max_grad_norm: float | None = 10.0
    num_subnets: int | None = None
    eval_every: int = 10
    policy_lr: float = 1.0
    policy_temperature: float = 1.0
    tie_se: float = SearchSettings.tie_se
    seed: int = 0
    checkpoint_every: int = 25

    @property
    def searches(self) -> bool:
        return self.warmup_epochs + self.search_epochs > 0

    def validate(self) -> TuningConfig:
        for name in ("batch_size", "eval_every", "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        estimator_class(self.estimator)
        if not isinstance(self.warmup_ramp, bool):
            raise TypeError(f"warmup_ramp must be a bool, got {self.warmup_ramp!r}")
        for name in ("warmup_epochs", "search_epochs", "finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.max_grad_norm is not None:
            check_positive_finite(self.max_grad_norm, "max_grad_norm")
        self.search_settings(0)  # num_subnets, policy_lr, policy_temperature, tie_se
        budget = self.search_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise TypeError(f"search_budget must be an int or None, got {budget!r}")
        check_seed(self.seed)
        if self.searches:
            check_positive_int(self.k, "k")
        if self.warmup_epochs + self.search_epochs + self.finetune_epochs == 0:
            raise ValueError("at least one epoch of warm-up, search or fine-tuning is needed")
        return self

    def search_settings(self, scheduled_rounds: int) -> SearchSettings:
        """The estimator's :class:`~eas_kernels.search.SearchSettings` (checked)."""
        return SearchSettings(
            num_subnets=self.num_subnets,
            lr=self.policy_lr,
            temperature=self.policy_temperature,
            scheduled_rounds=scheduled_rounds,
            tie_se=self.tie_se,
        ).validate()


class WarmupCosine:
    """The learning-rate factor of step ``t`` of ``total``: linear warm-up over the first
    10 % of the steps, then cosine decay to 0 (a picklable ``LambdaLR`` function)."""

    def __init__(self, total: int) -> None:
        self.total, self.warmup = total, max(1, total // 10)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def answer_loss(model: nn.Module, batch: Batch, *, per_example: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens under teacher forcing; with
    ``per_example`` a ``(2, B)`` float64 tensor instead: each example's summed answer-token
    cross-entropy (row 0) and its answer tokens (row 1), whose ratio of sums is the mean."""
    logits = model(batch.tokens, **batch.model_kwargs())
    labels = batch.labels[:, 1:]
    if per_example:
        terms = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        return torch.stack([terms.double().sum(dim=1), counts.double()])
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def as_list(result: object) -> object:
    """A measurement's result as the history records it (a tensor as nested lists)."""
    return result.tolist() if isinstance(result, torch.Tensor) else result


def run_key_entries(run_key: Mapping[str, Any] | None) -> dict[str, Any]:
    """A caller's run-key entries (names → JSON-like values) as a dict; TypeError unless a
    mapping with str keys or None."""
    if run_key is not None and not (
        isinstance(run_key, Mapping) and all(isinstance(k, str) for k in run_key)
    ):
        raise TypeError(f"run_key must be a mapping with str keys, got {run_key!r}")
    return dict(run_key or {})


def answer_tokens(batch: Batch) -> int:
    """The answer tokens :func:`answer_loss` averages over (labels of positions 1..n-1)."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


class TuningInterrupted(KeyboardInterrupt):
    """SIGINT stopped :meth:`EASTuner.run` between two steps; ``checkpoint`` holds the run
    at ``step`` (None without a run folder) and the same run resumes from it."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no run folder, nothing saved"
        super().__init__(f"interrupted after step {step} ({where})")


class _StopRequest:
    """Turns the first SIGINT into a request honoured between steps (main thread only;
    elsewhere SIGINT keeps its usual effect). A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def example_fingerprint(examples: Sequence[Example]) -> str:
    """``"<n> examples, sha256 <12 hex>"`` of the examples' tokens and images, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(repr((example.prompt, example.answer)).encode())
        if example.image is not None:
            image = example.image.detach().cpu().contiguous()
            digest.update(repr((tuple(image.shape), str(image.dtype))).encode())
            digest.update(image.view(torch.uint8).numpy().tobytes())
    return f"{len(examples)} examples, sha256 {digest.hexdigest()[:12]}"


@dataclass
class TuningResult:
    """The chosen plan (and its arms), the estimator's final importance of every arm
    (higher = kept), its cost in held-out passes, and the history."""

    plan: SkipPlan
    arms: tuple[int, ...]
    scores: list[float]
    history: dict[str, list[Any]] = field(default_factory=dict)
    seconds: float = 0.0
    search_passes: int = 0
    search_seconds: float = 0.0
    distributed: dict[str, Any] = field(default_factory=lambda: Distributed().describe())

    def epoch_losses(self) -> list[dict[str, Any]]:
        """Mean training loss of each (phase, epoch) of the run, in order."""
        groups: dict[tuple[str, int], list[float]] = {}
        for step in self.history.get("steps", []):
            groups.setdefault((step["phase"], step["epoch"]), []).append(step["loss"])
        return [
            {"phase": phase, "epoch": epoch, "mean_loss": sum(losses) / len(losses)}
            for (phase, epoch), losses in groups.items()
        ]


class EASTuner:
    """Run the schedule of the module docstring on a patched ``model``.

    Args:
        model: patched with ``search=config.candidates``.
        train: training examples (non-empty).
        held_out: the held-out batch that scores subnets (all of it, one batch): non-empty
            when the configuration searches, else unused (may be empty).
        config: :class:`TuningConfig`.
        pad_id: padding token id of :func:`~eas_kernels.tuning.data.collate`.
        run_dir: folder of the checkpoint (None: no checkpoints).
        loss_fn: ``loss_fn(model, batch)``; default :func:`answer_loss`. An estimator that
            measures per example (``stable``) also calls ``loss_fn(model, batch,
            per_example=True)`` for a ``(2, B)`` tensor of each example's summed losses and
            their counts (refused at construction when ``loss_fn`` takes no such keyword).
        progress: called after every step with a dict (phase, epoch, step, loss, plan, ...).
        run_key: more entries of the run key (module docstring), checked before the
            configuration: names → JSON-like values (the command line passes ``--train``,
            ``--model``, ...).
        distributed: this process's place in a data-parallel run (None: the initialised
            process group, or one from ``torchrun``'s environment, or one process; see
            :func:`~.distributed.setup_distributed`). ``loss_fn`` must then be a mean over
            the batch's answer tokens (as :func:`answer_loss`): each rank's loss is
            weighted by its share of them.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Sequence[Example],
        held_out: Sequence[Example],
        config: TuningConfig,
        *,
        pad_id: int,
        run_dir: str | os.PathLike[str] | None = None,
        loss_fn: LossFunction = answer_loss,
        progress: Progress | None = None,
        run_key: Mapping[str, Any] | None = None,
        distributed: Distributed | None = None,
    ) -> None:
        if not isinstance(config, TuningConfig):
            raise TypeError(f"config must be a TuningConfig, got {type(config).__name__}")
        self.config = config.validate()
        patch = patch_of(model)
        self.candidates = Candidates(config.candidates, patch.plan.num_layers)
        if config.searches and patch.search != config.candidates:
            raise ValueError(
                f"model is patched with search={patch.search!r} but the tuning searches "
                f"candidates={config.candidates!r}: patch with search={config.candidates!r}"
            )
        if config.searches and not config.k < self.candidates.num_arms:
            raise ValueError(
                f"k must be smaller than the number of arms ({self.candidates.num_arms} "
                f"{config.candidates} candidates), got {config.k}"
            )
        if len(train) == 0:
            raise ValueError("train must hold at least one example")
        if config.searches and len(held_out) == 0:
            raise ValueError("held_out must hold at least one example (the search scores on it)")
        entries = run_key_entries(run_key)
        if distributed is not None and not isinstance(distributed, Distributed):
            raise TypeError(
                f"distributed must be a Distributed or None, got {type(distributed).__name__}"
            )
        self.distributed = setup_distributed() if distributed is None else distributed
        world = self.distributed.world_size
        if config.searches and len(held_out) < world:
            raise ValueError(
                f"held_out must hold at least one example per rank ({world}), got "
                f"{len(held_out)}: every rank scores its share of it"
            )
        self.model = model
        self.patch = patch
        self.train = list(train)
        # this rank's share of the held-out batch (all of it in one process)
        local = self.distributed.shard(list(held_out))
        self.held_out = collate(local, pad_id) if local else None
        self.held_out_size = len(held_out)
        self.run_key = {
            **entries,
            **asdict(self.config),
            "train": example_fingerprint(self.train),
            "held_out": example_fingerprint(list(held_out)),
        }
        self.pad_id = pad_id
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.loss_fn = loss_fn
        self.progress = progress
        self.parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.parameters:
            raise ValueError("model has no trainable parameters")
        self.distributed.check_same(
            "configuration, examples, patch or parameters",
            digest(
                self.run_key,
                patch.plan.to_dict(),
                patch.search,
                [(n, tuple(p.shape), str(p.dtype), p.requires_grad)
                 for n, p in model.named_parameters()],
                *self.parameters.values(),
            ),
        )  # fmt: skip
        self.train_model = self._data_parallel(model)
        # No estimator when nothing is searched: the plan is then the model's skip sets.
        self.fixed_plan = None if config.searches else patch.current_plan()
        self.search: Estimator | None = None
        # Measurements on the held-out batch, and the skip set of each training step; it
        # calls the tuner's loss_fn at each measurement (the attribute may be reassigned).
        self.scorer: HeldOutScorer | None = None
        if config.searches:
            score = lambda m, batch, **options: self.loss_fn(m, batch, **options)  # noqa: E731
            self.scorer = HeldOutScorer(model, self.held_out, self.candidates, score)
            rounds = config.search_epochs * self._steps_per_epoch() // config.eval_every
            estimator = estimator_class(config.estimator)
            if estimator.measures_per_example and not takes_keyword(loss_fn, "per_example"):
                raise TypeError(
                    f"the {config.estimator} estimator measures per example: loss_fn must "
                    "take per_example=True and then return a (2, B) tensor of each example's "
                    "summed losses and their counts, as answer_loss does"
                )
            self.search = estimator(
                self.candidates.num_arms,
                config.k,
                budget=config.search_budget,
                seed=config.seed,
                settings=config.search_settings(rounds),
            )
        self.history: dict[str, list[Any]] = {"steps": [], "updates": []}
        self.position = {"phase": 0, "epoch": 0, "batch": 0, "step": 0, "search_step": 0}
        self.elapsed = 0.0
        self.optimizer, self.scheduler = self._optimizer(0)

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """The module a training step calls, when the run has several ranks: ``model`` in
        DDP over its trainable parameters (frozen weights and buffers are each rank's own:
        nothing to synchronise), or sharded in place by FSDP2 (:meth:`_shard`)."""
        if not self.distributed.active:
            return model
        if self.distributed.sharding == "fsdp2":
            return self._shard(model)
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        device = next(iter(self.parameters.values())).device
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # the arms a step does not skip get no gradient
            broadcast_buffers=False,
        )

    def _shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: ``fully_shard`` every decoder block (its frozen weights with its PIAs),
        then the model (embeddings, norm, head, and whatever else it holds). Parameters
        become ``DTensor`` shards; a block's are gathered for its forward and backward.
        A PIA that no rank used keeps no gradient (FSDP2 reduce-scatters only the
        gradients that exist), as in one process."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(iter(self.parameters.values())).device
        mesh = init_device_mesh(device.type, (self.distributed.world_size,))
        for block in self.patch.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return model

    def _full_trainables(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's whole value (FSDP2 shards gathered: every rank
        calls this)."""
        return {n: full_tensor(p.detach()).clone() for n, p in self.parameters.items()}

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict; under FSDP2 the whole (gathered) state keyed by
        parameter name (every rank calls this)."""
        if self.distributed.strategy != "fsdp2":
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _optimizer_loader(self, optimizer: torch.optim.Optimizer) -> Callable[[Any], None]:
        """What loads a checkpoint's optimizer state into ``optimizer``."""
        if self.distributed.strategy != "fsdp2":
            return optimizer.load_state_dict
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        return lambda state: set_optimizer_state_dict(
            self.model, optimizer, optim_state_dict=state, options=options
        )

    # ------------------------------------------------------------------ schedule pieces
    def _steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)

    def _epochs(self, phase: int) -> int:
        return getattr(self.config, f"{PHASES[phase]}_epochs")

    def _optimizer(
        self, phase: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the trainable parameters for the phase group starting at ``phase``."""
        epochs = self._epochs(0) + self._epochs(1) if phase < 2 else self._epochs(2)
        total = max(1, epochs * self._steps_per_epoch())
        optimizer = torch.optim.AdamW(self.parameters.values(), lr=self.config.lr, weight_decay=0.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total))

    def _order(self, phase: int, epoch: int) -> list[int]:
        seed = (self.config.seed * 1_000_003 + phase * 1009 + epoch) % SEED_LIMIT
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.train), generator=generator).tolist()

    def final_plan(self) -> SkipPlan:
        """The estimator's plan (its k least important arms skipped), or the model's
        skip sets when nothing is searched."""
        if self.search is None:
            return self.fixed_plan
        return self.candidates.plan(self.search.plan(), self.patch.plan)

    def _use_final_plan(self) -> None:
        plan = self.final_plan()
        self.patch.set_skipped(plan.skipped, plan.skipped_ffns)

    # ------------------------------------------------------------------ one step
    def _train_step(self, examples: Sequence[Example]) -> float:
        """One optimizer step on the global batch ``examples`` (this rank's shard of it);
        the global batch's loss."""
        local = self.distributed.shard(examples)
        batch = collate(local or list(examples[:1]), self.pad_id)  # an empty shard: weight 0
        self.train_model.train()
        loss = self.loss_fn(self.train_model, batch)
        reported, scaled = loss.detach(), loss
        if self.distributed.active:
            tokens = answer_tokens(batch) if local else 0
            total = self.distributed.all_sum(
                torch.stack([reported.double() * tokens, reported.new_tensor(tokens).double()])
            )
            reported = total[0] / total[1]
            scaled = loss * (tokens * self.distributed.world_size / float(total[1]))
        if not torch.isfinite(reported):
            raise FloatingPointError(
                f"training diverged: the loss is {reported.item()} at step "
                f"{self.position['step'] + 1} ({PHASES[self.position['phase']]}); "
                f"lower lr (now {self.config.lr})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        limit = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(
            self.parameters.values(), math.inf if limit is None else limit
        )
        self.optimizer.step()
        self.scheduler.step()
        self._check_finite_parameters()
        self.grad_norm = float(full_tensor(norm))
        return float(reported.item())

    def _check_finite_parameters(self) -> None:
        """Refuse (FloatingPointError) trainable parameters that a step made NaN/Inf, so
        that no checkpoint holds them (one host sync per device)."""
        name = first_non_finite(list(self.parameters.items()))
        if name is not None:
            raise FloatingPointError(
                f"training diverged: step {self.position['step'] + 1} made {name} NaN or Inf; "
                f"lower lr (now {self.config.lr})"
            )

    def _search_round(self) -> dict[str, Any] | None:
        """One round of the estimator (None when it is finished): measured, told, and
        recorded in ``history['updates']``."""
        started = time.perf_counter()
        round = self.search.ask()
        if not round:
            return None
        results = self._measured(round)
        self.search.tell(round, results)
        update = {
            "step": self.position["step"],
            "measurements": [{"kind": m.kind, "arms": list(m.arms)} for m in round],
            "results": [as_list(r) for r in results],
            "losses": [loss_of(r) for m, r in zip(round, results, strict=True) if m.kind != COSINE],
            "scores": self.search.importance().tolist(),
            "passes": self.search.passes,
        }
        self.history["updates"].append(update)
        # Wall time apart from the updates, which are a function of the run's inputs.
        self.history.setdefault("search_seconds", []).append(time.perf_counter() - started)
        return update

    def _measured(self, round: Sequence[Measurement]) -> list[Any]:
        """The results of ``round`` on the whole held-out batch: each rank measures its
        share; means are weighted over the ranks, per-example results gathered."""
        local = [self.scorer(measurement) for measurement in round]
        means = [i for i, m in enumerate(round) if m.kind != EXAMPLES]
        results = list(local)
        combined = self.distributed.weighted_means(
            [local[i] for i in means], [self._weight(round[i]) for i in means]
        )
        for i, result in zip(means, combined, strict=True):
            results[i] = result
        for i, measurement in enumerate(round):
            if measurement.kind == EXAMPLES:
                results[i] = self.distributed.gather_columns(local[i], self.held_out_size)
        return results

    def _untuned_probes(self) -> None:
        """Measure what the estimator asks of the untuned model (before any step)."""
        probes = self.search.untuned_probes() if self.search is not None else []
        if probes:
            results = self._measured(probes)
            self.search.tell_untuned(probes, results)
            self.history["untuned"] = [
                {"kind": m.kind, "arms": list(m.arms), "result": as_list(r)}
                for m, r in zip(probes, results, strict=True)
            ]

    def _weight(self, measurement: Measurement) -> float:
        """How many items this rank's measurement averages: the held-out shard's answer
        tokens for a loss, its real tokens for the cosines."""
        if measurement.kind == COSINE:
            return float(self.held_out.attention_mask.sum())
        return float(answer_tokens(self.held_out))

    def _finish_search(self, started: float) -> None:
        """Run the estimator's remaining rounds back to back (checkpoint after each)."""
        while self._search_round() is not None:
            self.elapsed = time.perf_counter() - started
            self._save_checkpoint()

    def _warmup_size(self) -> int:
        """Skip-set size of the current warm-up step (module docstring)."""
        if not self.config.warmup_ramp:
            return self.config.k
        total = self.config.warmup_epochs * self._steps_per_epoch()
        return max(1, math.ceil(self.config.k * (self.position["step"] + 1) / total))

    # ------------------------------------------------------------------ run
    def run(
        self,
        *,
        resume: bool = True,
        halt_after_step: int | None = None,
        halt_signal: int = signal.SIGKILL,
    ) -> TuningResult:
        """Run (or, with ``resume`` and a checkpoint in ``run_dir``, continue) the schedule.

        ``halt_after_step`` sends ``halt_signal`` (SIGKILL by default) to this process
        right after that global step (tests use it to check that a killed or interrupted
        run resumes to the same result).
        """
        with self.distributed.failures_shared():
            if resume:
                self._load_checkpoint()
            with _StopRequest().installed() as stop:
                return self._run(stop, halt_after_step, halt_signal)

    def _run(
        self, stop: _StopRequest, halt_after_step: int | None, halt_signal: int
    ) -> TuningResult:
        started = time.perf_counter() - self.elapsed
        position = self.position
        if position["step"] == 0 and position["phase"] < 2:
            self._untuned_probes()
        while position["phase"] < len(PHASES):
            phase = position["phase"]
            if phase == 2:  # the plan is fixed (also when resuming inside fine-tuning)
                self._use_final_plan()
            while position["epoch"] < self._epochs(phase):
                order = self._order(phase, position["epoch"])
                size = self.config.batch_size
                while position["batch"] * size < len(order):
                    first = position["batch"] * size
                    self._step(phase, [self.train[i] for i in order[first : first + size]], started)
                    if halt_after_step is not None and position["step"] == halt_after_step:
                        os.kill(os.getpid(), halt_signal)
                    if self._stop_requested(stop):
                        self._interrupt(started)
                position["epoch"] += 1
                position["batch"] = 0
            if phase == 1 and self.search is not None:
                self._finish_search(started)
            position["phase"] += 1
            position["epoch"] = 0
            if position["phase"] == 2:
                self.optimizer, self.scheduler = self._optimizer(2)
            self.elapsed = time.perf_counter() - started
            self._save_checkpoint()
        self._use_final_plan()
        self.model.eval()
        return TuningResult(
            self.final_plan(),
            () if self.search is None else self.search.plan(),
            [] if self.search is None else self.search.importance().tolist(),
            self.history,
            time.perf_counter() - started,
            search_passes=0 if self.search is None else self.search.passes,
            search_seconds=sum(self.history.get("search_seconds", [])),
            distributed=self.distributed.describe(),
        )

    def _stop_requested(self, stop: _StopRequest) -> bool:
        """Whether any rank was asked to stop (every rank stops after the same step)."""
        if not self.distributed.active:
            return stop.requested
        return bool(self.distributed.all_sum(torch.tensor([float(stop.requested)])) > 0)

    def _step(self, phase: int, examples: Sequence[Example], started: float) -> None:
        position = self.position
        if phase == 0:
            arms = self.search.random_arms(self._warmup_size())
        elif phase == 1:
            arms = self.search.training_arms()
        else:
            arms = ()
        if phase < 2:
            self.scorer.set_arms(arms)
        loss = self._train_step(examples)
        position["batch"] += 1
        position["step"] += 1
        record: dict[str, Any] = {
            "step": position["step"],
            "phase": PHASES[phase],
            "epoch": position["epoch"],
            "loss": loss,
            "arms": list(arms),  # the skip set of a warm-up or search step
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm,  # before clipping
        }
        self.history["steps"].append(record)
        if phase == 1:
            position["search_step"] += 1
            if position["search_step"] % self.config.eval_every == 0:
                update = self._search_round()
                losses = [] if update is None else update["losses"]
                if losses:
                    record["held_out_loss"] = sum(losses) / len(losses)
        if self.progress is not None and self.distributed.is_main:
            self.progress({**record, "plan": self.final_plan()})
        if position["step"] % self.config.checkpoint_every == 0:
            self.elapsed = time.perf_counter() - started
            self._save_checkpoint()

    def _interrupt(self, started: float) -> None:
        self.elapsed = time.perf_counter() - started
        self._save_checkpoint()
        raise TuningInterrupted(self.position["step"], self._checkpoint_path())

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT_FILE

    def _save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, after every rank showed it holds the same
        estimator state and weights (the lockstep check)."""
        path = self._checkpoint_path()
        if path is None and not self.distributed.active:
            return
        trainable = self._full_trainables()
        if self.distributed.active:
            importance = () if self.search is None else (self.search.importance(),)
            self.distributed.check_same(
                f"estimator state or trainable weights at step {self.position['step']} "
                "(the ranks left lockstep)",
                digest(*importance, *trainable.values()),
            )
        optimizer = None if path is None else self._optimizer_state()
        if path is None or not self.distributed.is_main:
            self.distributed.barrier()
            return
        state = {
            "run_key": self.run_key,
            "position": dict(self.position),
            "elapsed": self.elapsed,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "search": None if self.search is None else self.search.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }
        save_atomically(state, path)
        self.distributed.barrier()

    def _load_checkpoint(self) -> None:
        """Resume from the checkpoint in ``run_dir``; every entry is checked, and the
        optimizer, schedule and estimator are rebuilt, before anything of the run changes."""
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return
        state = load_tensor_file(path, "tuner checkpoint", CHECKPOINT_KEYS)

        def refuse(reason: str) -> ValueError:
            return ValueError(f"{path} is not a usable tuner checkpoint: {reason}")

        check_run_key(path, self.run_key, state["run_key"])
        position = state["position"]
        if not (isinstance(position, dict) and set(position) == set(POSITION_KEYS)) or not all(
            type(position[k]) is int and position[k] >= 0 for k in POSITION_KEYS
        ):
            raise refuse(f"position must map {POSITION_KEYS} to ints >= 0, got {position!r}")
        if position["phase"] > len(PHASES):
            raise refuse(f"phase {position['phase']} is out of range")
        elapsed = checked_elapsed(state["elapsed"], refuse)
        trainable = checked_trainables(state["trainable"], self.parameters, refuse)
        rng = state["torch_rng"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise refuse("torch_rng is not a generator state")
        history = state["history"]
        if not (
            isinstance(history, dict)
            and all(isinstance(history.get(key), list) for key in ("steps", "updates"))
        ):
            raise refuse("history must hold the lists 'steps' and 'updates'")
        seconds = history.get("search_seconds", [])
        if not isinstance(seconds, list) or not all(
            type(value) is float and math.isfinite(value) and value >= 0 for value in seconds
        ):
            raise refuse("history['search_seconds'] must list seconds")
        optimizer, scheduler = self._optimizer(min(position["phase"], 2))
        search = None if self.search is None else copy.deepcopy(self.search)
        loads = [
            ("optimizer", self._optimizer_loader(optimizer)),
            ("scheduler", scheduler.load_state_dict),
            ("search", (lambda _: None) if search is None else search.load_state_dict),
            ("torch_rng", torch.Generator().set_state),
        ]
        load_entries(state, loads, refuse)
        # Everything checked: the run changes from here on.
        with torch.no_grad():
            for name, value in trainable.items():
                self.parameters[name].copy_(laid_out_as(value, self.parameters[name]))
        self.position = dict(position)
        self.elapsed = elapsed
        self.optimizer, self.scheduler = optimizer, scheduler
        self.search = search
        torch.set_rng_state(rng)
        self.history = history


def check_run_key(path: Path, expected: Mapping[str, Any], written: object) -> None:
    """Refuse (ValueError) a checkpoint at ``path`` whose run key is not ``expected``,
    naming the first entry that differs and both values."""
    if not isinstance(written, dict):
        raise ValueError(f"{path} is not a usable checkpoint: run_key is not a dict")
    for name, value in expected.items():
        if name not in written or written[name] != value:
            before = written.get(name, "(not recorded)")
            raise ValueError(
                f"{path} was written by a run with {name} = {before!r}; this run has "
                f"{name} = {value!r}. Use another run folder, or start afresh "
                "(resume=False, --no-resume)"
            )
    extra = sorted(set(written) - set(expected))
    if extra:
        raise ValueError(
            f"{path} was written by a run with other settings ({extra}); use another run "
            "folder, or start afresh (resume=False, --no-resume)"
        )


Refusal = Callable[[str], ValueError]


def checked_elapsed(elapsed: object, refuse: Refusal) -> float:
    """A checkpoint's ``elapsed`` seconds, or ``refuse``'s error."""
    if type(elapsed) not in (int, float) or not math.isfinite(elapsed) or elapsed < 0:
        raise refuse(f"elapsed must be a number of seconds, got {elapsed!r}")
    return float(elapsed)


def checked_trainables(
    trainable: object, parameters: Mapping[str, torch.Tensor], refuse: Refusal
) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable tensors when they are exactly ``parameters``' names, each a
    finite tensor of its parameter's shape and dtype; else ``refuse``'s error."""
    if not isinstance(trainable, dict) or set(trainable) != set(parameters):
        raise refuse("it holds other trainable parameters than this model's")
    for name, value in trainable.items():
        target = parameters[name]
        if not (
            isinstance(value, torch.Tensor)
            and value.shape == target.shape
            and value.dtype == target.dtype
            and bool(torch.isfinite(value).all())
        ):
            raise refuse(
                f"trainable {name} is not a finite {target.dtype} tensor of shape "
                f"{tuple(target.shape)}"
            )
    return trainable


def load_entries(
    state: Mapping[str, Any], loads: Sequence[tuple[str, Callable[[Any], object]]], refuse: Refusal
) -> None:
    """``load(state[entry])`` for each ``(entry, load)``, into objects the run does not use
    yet; a failure is ``refuse``'s error naming the entry."""
    for entry, load in loads:
        try:
            load(state[entry])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as error:
            reason = " ".join(str(error).split())
            raise refuse(f"{entry}: {type(error).__name__}: {reason}") from None
