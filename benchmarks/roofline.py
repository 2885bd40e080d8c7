"""Timing helpers, the machine's roofline (measured in the run that uses them) and
trained-looking adapters for the benchmarks.

``peak``: the rate of a large GEMM (float32; bfloat16 as well, for reference);
``bandwidth``: bytes read plus bytes written per second by a large copy. A kernel's floor
is ``max(flops / peak, bytes / bandwidth)``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import eas_kernels
from eas_kernels import _native

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    """Seconds of one call of ``fn`` (after ``setup``, untimed)."""
    if setup is not None:
        setup()
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def paired_medians(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    setup: Callable[[], object] | dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds of each variant, the variants interleaved round by round (in the
    dict's order); ``setup`` runs untimed before every call, one for all or one per name."""
    setups = setup if isinstance(setup, dict) else dict.fromkeys(variants, setup)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():
        timed(fn, setups[name])  # warm up
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, setups[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def paired_times(
    fn: Callable[[], object], reference: Callable[[], object], pairs: int
) -> tuple[list[float], list[float]]:
    """Seconds of ``fn`` and of ``reference``, run back to back ``pairs`` times."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(pairs):
        times[0].append(timed(fn))
        times[1].append(timed(reference))
    return times


def median_ratio(times: Sequence[float], reference_times: Sequence[float]) -> float:
    """Median of the pairwise ratios ``times[i] / reference_times[i]``."""
    return statistics.median(a / b for a, b in zip(times, reference_times, strict=True))


class FixedPositionDecoder:
    """Prefill ``prompt`` (``(B, n)``) and take one decode step (which realises the
    model's mode: the merge or the low-rank factors), then time single decode steps that
    always write position ``n``."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor) -> None:
        self.model = model
        self.position = prompt.shape[1]
        self.token = torch.full((prompt.shape[0], 1), 7, device=prompt.device)
        with torch.no_grad():
            model(prompt, start_pos=0)
            model(self.token, start_pos=self.position)

    @torch.no_grad()
    def step(self) -> None:
        self.model._num_real.fill_(self.position)  # the same position every round
        self.model(self.token, start_pos=self.position)


def _best(fn: Callable[[], object], repeats: int = 5) -> float:
    return min(timed(fn) for _ in range(repeats + 1))


def measure_roofline() -> dict[str, float]:
    n = 8192 if DEVICE.type == "cuda" else 4096
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=DEVICE).to(dtype)
        b = torch.randn(n, n, device=DEVICE).to(dtype)
        result[f"peak_{str(dtype)[6:]}_flops"] = 2 * n**3 / _best(lambda a=a, b=b: a @ b)
    source = torch.randn(64 * 2**20, device=DEVICE)  # 256 MiB of float32
    target = torch.empty_like(source)
    result["bandwidth_bytes"] = 2 * source.nbytes / _best(lambda: target.copy_(source))
    return result


def machine() -> dict[str, object]:
    if DEVICE.type == "cuda":
        name = torch.cuda.get_device_name(DEVICE)
    else:
        name = platform.processor() or platform.machine()
    return dict(
        device=name,
        threads=torch.get_num_threads(),
        cpu_isa=_native.CPU.isa() if _native.CPU is not None else None,
        torch=torch.__version__,
        eas_kernels=eas_kernels.__version__,
        load_average_1min=round(os.getloadavg()[0], 2),
    )


def randomize_trainables(model: torch.nn.Module, seed: int) -> None:
    """Give every trainable (adapter) parameter random non-zero values, as after tuning, so
    that merging and the low-rank path are not no-ops."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * 0.02
                parameter.copy_(noise.to(parameter))
