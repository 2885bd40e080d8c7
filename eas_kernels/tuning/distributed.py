"""Data-parallel tuning on ``torch.distributed``: one search, N ranks (issue 18).

:class:`EASTuner` runs on every rank of a process group with the same model, examples and
configuration, and gives the result one process gives:

* **one global batch.** Every rank builds the same global batch (the batch order is a
  function of the seed) and trains on its shard, ``batch[rank::world_size]``. Its loss is
  weighted by its share of the global batch's answer tokens, so that the gradient DDP
  averages is the gradient of the global batch's token mean: the result does not depend on
  the number of ranks (up to float summation order). A rank whose shard is empty (a last
  batch smaller than the world) runs its forward on one example with weight 0, so that
  every rank takes part in every collective.
* **one search.** The estimator's generator is seeded identically on every rank, so every
  rank draws the same skip set at every step and the same measurements at every round.
  The held-out batch is sharded too: each measurement (a subnet's loss, or the cosine
  table) is the token-weighted mean over all ranks, one all-reduce per round, so every
  rank tells the estimator the same numbers. At every checkpoint the ranks compare a
  digest of the estimator's state and of the trainable weights, and a divergence raises
  ``RuntimeError`` naming the ranks.
* **unused parameters.** In warm-up and search steps the PIAs of arms that are not skipped
  get no gradient. The model is wrapped in DDP with ``find_unused_parameters=True``: DDP
  then leaves a parameter that no rank used without a gradient (AdamW skips it), exactly
  as one process does. A zero-weighted contribution of every parameter would instead give
  those parameters zero gradients, which AdamW turns into steps (its moments decay), so
  the result would differ from one process. The cost is one traversal of the autograd
  graph per step (benchmarks/RESULTS.md).
* **FSDP2** (``sharding="fsdp2"``), for models that do not fit on one device: every
  decoder block (its frozen weights with its PIAs) and then the rest of the model are
  sharded with ``fully_shard``, so a rank holds 1/N of every weight, plus one gathered
  block at a time. Gradients are reduce-scattered and averaged like DDP's, so the loss
  weighting above holds unchanged; a PIA that no rank used keeps no gradient. Checkpoints
  hold the gathered weights and optimizer state (a full state dict), so they resume under
  either strategy's layout of the same parameters. After the run the model stays sharded
  (``DTensor`` parameters; :func:`full_tensor` gathers one).
* **rank 0 writes**: checkpoints, progress, reports. Every rank reads the checkpoint to
  resume; the global batch does not depend on the world size, so a run may resume on
  another number of ranks.

A process group is used when one is initialised, or initialised here from ``torchrun``'s
environment (``WORLD_SIZE > 1``): ``gloo`` on CPU, ``nccl`` on CUDA, with a timeout on
collectives; a group initialised here is destroyed at the process's exit (one the caller
initialised stays the caller's to destroy). A rank that fails ends the others with its message
(:meth:`Distributed.failures_shared`), not a hang.
Before anything trains, every rank checks that the others run the same configuration,
examples, patch and trainable parameters (``ValueError`` on every rank, naming the ranks
that differ).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
FAILURE_KEY = "eas_kernels/failure/"  # + rank: the message of a rank that failed
SEEN_KEY = "eas_kernels/failure_seen"  # how many ranks read a failure
FAILURE_GRACE_SECONDS = 10.0  # how long a failed rank waits for the others to read it


class RankFailed(RuntimeError):
    """Another rank of the run failed; the message is its error."""


STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` (1: no process group),
    and how the model is spread over the ranks when there are several (``sharding``):
    ``"ddp"`` (a whole model per rank) or ``"fsdp2"`` (every decoder block and the rest of
    the model sharded with ``fully_shard``, frozen weights included)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    sharding: str = "ddp"

    def __post_init__(self) -> None:
        if self.sharding not in STRATEGIES:
            raise ValueError(f"sharding must be one of {STRATEGIES}, got {self.sharding!r}")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def strategy(self) -> str:
        return self.sharding if self.active else "single"

    def describe(self) -> dict[str, Any]:
        """What a report records of the setup."""
        return {"world_size": self.world_size, "backend": self.backend, "strategy": self.strategy}

    def shard(self, items: Sequence[Item]) -> list[Item]:
        """This rank's share of ``items``: ``items[rank::world_size]``."""
        return list(items[self.rank :: self.world_size])

    def gather_columns(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The ``(rows, total)`` float64 tensor whose columns ``rank::world_size`` are this
        rank's ``local`` columns (its :meth:`shard` of ``total`` items), in one all-reduce;
        ``local`` itself (float64) on one rank."""
        if not self.active:
            return local.detach().to("cpu", torch.float64)
        full = torch.zeros(local.shape[0], total, dtype=torch.float64)
        full[:, self.rank :: self.world_size] = local.detach().to("cpu", torch.float64)
        return self.all_sum(full)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks: a new float64 CPU tensor (reduced on the
        current CUDA device under ``nccl``, which reduces only CUDA tensors)."""
        if not self.active:
            return values.detach().to(torch.float64).cpu().clone()
        on_gpu = self.backend == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu"
        total = values.detach().to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.cpu()

    def weighted_means(self, values: Sequence[Any], weights: Sequence[float]) -> list[Any]:
        """Each of ``values`` (a float or a tensor, this rank's mean over ``weights[i]``
        items) as the mean over every rank's items, in one all-reduce; unchanged on one
        rank or for no values."""
        if not self.active or not values:
            return list(values)
        flat = [torch.as_tensor(v, dtype=torch.float64).flatten() for v in values]
        packed = torch.cat([f * w for f, w in zip(flat, weights, strict=True)])
        packed = torch.cat([packed, torch.tensor(list(weights), dtype=torch.float64)])
        total = self.all_sum(packed)
        sums, counts = total[: -len(values)], total[-len(values) :]
        result, start = [], 0
        for value, piece, count in zip(values, flat, counts, strict=True):
            mean = sums[start : start + piece.numel()] / count
            start += piece.numel()
            if isinstance(value, torch.Tensor):
                result.append(mean.reshape(value.shape).to(value.dtype))
            else:
                result.append(float(mean))
        return result

    def check_same(self, what: str, value: str) -> None:
        """Raise ``ValueError`` on every rank unless every rank passes the same ``value``."""
        if not self.active:
            return
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        groups: dict[str, list[int]] = {}
        for rank, seen in enumerate(gathered):
            groups.setdefault(seen, []).append(rank)
        if len(groups) > 1:
            parts = "; ".join(f"ranks {ranks}: {seen}" for seen, ranks in groups.items())
            raise ValueError(f"the ranks of this run differ in {what}: {parts}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def failures_shared(self) -> Iterator[None]:
        """Around a run on every rank: an exception on one rank ends every rank, each
        with that rank's message, and never a hang.

        The failing rank writes its message to the process group's store, then destroys
        its process group, which ends the collectives the others wait in; a rank whose
        collective fails reads the message and raises ``RankFailed("rank r of N failed:
        ...")``. The failing rank waits (at most ``FAILURE_GRACE_SECONDS``) until the
        others have read it, since rank 0 hosts the store. Known limit (torch 2.13, gloo):
        while a DDP wrapper holds the group, destroying (or aborting) it leaves its
        connections open, so the others' collectives end only when the failing process
        exits; when that process is rank 0, its store goes with it, and a rank that then
        finds the store gone raises :class:`RankFailed` saying so, with its own error,
        instead of rank 0's message. Interrupts pass through: a
        SIGINT stop is taken by every rank at the same step.
        """
        if not self.active:
            yield
            return
        store = _default_store()
        try:
            yield
        except Exception as error:
            if store is None:
                raise
            peer = self._failed_peer(store)
            if peer is not None:
                with contextlib.suppress(Exception):
                    store.add(SEEN_KEY, 1)
                rank, message = peer
                raise RankFailed(f"rank {rank} of {self.world_size} failed: {message}") from error
            try:
                store.set(f"{FAILURE_KEY}{self.rank}", f"{type(error).__name__}: {error}")
            except dist.DistError as lost:  # rank 0, which hosts the store, has ended
                raise RankFailed(
                    f"rank 0 of {self.world_size} ended before this rank (rank {self.rank}) "
                    f"could read why: the run's store is gone ({lost}); this rank's error: "
                    f"{type(error).__name__}: {error}"
                ) from error
            dist.destroy_process_group()  # the others' collectives fail now
            deadline = time.monotonic() + FAILURE_GRACE_SECONDS
            while time.monotonic() < deadline and store.add(SEEN_KEY, 0) < self.world_size - 1:
                time.sleep(0.05)
            raise

    def _failed_peer(self, store: dist.Store) -> tuple[int, str] | None:
        """(rank, message) of another rank that recorded a failure, if the store says so."""
        for rank in range(self.world_size):
            key = f"{FAILURE_KEY}{rank}"
            with contextlib.suppress(Exception):  # the store may be gone with rank 0
                if rank != self.rank and store.check([key]):
                    return rank, store.get(key).decode()
        return None


def _default_store() -> dist.Store | None:
    """The default process group's store (a private accessor of torch: None without it)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return None if getter is None else getter()
    except (RuntimeError, ValueError):
        return None


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of an FSDP2-sharded ``DTensor`` (a collective: every rank calls it);
    any other tensor as is."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def laid_out_as(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``parameter``: sharded like an FSDP2
    ``DTensor`` parameter (the inverse of :func:`full_tensor`), or as is."""
    mesh = getattr(parameter, "device_mesh", None)
    if mesh is None:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(parameter.device), mesh, parameter.placements)


def digest(*parts: Any) -> str:
    """A short SHA-256 of ``parts`` (tensors by their bytes, the rest by ``repr``)."""
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor = part.detach().cpu().contiguous()
            hasher.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
            hasher.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            hasher.update(repr(part).encode())
    return hasher.hexdigest()[:16]


def setup_distributed(
    sharding: str = "ddp", timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> Distributed:
    """The process group in use: an initialised one, one initialised from ``torchrun``'s
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; ``gloo``, or
    ``nccl`` when CUDA is available), or none (one process); ``sharding`` as in
    :class:`Distributed`."""
    if sharding not in STRATEGIES:
        raise ValueError(f"sharding must be one of {STRATEGIES}, got {sharding!r}")
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), dist.get_backend(), sharding)
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {world!r}")
    if int(world) == 1:
        return Distributed()
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE is {world} but this torch build has no torch.distributed: run one "
            "process, or install a torch with distributed support"
        )
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: launch with torchrun "
            "(or accelerate launch), or initialise the process group yourself"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    atexit.register(_destroy_group_at_exit)
    return Distributed(dist.get_rank(), dist.get_world_size(), backend, sharding)


def _destroy_group_at_exit() -> None:
    """Destroy the process group :func:`setup_distributed` initialised, at exit, while the
    interpreter is whole (a no-op when it is destroyed already). Left to the interpreter's
    finalisation, gloo's worker threads may still hold work whose release needs the GIL, and
    the process aborts with "terminate called without an active exception" (SIGABRT) after
    a run that succeeded (pytorch/pytorch#190489)."""
    if dist.is_initialized():
        dist.destroy_process_group()
