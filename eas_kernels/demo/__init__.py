"""The demo application: a LaVIN-style multimodal model tuned on easy-vqa.

Outside the library's core (``pia``, ``plan``, ``patch``, ``runtime``, ``ops``, ``search``
and the ``tuning`` trainer and data import nothing from here); the ``eas-kernels`` command
line and the paper recipes of ``python/`` use it.

* :mod:`.easy_vqa` — the easy-vqa records, images and examples, a word tokenizer;
* :mod:`.workload` — the language model (SmolLM2 or a tiny one) as a LaVIN-style MLLM, its
  vision tower trained from scratch and its projector aligned with the LLM's words, the
  train / held-out / test examples, tuned checkpoints.
"""
