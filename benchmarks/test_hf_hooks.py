"""What ``patch_hf``'s call hooks cost per decode call, against a whole decode step.

The real SmolLM2-135M-Instruct (Hugging Face layout), 6 MHAs skipped, merged, batch 1.
The root pre-hook (phase from the ``Cache``, prompt mask) and the first decoder layer's
pre-hook (the cross-check of the phase) run once per model call. Each is timed with
pytest-benchmark on the arguments of a real decode call of ``generate()``; ``extra_info``
records the median decode step measured in the same run and the hooks' share of it, with
versions and shapes. ``pytest benchmarks/test_hf_hooks.py --benchmark-only``. Nothing is
asserted about speed.
"""

from __future__ import annotations

import platform
import statistics
import time

import pytest
import torch

import eas_kernels as E

transformers = pytest.importorskip("transformers")
SKIPPED = [19, 21, 23, 25, 27, 29]


@pytest.fixture(scope="module")
def decode_call() -> dict:
    """The patched model, its call hook and the arguments of a decode call and of layer 0."""
    from eas_kernels.hf import _HFCallHook
    from eas_kernels.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    E.patch_hf(model, E.SkipPlan(30, SKIPPED))
    E.reparameterize(model, "merge")
    calls: dict[str, tuple] = {}

    def record(name: str):
        return lambda module, args, kwargs: calls.__setitem__(name, (args, dict(kwargs)))

    handles = [
        model.register_forward_pre_hook(record("root"), with_kwargs=True),
        model.model.layers[0].register_forward_pre_hook(record("layer"), with_kwargs=True),
    ]
    with torch.no_grad():
        model.generate(
            **tokenizer(["The capital of France is"], return_tensors="pt"),
            max_new_tokens=4,
            do_sample=False,
        )
    for handle in handles:
        handle.remove()
    hook = next(h for h in model._forward_pre_hooks.values() if isinstance(h, _HFCallHook))
    args, kwargs = calls["root"]
    steps = []
    with torch.no_grad():
        for _ in range(18):
            started = time.perf_counter()
            model(*args, **kwargs)
            steps.append(time.perf_counter() - started)
    return dict(model=model, hook=hook, calls=calls, step=statistics.median(steps[3:]))


def info(decode_call: dict) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct (HF), 6 of 30 MHAs skipped, merged, batch 1",
        "decode_step_ms": round(decode_call["step"] * 1e3, 3),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def test_root_call_hook(benchmark, decode_call):
    args, kwargs = decode_call["calls"]["root"]
    hook, model = decode_call["hook"], decode_call["model"]
    benchmark(hook, model, args, kwargs)
    benchmark.extra_info.update(info(decode_call))
    share = benchmark.stats.stats.median / decode_call["step"]
    benchmark.extra_info["share_of_decode_step"] = round(share, 6)


def test_first_layer_hook(benchmark, decode_call):
    args, kwargs = decode_call["calls"]["layer"]
    hook, layer = decode_call["hook"], decode_call["model"].model.layers[0]
    benchmark(hook.check_first_layer, layer, args, kwargs)
    benchmark.extra_info.update(info(decode_call))
    share = benchmark.stats.stats.median / decode_call["step"]
    benchmark.extra_info["share_of_decode_step"] = round(share, 6)
