"""Shared pieces of the native-kernel tests: instruction sets, poisoned outputs, error rule."""

from __future__ import annotations

import contextlib

import pytest
import torch

from eas_kernels import _native

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, *LOW_PRECISION)

requires_cpu_kernels = pytest.mark.skipif(
    _native.CPU is None, reason=f"eas_kernels._C is not built: {_native.CPU_ERROR}"
)


ISAS = list(_native.CPU.isas()) if _native.CPU is not None else []
HAS_CUDA_KERNELS = _native.CUDA is not None and torch.cuda.is_available()

# Where a kernel test runs: the CPU kernels of every instruction set this CPU can run
# (avx512, avx2, portable), and the CUDA kernels when a GPU is there.
KERNELS = [pytest.param(("cpu", name), id=name) for name in ISAS] + (
    [pytest.param(("cuda", None), id="cuda")] if HAS_CUDA_KERNELS else []
)


@contextlib.contextmanager
def on_kernels(kernels: tuple[str, str | None]):
    """Yield the device of ``kernels``; on the CPU, use that instruction set meanwhile."""
    device, isa = kernels
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
