"""The re-parameterisation ops (EAS_SPEC §4), one file per op.

Each file holds the plain PyTorch reference (``*_reference``) and the function the runtime
calls, which dispatches CPU tensors to the C++ kernels (``eas_kernels._C``) and CUDA
tensors to the CUDA kernels (``eas_kernels._C_cuda``); see :func:`eas_kernels.backends`.

``pia_fused`` (PIA's fused Triton training kernels) needs triton and is imported only when
:func:`pia_backend` chooses it, so that ``import eas_kernels`` works without triton.
"""

import importlib.util
import os

import torch

from .lowrank import (
    LowrankAdd,
    add_lowrank,
    add_lowrank_reference,
    lowrank_factors,
    lowrank_factors_reference,
)
from .merge import (
    MergedTarget,
    MergeRefused,
    PreparedMerge,
    SiteMerge,
    free_merge_buffers,
    install_merged,
    merge_buffer_bytes,
    merge_sites,
    merged_linear,
    merged_linear_reference,
    products_from_factors,
    restore_merged,
)

PIA_BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pia_backend(u: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: what :meth:`eas_kernels.PIA.adapt` runs for ``u``.

    ``EAS_PIA_BACKEND`` chooses: ``auto`` (default) takes the fused kernels of
    :mod:`eas_kernels.ops.pia_fused` for CUDA tensors in fp16/bf16/fp32 when triton is
    installed, else the PyTorch reference; ``torch`` forces the reference; ``triton`` forces
    the kernels (any dtype, CPU tensors too when ``TRITON_INTERPRET=1`` was set before
    triton was imported) and raises when they cannot run. When ``EAS_PIA_BACKEND`` is
    unset, ``EAS_BACKEND=torch`` forces the reference too.
    """
    default = "torch" if os.environ.get("EAS_BACKEND") == "torch" else "auto"
    backend = os.environ.get("EAS_PIA_BACKEND", default)
    if backend not in PIA_BACKENDS:
        raise ValueError(f"EAS_PIA_BACKEND must be one of {PIA_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    triton_found = lambda: importlib.util.find_spec("triton") is not None
    if backend == "auto":
        usable = u.is_cuda and u.dtype in _TRITON_DTYPES and triton_found()
        return "triton" if usable else "torch"
    if not triton_found():
        raise RuntimeError(
            "EAS_PIA_BACKEND=triton but triton is not installed: `pip install triton`"
        )
    if not u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"EAS_PIA_BACKEND=triton on a {u.device.type} tensor: the Triton kernels run on "
            "CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before triton is "
            "imported"
        )
    return "triton"


__all__ = [
    "PIA_BACKENDS",
    "LowrankAdd",
    "MergeRefused",
    "MergedTarget",
    "PreparedMerge",
    "SiteMerge",
    "add_lowrank",
    "add_lowrank_reference",
    "free_merge_buffers",
    "install_merged",
    "lowrank_factors",
    "lowrank_factors_reference",
    "merged_linear",
    "merged_linear_reference",
    "pia_backend",
    "merge_buffer_bytes",
    "merge_sites",
    "products_from_factors",
    "restore_merged",
]
