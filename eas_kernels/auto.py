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

The costs are measured on this machine by :func:`measure_costs` — the PIAs and the
low-rank adds of one step, each between the targets' own matrix products as in a decode
step (the median of paired rounds); one merge and restore and one low-rank set-up (each
the best of two runs) — the first time ``auto`` decides for a batch size and skip set,
and kept by the runtime (a few hundred milliseconds on a 2-core CPU, once). The answer
length comes from :func:`eas_kernels.greedy_generate` and ``generate()`` of a
:func:`~eas_kernels.patch_hf` model (``max_new_tokens``), or from
:func:`eas_kernels.expected_new_tokens` around a decode loop of one's own. When it is
unknown, ``auto`` assumes a long answer: ``merge`` for batch 1, ``lowrank`` otherwise.
The choice is visible as :attr:`EASRuntime.auto_choice
<eas_kernels.runtime.EASRuntime.auto_choice>` and in a log line (logger ``eas_kernels``).
"""

from __future__ import annotations

import math
import statistics
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
PASS_ROUNDS = 5  # rounds of paired passes behind the per-step costs (measure_costs)


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


def _timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds one run of ``run`` takes (the device synchronised around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _best_of_two(run: Callable[[], object], device: torch.device) -> float:
    """The shorter of two timed runs of ``run`` (after one untimed), in seconds."""
    _timed(run, device)
    return min(_timed(run, device), _timed(run, device))


@torch.no_grad()
def measure_costs(runtime: EASRuntime, batch_size: int) -> ModeCosts:
    """Time each mode's work on the runtime's frozen states (it must hold states of
    ``batch_size`` examples, and no mode realised): nothing is left changed — a merge is
    restored, low-rank hooks are removed. A merge that would hold NaN/Inf raises
    ``ValueError``, as it would in ``merge`` mode.

    A per-step cost is measured where a decode step pays it: between the targets' own
    matrix products, which stream the layers' weights through the caches (and evict the
    adapters' small tensors). One *pass* runs every site's targets once, in layer order, on
    a one-token input: plain (``u``), eager (``u + PIA(u)`` first) and with the low-rank
    hooks installed, back to back; ``eager_step`` and ``lowrank_step`` are the median over
    :data:`PASS_ROUNDS` rounds of the eager and low-rank passes minus the plain one, and
    never less than the same work timed alone with warm caches (a lower bound, which also
    keeps a cost positive where the difference is within noise).
    Timed alone, the adapters' work underestimates what a decode step pays by 2.6–4.5×
    (``benchmarks/RESULTS.md``, answer length).
    """
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

    def targets_pass(adapt: bool) -> Callable[[], None]:
        def run() -> None:
            for site, u in zip(sites, inputs, strict=True):
                z = u + site.pia(u, state=site.state) if adapt else u
                for linear in site.targets:
                    linear(z)

        return run

    def eager_alone() -> None:
        for site, u in zip(sites, inputs, strict=True):
            site.pia(u, state=site.state)

    def merge_and_restore() -> None:
        runtime._merge_all()
        runtime.unrealize()

    hooks: list = []

    def lowrank_setup() -> None:
        hooks[:] = [pair for site in sites for pair in site.lowrank_hooks()]

    outputs = {}

    def lowrank_alone() -> None:
        for (linear, hook), u in zip(hooks, _inputs_of_targets(sites, inputs), strict=True):
            hook(linear, (u,), outputs[id(linear)])

    merge = _best_of_two(merge_and_restore, device) if batch_size == 1 else math.inf
    setup = _best_of_two(lowrank_setup, device)
    for linear, _ in hooks:
        outputs[id(linear)] = torch.zeros(
            batch_size, 1, linear.out_features, dtype=linear.weight.dtype, device=device
        )
    eager_passes, lowrank_passes = _paired_differences(
        targets_pass(False), targets_pass(True), sites, device
    )
    eager_step = max(eager_passes, _best_of_two(eager_alone, device))
    step = max(lowrank_passes, _best_of_two(lowrank_alone, device))
    return ModeCosts(eager_step, merge, setup, step)


def _paired_differences(
    plain: Callable[[], None],
    eager: Callable[[], None],
    sites: list,
    device: torch.device,
    rounds: int = PASS_ROUNDS,
) -> tuple[float, float]:
    """Seconds the eager pass and the pass with low-rank hooks take over the plain pass:
    the median over ``rounds`` rounds (after one untimed) of each round's differences, the
    three passes run back to back in every round, so that a host whose speed drifts moves
    all three alike. The low-rank hooks are installed for their pass only."""
    eager_over, lowrank_over = [], []
    for attempt in range(rounds + 1):
        base = _timed(plain, device)
        with_eager = _timed(eager, device)
        try:
            for site in sites:
                site.install_lowrank()
            with_lowrank = _timed(plain, device)
        finally:
            for site in sites:
                site.remove_lowrank()
        if attempt:
            eager_over.append(with_eager - base)
            lowrank_over.append(with_lowrank - base)
    return statistics.median(eager_over), statistics.median(lowrank_over)


def _inputs_of_targets(sites: list, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each site's input once per target, in the order of ``site.lowrank_hooks()``."""
    return [u for site, u in zip(sites, inputs, strict=True) for _ in site.targets]
