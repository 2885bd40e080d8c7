"""Shared pieces of the native-kernel tests: instruction sets, poisoned outputs, error rules."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

from eas_kernels import _native
from tests.cuda_emulator import build as cuda_emulator

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, *LOW_PRECISION)

requires_cpu_kernels = pytest.mark.skipif(
    _native.CPU is None, reason=f"eas_kernels._C is not built: {_native.CPU_ERROR}"
)


ISAS = list(_native.CPU.isas()) if _native.CPU is not None else []
HAS_CUDA_KERNELS = _native.CUDA is not None and torch.cuda.is_available()

# Where a kernel test runs: the CPU kernels of every instruction set this CPU can run
# (avx512, avx2, portable); the CUDA kernels' own source on the CPU, through the CUDA
# emulator (tests/cuda_emulator: every launch, barrier and warp operation as CUDA defines
# them, on host memory); and the CUDA kernels on a GPU (marked ``cuda``: what the GPU
# check, scripts/gpu_check.sh, selects with ``-m cuda``; skipped without a GPU).
CUDA_KERNELS = pytest.param(
    ("cuda", None),
    id="cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(
            not HAS_CUDA_KERNELS,
            reason="the CUDA kernels need a GPU and eas_kernels._C_cuda "
            f"({_native.CUDA_ERROR or 'built'}; GPUs: {torch.cuda.device_count()})",
        ),
    ],
)
EMULATED_CUDA_KERNELS = pytest.param(("emulated", None), id="cuda-emulated")
KERNELS = [pytest.param(("cpu", name), id=name) for name in ISAS] + [
    EMULATED_CUDA_KERNELS,
    CUDA_KERNELS,
]


@functools.cache
def emulated_cuda() -> ModuleType:
    """``_C_cuda`` built from csrc/cuda for the CUDA emulator (once per source version)."""
    module = cuda_emulator.load(Path(tempfile.gettempdir()) / "eas_kernels_cuda_emulator")
    assert module.build_info()["abi"] == _native.ABI_VERSION
    return module


@contextlib.contextmanager
def on_kernels(kernels: tuple[str, str | None]):
    """Yield the device of ``kernels``; on the CPU, use that instruction set meanwhile, or
    (``emulated``) send the native calls of CPU tensors to the emulated CUDA module, as
    device 0 on the default stream."""
    device, isa = kernels
    if device == "emulated":
        emulated = emulated_cuda()
        saved = _native.module, _native.launch_args
        _native.module = lambda device: emulated
        _native.launch_args = lambda device: (0, 0)
        try:
            yield torch.device("cpu")
        finally:
            _native.module, _native.launch_args = saved
        return
    if device != "cpu":
        yield torch.device(device)
        return
    previous = _native.CPU.isa()
    _native.CPU.set_isa(isa)
    try:
        yield torch.device("cpu")
    finally:
        _native.CPU.set_isa(previous)


class PoisonedTorch:
    """``torch`` whose ``empty`` returns NaN-filled tensors: outputs a kernel must write.

    Installed over an ops module's ``torch`` with ``monkeypatch.setattr``, so every buffer
    the op allocates for a kernel to fill (results, pristine copies, scratch) starts as NaN.
    """

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs) -> torch.Tensor:
        return torch.empty(*args, **kwargs).fill_(float("nan"))


def assert_within_twice_torch_error(
    ours: torch.Tensor, torch_same_dtype: torch.Tensor, exact: torch.Tensor, what: str
) -> None:
    """flash-attention's rule: max|ours - exact| <= 2 * max|torch in the same dtype - exact|."""
    ours_error = (ours.double() - exact).abs().max().item()
    torch_error = (torch_same_dtype.double() - exact).abs().max().item()
    assert ours_error <= 2 * torch_error, (what, ours_error, torch_error)


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def float32_gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float32 (u = 2^-24): a float32 result whose
    terms each went through at most n roundings has relative perturbations |theta| <= gamma_n.
    """
    return n * FLOAT32_UNIT_ROUNDOFF / (1 - n * FLOAT32_UNIT_ROUNDOFF)


def assert_float32_accumulation(
    ours: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    exact: torch.Tensor,
    magnitude: torch.Tensor,
    roundings: int,
    what: str,
) -> None:
    """A float32 result is correctly accumulated in float32; other dtypes: the 2x rule.

    ``exact`` is the same expression evaluated in float64 on the same inputs, ``magnitude``
    the sum of the absolute values of its terms (for a sum of products: the expression
    evaluated in float64 on the inputs' absolute values, e.g. ``|W| @ |beta|`` for
    ``W @ beta``), and ``roundings`` the most float32 roundings any term meets (a length-k
    dot product: k, in any order of summation, fused or not). Every element must satisfy

        |ours - exact| <= max(2 * max|torch_same_dtype - exact|, gamma_roundings * magnitude)

    i.e. flash-attention's rule, or else the standard error bound of float32 accumulation
    (Higham, Accuracy and Stability of Numerical Algorithms, §3.1 and Lemma 3.1), which
    holds for every summation order. PyTorch's own error, whose summation order depends on
    the host (MKL picks its AVX-512, AVX2 or SSE kernel per CPU), can be far below that
    bound, a fraction of an ulp; twice it is then not a guarantee any float32 kernel with
    another order meets. No ulp-of-|exact| rule: under cancellation |exact| is small and
    an ulp of it says nothing. float16 and bfloat16 results keep the 2x rule alone
    (:func:`assert_within_twice_torch_error`).
    """
    if ours.dtype != torch.float32:
        assert_within_twice_torch_error(ours, torch_same_dtype, exact, what)
        return
    ours_error = (ours.double() - exact).abs()
    torch_error = (torch_same_dtype.double() - exact).abs().max().item()
    bound = float32_gamma(roundings) * magnitude.double()
    allowed = bound.clamp(min=2 * torch_error)
    worst = int((ours_error - allowed).argmax())
    assert bool((ours_error <= allowed).all()), (
        what,
        f"|ours - exact| = {ours_error.flatten()[worst].item():.3g} at flat index {worst}",
        f"2 * torch error = {2 * torch_error:.3g}",
        f"gamma_{roundings} * magnitude there = {bound.flatten()[worst].item():.3g}",
    )
