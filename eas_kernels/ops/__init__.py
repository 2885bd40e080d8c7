"""The re-parameterisation ops (EAS_SPEC §4), one file per op.

Each file holds the plain PyTorch implementation that is the reference for the native
and Triton kernels of later issues; the dispatch to those kernels lives beside it.
"""

from .lowrank import add_lowrank, lowrank_factors
from .merge import merged_linear

__all__ = ["add_lowrank", "lowrank_factors", "merged_linear"]
