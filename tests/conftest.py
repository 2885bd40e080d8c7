"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_hf() -> tuple:
    """The real SmolLM2-135M-Instruct (Hugging Face layout) and its tokenizer, loaded once.

    Tests must not modify it: copy it (``copy.deepcopy``) before patching or training.
    """
    from eas_kernels.models.smollm2 import load_smollm2

    return load_smollm2()
