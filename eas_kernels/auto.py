"""Which re-parameterisation mode serves a prompt fastest: ``reparameterize(model, "auto")``.

After the prefill, the frozen PIAs of a patched model can be applied three ways
(EAS_SPEC §4), each with its own cost on top of the model without adapters:

* ``eager``: every decode step computes ``u + PIA(u; S)`` at each site — ``eager_step``
  per step;
* ``merge`` (batch 1): the PIAs are written into the weights once — ``merge`` per prompt
  (the merge at the first decode step; the restore at the next prefill swaps storage
  back and costs next to nothing) — and nothing per step;
* ``lowrank``: the factors ``F`` are built once per prompt (``lowrank_setup``) and every
  target adds ``κ F`` at every step (``lowrank_step``).

An answer of ``n`` new tokens has ``n - 1`` decode steps after the prefill (whose logits
give the first token), so :func:`choose_mode` takes the cheapest of

    eager     (n - 1) · eager_step
    merge     merge                                (batch 1 only)
    lowrank   lowrank_setup + (n - 1) · lowrank_step

The costs are measured on this machine by :func:`measure_costs` — the PIAs of one step,
one merge and restore, one low-rank set-up and its adds, each the best of two runs — the
first time ``auto`` decides for a batch size and skip set, and kept by the runtime
(tens of milliseconds, once). The answer length comes from :func:`eas_kernels.greedy_generate`
and ``generate()`` of a :func:`~eas_kernels.patch_hf` model (``max_new_tokens``), or from
:func:`eas_kernels.expected_new_tokens` around a decode loop of one's own. When it is
unknown, ``auto`` assumes a long answer: ``merge`` for batch 1, ``lowrank`` otherwise.
The choice is visible as :attr:`EASRuntime.auto_choice
<eas_kernels.runtime.EASRuntime.auto_choice>` and in a log line (logger ``eas_kernels``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .runtime import EASRuntime

# Ties go to the first: a merge costs nothing per step, and the low-rank path does not
# touch the weights.
_ORDER = ("merge", "lowrank", "eager")


@dataclass(frozen=True)
class ModeCosts:
    """Seconds, measured for one model, skip set and batch size (:func:`measure_costs`).

    Attributes:
        eager_step: the PIAs of every site for one decode step (one token per example).
        merge: one merge of every site and its restore (``math.inf`` above batch 1).
        lowrank_setup: the factors of every target, once per prompt.
        lowrank_step: the low-rank adds of every target for one decode step.
    """

    eager_step: float
    merge: float
    lowrank_setup: float
    lowrank_step: float

    def of(self, mode: str, decode_steps: int) -> float:
        """Seconds ``mode`` adds to a prompt whose answer has ``decode_steps`` decode steps."""
        if mode == "eager":
            return decode_steps * self.eager_step
        if mode == "merge":
            return self.merge
        return self.lowrank_setup + decode_steps * self.lowrank_step


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` chose for the current prompt, and from what."""

    mode: str
    decode_steps: int | None  # None: the answer length was unknown
    batch_size: int
    costs: ModeCosts | None  # None: nothing was measured (unknown length, or no step)


def choose_mode(decode_steps: int | None, batch_size: int, costs: ModeCosts | None) -> str:
    """The mode ``auto`` uses: a pure function of the decode steps expected after the
    prefill (None: unknown), the batch size and the measured costs.

    Unknown length: ``merge`` for batch 1, else ``lowrank`` (a long answer is assumed). No
    decode step: ``eager`` (nothing to prepare). Otherwise the cheapest of the table in
    the module docstring (``merge`` only for batch 1), ties in the order merge, lowrank,
    eager.
    """
    if decode_steps is None:
        return "merge" if batch_size == 1 else "lowrank"
    if decode_steps <= 0:
        return "eager"
    if costs is None:
        raise ValueError("choose_mode needs the measured costs when the length is known")
    modes = [mode for mode in _ORDER if mode != "merge" or batch_size == 1]
    return min(modes, key=lambda mode: costs.of(mode, decode_steps))


def _best_of_two(run: Callable[[], object], device: torch.device) -> float:
    """The shorter of two timed runs of ``run`` (after one untimed), in seconds."""
    times = []
    for attempt in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure_costs(runtime: EASRuntime, batch_size: int) -> ModeCosts:
    """Time each mode's work on the runtime's frozen states (it must hold states of
    ``batch_size`` examples, and no mode realised): nothing is left changed — a merge is
    restored, low-rank factors are dropped. A merge that would hold NaN/Inf raises
    ``ValueError``, as it would in ``merge`` mode."""
    sites = runtime.reparameterizable_sites
    if not sites:
        return ModeCosts(0.0, 0.0, 0.0, 0.0)
    device = sites[0].pia.down1.weight.device
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [
        torch.randn(
            batch_size, 1, site.pia.dim, generator=generator, device=device,
            dtype=site.pia.down1.weight.dtype,
        )
        for site in sites
    ]  # fmt: skip

    def eager() -> None:
        for site, u in zip(sites, inputs, strict=True):
            site.pia(u, state=site.state)

    def merge_and_restore() -> None:
        runtime._merge_all()
        runtime.unrealize()

    hooks: list = []

    def lowrank_setup() -> None:
        hooks[:] = [pair for site in sites for pair in site.lowrank_hooks()]

    outputs = {}

    def lowrank_step() -> None:
        for (linear, hook), u in zip(hooks, _inputs_of_targets(sites, inputs), strict=True):
            hook(linear, (u,), outputs[id(linear)])

    eager_step = _best_of_two(eager, device)
    merge = _best_of_two(merge_and_restore, device) if batch_size == 1 else math.inf
    setup = _best_of_two(lowrank_setup, device)
    for linear, _ in hooks:
        outputs[id(linear)] = torch.zeros(
            batch_size, 1, linear.out_features, dtype=linear.weight.dtype, device=device
        )
    step = _best_of_two(lowrank_step, device)
    return ModeCosts(eager_step, merge, setup, step)


def _inputs_of_targets(sites: list, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each site's input once per target, in the order of ``site.lowrank_hooks()``."""
    return [u for site, u in zip(sites, inputs, strict=True) for _ in site.targets]
