"""The re-parameterisation ops (EAS_SPEC §4), one file per op.

Each file holds the plain PyTorch reference (``*_reference``) and the function the runtime
calls, which dispatches CPU tensors to the C++ kernels (``eas_kernels._C``) and CUDA
tensors to the CUDA kernels (``eas_kernels._C_cuda``); see :func:`eas_kernels.backends`.
"""

from .lowrank import (
    add_lowrank,
    add_lowrank_reference,
    lowrank_factors,
    lowrank_factors_reference,
)
from .merge import (
    MergedTarget,
    free_pristine_buffers,
    merged_linear,
    merged_linear_reference,
    pristine_bytes,
)

__all__ = [
    "MergedTarget",
    "add_lowrank",
    "add_lowrank_reference",
    "free_pristine_buffers",
    "lowrank_factors",
    "lowrank_factors_reference",
    "merged_linear",
    "merged_linear_reference",
    "pristine_bytes",
]
