"""Run every native kernel once on small odd shapes, for ``compute-sanitizer`` (GPU check).

``python scripts/gpu_kernels_once.py --device cuda`` calls the merge (one site, then two
sites of different ranks in one call, the second time with the factors and the state given
instead of ``(W_u, β)``), the
low-rank factors and the low-rank add through their native backend, in fp32, fp16 and
bf16, and checks each result against the PyTorch reference (loosely: this is a memory and
race check, the precise comparisons are the tests'). Two shapes reach every launch
configuration of the CUDA kernels: rows of ``W`` 16-byte aligned (128-bit loads, d = 64) or
not (d = 45); the dots' column tiles of 16, 64 and 128 (twice: n = 142 > 128); the add's
blocks of 8 rows (2 rows) and of 32 (15 rows), with coefficients in one chunk of 64 and in
two. ``--device cpu`` runs the same on the CPU kernels (the dry run). Exits non-zero on any
mismatch or error.
"""

from __future__ import annotations

import argparse

import torch

from eas_kernels.ops import (
    SiteMerge,
    add_lowrank,
    add_lowrank_reference,
    lowrank_factors,
    lowrank_factors_reference,
    merge_sites,
    merged_linear,
    merged_linear_reference,
)

SHAPES = ((45, 3, 40), (64, 5, 70))  # (d, rank, the other site's and the factors' rank)


def with_factors(site: SiteMerge, generator: torch.Generator) -> tuple[SiteMerge, SiteMerge]:
    """``site`` with ``(W_u, β)`` mixed from a random up basis ``U`` and state
    ``(α₁, α₂, c)`` as a PIA mixes them, and the same merge given as the factors
    ``Fᵀ = W Uᵀ`` and the state (what the runtime passes)."""
    weight = site.weights[0]
    rank, d = site.down_weight.shape
    basis = torch.randn(2 * rank + 2, d, generator=generator) * 0.3
    alpha = torch.softmax(torch.randn(2, generator=generator), dim=0)
    c = torch.randn(rank, generator=generator) * 0.3
    up_mix = alpha[0] * basis[:rank] + alpha[1] * basis[rank : 2 * rank]
    beta = c @ up_mix + alpha[0] * basis[2 * rank] + alpha[1] * basis[2 * rank + 1]
    basis = basis.to(weight.device)
    mixed = site._replace(
        up_mix=up_mix.to(weight.device, weight.dtype), beta=beta.to(weight.device, weight.dtype)
    )
    factors = [(w.double() @ basis.double().t()).float().contiguous() for w in site.weights]
    mix = torch.cat([alpha, c]).to(weight.device)
    return mixed, site._replace(up_mix=None, beta=None, factors=factors, mix=mix)


def run(device: torch.device, dtype: torch.dtype, d: int, rank: int, wide: int) -> None:
    generator = torch.Generator().manual_seed(d)

    def randn(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    out = 37
    weights = [randn(out, d), randn(out + 6, d)]
    originals = [w.clone() for w in weights]
    biases = [randn(out), None]
    down, up, beta = randn(rank, d), randn(rank, d), randn(d)
    expected = [
        merged_linear_reference(w, b, down, up, beta) for w, b in zip(weights, biases, strict=True)
    ]
    merged = merged_linear(weights, biases, down, up, beta, backend="native")
    for target, (new_weight, new_bias) in zip(merged, expected, strict=True):
        torch.testing.assert_close(target.merged, new_weight, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(target.bias, new_bias, rtol=2e-2, atol=2e-2)
    for weight, value in zip(weights, originals, strict=True):
        assert torch.equal(weight, value), "a merge wrote its weights"
    other = SiteMerge(
        [randn(out - 4, d)], [randn(out - 4)], randn(wide, d), randn(wide, d), randn(d)
    )
    first = SiteMerge(weights, biases, down, up, beta)
    for given in (False, True):  # Q from W and (W_u, β), then from the factors and states
        sites = merged_sites = [first, other]
        if given:
            pairs = [with_factors(site, generator) for site in sites]
            sites, merged_sites = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        together = merge_sites(merged_sites, backend="native")
        for site, targets in zip(sites, together, strict=True):
            for weight, bias, target in zip(site.weights, site.biases, targets, strict=True):
                new_weight, new_bias = merged_linear_reference(
                    weight, bias, site.down_weight, site.up_mix, site.beta
                )
                torch.testing.assert_close(target.merged, new_weight, rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(target.bias, new_bias, rtol=2e-2, atol=2e-2)

    compute = torch.promote_types(dtype, torch.float32)
    for r in (rank, wide):
        basis = randn(2 * r + 2, d)
        factor = lowrank_factors(weights[0], basis, backend="native")
        reference = lowrank_factors_reference(weights[0], basis)
        torch.testing.assert_close(factor.float(), reference.float(), rtol=2e-2, atol=2e-2)
        for batch, tokens in ((3, 5), (2, 1)):
            alpha = torch.softmax(torch.randn(batch, 2, generator=generator), dim=-1)
            mix = torch.cat([alpha, torch.randn(batch, r, generator=generator) * 0.3], dim=1)
            mix = mix.to(device=device, dtype=compute)
            output, projected = randn(batch, tokens, out), randn(batch, tokens, r)
            reference = add_lowrank_reference(
                output.to(compute), projected.to(compute), mix, factor.to(compute)
            )
            result = add_lowrank(output, projected, mix, factor, backend="native")
            torch.testing.assert_close(result.float(), reference.float(), rtol=2e-2, atol=2e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = torch.device(parser.parse_args().device)
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in SHAPES:
                run(device, dtype, *shape)
                print(
                    f"{device} {dtype} (d, rank, other rank) {shape}: merge (one site, two "
                    "sites), factors, add: ok",
                    flush=True,
                )
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
