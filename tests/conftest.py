"""Fixtures shared across test modules."""

from __future__ import annotations

import os

import pytest
import torch

# The fused PIA kernels (eas_kernels/ops/pia_fused.py) are Triton kernels: without a GPU
# they run in Triton's interpreter, which must be chosen before triton is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smollm2_hf() -> tuple:
    """The real SmolLM2-135M-Instruct (Hugging Face layout) and its tokenizer, loaded once.

    Tests must not modify it: copy it (``copy.deepcopy``) before patching or training.
    """
    from eas_kernels.models.smollm2 import load_smollm2

    return load_smollm2()
