"""The native merge kernel (csrc/cpu/merge.h) against its PyTorch reference (EAS_SPEC §4)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import eas_kernels.ops.merge as merge_module
from eas_kernels import _native
from eas_kernels.ops import (
    free_merge_buffers,
    install_merged,
    merge_buffer_bytes,
    merged_linear,
    merged_linear_reference,
    products_from_factors,
    restore_merged,
)
from tests.helpers import same_bits
from tests.native_helpers import (
    DTYPES,
    KERNELS,
    PoisonedTorch,
    assert_float32_accumulation,
    assert_within_twice_torch_error,
    on_kernels,
    requires_cpu_kernels,
)

pytestmark = requires_cpu_kernels


def site(
    outs: list[int],
    dim: int,
    rank: int,
    dtype: torch.dtype,
    *,
    seed: int,
    bias: bool = True,
    device: torch.device | str = "cpu",
) -> dict:
    """Random targets of one site and a random PIA in ``dtype`` (as the runtime has them)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    return dict(
        weights=[randn(out, dim, scale=0.5) for out in outs],
        biases=[randn(out) if bias and i % 2 == 0 else None for i, out in enumerate(outs)],
        down_weight=randn(rank, dim, scale=0.3),
        up_mix=randn(rank, dim, scale=0.3),
        beta=randn(dim),
    )


def pia_args(s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return s["down_weight"], s["up_mix"], s["beta"]


def in_float64(*tensors: torch.Tensor | None, absolute: bool = False) -> list:
    """``tensors`` in float64 (their absolute values with ``absolute``); None stays None."""
    return [None if t is None else (t.double().abs() if absolute else t.double()) for t in tensors]


SHAPES = [  # (outs of the site's targets, d, r): odd sizes, tails of every vector width
    ([7], 13, 1),
    ([40, 24], 24, 5),
    ([33, 33, 17], 64, 64),
    ([97, 5], 131, 17),
    ([130, 64], 577, 32),
]


@pytest.mark.parametrize("outs, dim, rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_merge_matches_the_reference_with_poisoned_outputs(
    kernels, monkeypatch, outs, dim, rank, dtype
):
    with on_kernels(kernels) as device:
        s = site(outs, dim, rank, dtype, seed=dim + rank, device=device)
        before = [w.clone() for w in s["weights"]]
        monkeypatch.setattr(merge_module, "torch", PoisonedTorch())
        merged = merged_linear(s["weights"], s["biases"], *pia_args(s), backend="native")
        for i, (unchanged, bias, original) in enumerate(
            zip(s["weights"], s["biases"], before, strict=True)
        ):
            weight, new_bias = merged[i]
            assert same_bits(unchanged, original)  # a merge only reads the weights
            reference = merged_linear_reference(original, bias, *pia_args(s))
            exact = merged_linear_reference(*in_float64(original, bias, *pia_args(s)))
            # the same sums on absolute values: Σ|terms| of every element of W' and b'
            magnitude = merged_linear_reference(
                *in_float64(original, bias, *pia_args(s), absolute=True)
            )
            # W' = W + (W W_uᵀ) W_d1: d roundings in P, r in Δ, one adding W; b' = b + W βᵀ
            roundings = {"weight": dim + rank + 1, "bias": dim + 1}
            for name, ours, torch_own, exact_, magnitude_ in zip(
                ("weight", "bias"), (weight, new_bias), reference, exact, magnitude, strict=True
            ):
                assert_float32_accumulation(
                    ours, torch_own, exact_, magnitude_, roundings[name], f"{name} {i}"
                )
            if dtype == torch.float32:
                torch.testing.assert_close(weight, reference[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(new_bias, reference[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_targets_whose_rows_lie_in_wider_storage_merge_as_contiguous_ones(kernels, dtype):
    """Rows ``ld > d`` apart, 16-byte aligned (CUDA: 128-bit loads, with a tail shorter than
    one vector: d = 61) or not (one element in: scalar loads), give bitwise what the same
    weights give contiguous: the load path does not change the sums."""
    with on_kernels(kernels) as device:
        s = site([37, 16], 61, 9, dtype, seed=90, device=device)
        wide = [torch.zeros(w.shape[0], 72, dtype=dtype, device=device) for w in s["weights"]]
        aligned = [buffer[:, :61] for buffer in wide]
        shifted = [buffer[:, 1:62] for buffer in wide]
        expected = merged_linear(s["weights"], s["biases"], *pia_args(s), backend="native")
        expected = [(t.merged.clone(), t.bias.clone()) for t in expected]
        for views in (aligned, shifted):
            for view, weight in zip(views, s["weights"], strict=True):
                view.copy_(weight)
            free_merge_buffers()
            got = merged_linear(views, s["biases"], *pia_args(s), backend="native")
            for (weight, bias), target in zip(expected, got, strict=True):
                assert same_bits(target.merged, weight) and same_bits(target.bias, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ten_thousand_merge_restore_cycles_leave_weights_bitwise_identical(dtype):
    """Random states each cycle, swapped in and back as the runtime does
    (``install_merged``, ``restore_merged``)."""
    s = site([24, 40, 8], 32, 6, dtype, seed=11)
    weights = [torch.nn.Parameter(w, requires_grad=False) for w in s["weights"]]
    generator = torch.Generator().manual_seed(12)

    def merge() -> list:
        up_mix = (torch.randn(6, 32, generator=generator) * 0.3).to(dtype)
        beta = torch.randn(32, generator=generator).to(dtype)
        return merged_linear(weights, s["biases"], s["down_weight"], up_mix, beta)

    assert_cycles_restore_bitwise(weights, merge)


def assert_cycles_restore_bitwise(weights: list, merge) -> None:
    """10,000 cycles of ``merge()`` (a new state each time), its buffers swapped into
    ``weights`` and back: every cycle changes the weights, and they end bitwise."""
    snapshot = [w.clone() for w in weights]
    changed = 0
    for _ in range(10_000):
        merged = merge()
        pristine = [install_merged(w, t.merged) for w, t in zip(weights, merged, strict=True)]
        changed += not torch.equal(weights[0], snapshot[0])
        for weight, storage in zip(weights, pristine, strict=True):
            restore_merged(weight, storage)
    assert changed == 10_000
    for weight, original in zip(weights, snapshot, strict=True):
        assert same_bits(weight, original)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ten_thousand_prepared_merge_restore_cycles_leave_weights_bitwise_identical(dtype):
    """The runtime's path: one :class:`PreparedMerge` from kept factors, a new state
    written into its ``mix`` each cycle, the buffers swapped in and back."""
    s = site([24, 40, 8], 32, 6, dtype, seed=13)
    weights = [torch.nn.Parameter(w, requires_grad=False) for w in s["weights"]]
    factors, mix = given_factors(s, seed=14)
    prepared = merge_module.PreparedMerge(
        [merge_module.SiteMerge(weights, s["biases"], s["down_weight"], None, None, factors, mix)]
    )
    generator = torch.Generator().manual_seed(15)

    def merge() -> list:
        mix.copy_(torch.randn(mix.shape, generator=generator))
        return prepared.run()[0]

    assert_cycles_restore_bitwise(weights, merge)


# ---------------------------------------------------------------------- refusals
def refused(s: dict, match: str) -> None:
    before = [w.clone() for w in s["weights"]]
    with pytest.raises(ValueError, match=match):
        merged_linear(s["weights"], s["biases"], *pia_args(s), backend="native")
    for weight, original in zip(s["weights"], before, strict=True):
        assert same_bits(weight, original)


@pytest.mark.parametrize("kernels", KERNELS)
def test_fp16_overflow_of_the_product_is_refused_before_any_write(kernels):
    with on_kernels(kernels) as device:
        s = site([16, 8], 40, 4, torch.float16, seed=21, device=device)
        s["weights"][1][3, 5] = 20000.0  # the second target's W' overflows; the first is fine
        s["up_mix"][0, 5] = 4.0
        s["down_weight"][0, :] = 2.0
        reference, _ = merged_linear_reference(s["weights"][1], None, *pia_args(s))
        assert not torch.isfinite(reference).all()
        assert torch.isfinite(merged_linear_reference(s["weights"][0], None, *pia_args(s))[0]).all()
        refused(s, r"\(8, 40\) weight gives NaN or Inf in torch.float16")


@pytest.mark.parametrize("kernels", KERNELS)
def test_fp16_bias_overflow_is_refused(kernels):
    with on_kernels(kernels) as device:
        s = site([16], 40, 4, torch.float16, seed=22, device=device)
        s["beta"].fill_(3000.0)
        s["weights"][0][2].fill_(1.0)  # b' = b + W βᵀ = 120000 > 65504
        refused(s, "NaN or Inf in torch.float16")


@pytest.mark.parametrize("where", ["up_mix", "beta", "down_weight", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernels", KERNELS)
def test_non_finite_inputs_are_refused(kernels, where, value):
    with on_kernels(kernels) as device:
        s = site([12, 20], 24, 3, torch.bfloat16, seed=23, device=device)
        tensor = s["weights"][1] if where == "weight" else s[where]
        tensor.view(-1)[7] = value
        refused(s, "NaN or Inf in torch.bfloat16")


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_row_the_bound_cannot_clear_is_checked_exactly_and_merged(kernels):
    """max|W| = 40000 > 65504 / 2: the bound fails, the exact check finds W' finite."""
    with on_kernels(kernels) as device:
        s = site([9, 30], 21, 2, torch.float16, seed=24, device=device)
        s["weights"][1][4, 0] = 40000.0
        s["up_mix"].zero_()
        s["up_mix"][0, 1] = 1e-3  # tiny P: W' stays finite
        original = s["weights"][1].clone()
        reference = merged_linear_reference(original, None, *pia_args(s))[0]
        assert torch.isfinite(reference).all()
        merged = merged_linear(s["weights"], s["biases"], *pia_args(s), backend="native")
        exact = merged_linear_reference(original.double(), None, *[t.double() for t in pia_args(s)])
        assert_within_twice_torch_error(merged[1].merged, reference, exact[0], "weight")


# ---------------------------------------------------------------------- merged buffers
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_merged_buffers_are_kept_per_weight_reported_and_freed(backend):
    s = site([32, 16], 24, 4, torch.float32, seed=25)
    weights = [torch.nn.Parameter(w, requires_grad=False) for w in s["weights"]]
    free_merge_buffers()
    held_before = merge_buffer_bytes()
    first = merged_linear(weights, s["biases"], *pia_args(s), backend=backend)
    buffer_bytes = sum(w.nbytes for w in weights)
    assert merge_buffer_bytes() - held_before == buffer_bytes
    pointers = [target.merged.data_ptr() for target in first]
    again = merged_linear(weights, s["biases"], *pia_args(s), backend=backend)
    assert [target.merged.data_ptr() for target in again] == pointers  # kept, reused
    pristine = [install_merged(w, t.merged) for w, t in zip(weights, again, strict=True)]
    assert [w.data_ptr() for w in weights] == pointers
    assert free_merge_buffers() == 0  # swapped in: not freed
    while_merged = merged_linear(weights, s["biases"], *pia_args(s), backend=backend)
    for target, pointer in zip(while_merged, pointers, strict=True):
        assert target.merged.data_ptr() != pointer  # never the storage the weight reads
    for weight, storage in zip(weights, pristine, strict=True):
        restore_merged(weight, storage)
    assert free_merge_buffers() >= buffer_bytes
    assert merge_buffer_bytes() <= held_before


def test_a_swap_keeps_the_parameter_and_restores_its_storage_bitwise():
    linear = torch.nn.Linear(24, 16).requires_grad_(False)
    original = linear.weight.detach().clone()
    weight, storage = linear.weight, linear.weight.data
    s = site([16], 24, 4, torch.float32, seed=26)
    (target,) = merged_linear([linear.weight], [linear.bias], *pia_args(s))
    with torch.inference_mode():  # as in a generation under inference_mode
        pristine = install_merged(linear.weight, target.merged)
        assert linear.weight is weight and not linear.weight.is_inference()
        assert same_bits(linear.weight, target.merged) and same_bits(pristine, original)
        restore_merged(linear.weight, pristine)
    assert linear.weight is weight and linear.weight.data_ptr() == storage.data_ptr()
    assert same_bits(linear.weight, original) and not linear.weight.is_inference()


def test_a_merge_never_writes_its_weights():
    s = site([16], 8, 2, torch.float32, seed=27)
    version, original = s["weights"][0]._version, s["weights"][0].clone()
    merged_linear(s["weights"], s["biases"], *pia_args(s), backend="native")
    assert s["weights"][0]._version == version and same_bits(s["weights"][0], original)


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_a_clear_error():
    s = site([8, 8], 16, 2, torch.float32, seed=28)
    args = pia_args(s)
    w = s["weights"]
    cases = [
        (lambda: merged_linear(w[0], [None], *args), TypeError, "sequence"),
        (lambda: merged_linear([], [], *args), TypeError, "non-empty"),
        (lambda: merged_linear(w, [None], *args), ValueError, "2 weights but 1 biases"),
        (lambda: merged_linear([w[0], w[1].half()], [None, None], *args), TypeError, "dtype"),
        (
            lambda: merged_linear([w[0], torch.zeros(8, 15)], [None, None], *args),
            ValueError,
            "share d",
        ),
        (lambda: merged_linear([w[0].t()], [None], *args), ValueError, "unit stride"),
        (lambda: merged_linear([w[0][:, ::2]], [None], *args), ValueError, "unit stride"),
        (lambda: merged_linear([w[0]], [torch.zeros(7)], *args), ValueError, r"shape \(8,\)"),
        (lambda: merged_linear([w[0]], [torch.zeros(8).half()], *args), TypeError, "dtype"),
        (
            lambda: merged_linear([w[0]], [None], args[0][:, :5], *args[1:]),
            ValueError,
            "down_weight",
        ),
        (
            lambda: merged_linear([w[0]], [None], args[0], args[1][:1], args[2]),
            ValueError,
            "up_mix",
        ),
        (lambda: merged_linear([w[0]], [None], *args[:2], args[2][:3]), ValueError, "beta"),
        (
            lambda: merged_linear([w[0]], [None], *args[:2], args[2].to("meta")),
            ValueError,
            "device",
        ),
        (
            lambda: merged_linear([w[0].double()], [None], *args, backend="native"),
            TypeError,
            "native kernels take",
        ),
        (lambda: merged_linear(w, [None, None], *args, backend="cuda"), ValueError, "backend"),
    ]
    before = [x.clone() for x in w]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    for weight, original in zip(w, before, strict=True):
        assert same_bits(weight, original)


def test_the_native_kernels_refuse_to_run_under_autograd():
    weight = torch.nn.Parameter(torch.randn(8, 16))
    s = site([8], 16, 2, torch.float32, seed=29)
    with pytest.raises(RuntimeError, match="do not record gradients"):
        merged_linear([weight], [None], *pia_args(s), backend="native")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_the_same_weight_twice_is_refused_and_overlapping_inputs_merge(backend):
    """One weight twice would get one merged buffer for two targets: refused. Weights that
    overlap each other or the PIA's tensors are only read, so they merge as the reference."""
    s = site([12, 12], 16, 3, torch.float32, seed=5)
    weight = s["weights"][0]
    before = weight.clone()
    same = r"sites\[0\]\.weights\[0\] and sites\[0\]\.weights\[1\] are the same tensor"
    with pytest.raises(ValueError, match=same):
        merged_linear([weight, weight], [None, None], *pia_args(s), backend=backend)
    cases = [
        ([weight, weight[4:]], pia_args(s)),
        ([weight], (weight[:3], s["up_mix"], s["beta"])),
        ([weight], (s["down_weight"], s["up_mix"], weight[0])),
    ]
    for weights, args in cases:
        merged = merged_linear(weights, [None] * len(weights), *args, backend=backend)
        for target, source in zip(merged, weights, strict=True):
            expected, _ = merged_linear_reference(source, None, *args)
            torch.testing.assert_close(target.merged, expected, rtol=1e-5, atol=1e-5)
        assert same_bits(weight, before)


# ---------------------------------------------------------------------- many sites at once
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_many_sites_of_different_ranks_merge_in_one_call_as_each_alone(kernels, monkeypatch, dtype):
    """merge_sites (one native call): each site's result is bitwise what merged_linear
    gives for it alone, whatever the other sites' ranks and shapes."""
    with on_kernels(kernels) as device:
        shapes = [([33, 17, 40], 64, 3), ([97, 5], 64, 32), ([8], 64, 1)]
        sites = [
            merge_module.SiteMerge(
                *site(outs, dim, rank, dtype, seed=60 + i, device=device).values()
            )
            for i, (outs, dim, rank) in enumerate(shapes)
        ]
        alone = [
            [(t.merged.clone(), t.bias.clone()) for t in merged_linear(*s, backend="native")]
            for s in sites
        ]
        free_merge_buffers()
        monkeypatch.setattr(merge_module, "torch", PoisonedTorch())
        together = merge_module.merge_sites(sites, backend="native")
        for expected, got in zip(alone, together, strict=True):
            for (weight, bias), target in zip(expected, got, strict=True):
                assert same_bits(target.merged, weight) and same_bits(target.bias, bias)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_refusal_names_its_site_and_sites_must_agree(backend):
    sites = [
        merge_module.SiteMerge(*site([12, 8], 16, r, torch.float16, seed=70 + r).values())
        for r in (2, 3, 4)
    ]
    sites[1].beta.fill_(30000.0)  # b' = b + W βᵀ overflows fp16 in the second site
    weights = [w for s in sites for w in s.weights]
    before = [w.clone() for w in weights]
    with pytest.raises(merge_module.MergeRefused, match="NaN or Inf in torch.float16") as caught:
        merge_module.merge_sites(sites, backend=backend)
    assert caught.value.site == 1
    assert all(same_bits(w, b) for w, b in zip(weights, before, strict=True))
    narrow = merge_module.SiteMerge(*site([4], 8, 2, torch.float16, seed=79).values())
    with pytest.raises(ValueError, match=r"sites\[1\] has weights of width, dtype and device"):
        merge_module.merge_sites([sites[0], narrow], backend=backend)
    twice = sites[2]._replace(weights=[sites[0].weights[1], sites[2].weights[1]], biases=[None] * 2)
    with pytest.raises(ValueError, match=r"sites\[0\]\.weights\[1\] and sites\[1\]\.weights\[0\]"):
        merge_module.merge_sites([sites[0], twice], backend=backend)
    with pytest.raises(TypeError, match="non-empty sequence of SiteMerge"):
        merge_module.merge_sites([], backend=backend)


def test_up_rows_are_read_in_place_only_when_beta_follows_w_u_in_float32():
    rows = torch.randn(4, 5, 16)
    up_mix, beta = rows[1, :-1], rows[1, -1]
    in_place = merge_module._up_rows(up_mix, beta)
    assert in_place.data_ptr() == up_mix.data_ptr() and torch.equal(in_place, rows[1])
    for up_mix, beta in [
        (rows[1, :-1], rows[2, -1]),  # another row's beta
        (rows[1, :-1].double(), rows[1, -1].double()),  # not float32
        (rows[1, :-1].clone(), rows[1, -1].clone()),  # separate buffers
    ]:
        copied = merge_module._up_rows(up_mix, beta)
        assert copied.data_ptr() != up_mix.data_ptr()
        assert torch.equal(copied, torch.cat([up_mix, beta[None]]).float())


# ---------------------------------------------------------------------- given factors
def given_factors(s: dict, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random non-zero factors ``Fᵀ`` ``(out, 2r + 2)`` per target and a random state
    ``mix = (α₁, α₂, c)`` ``(r + 2,)``, float32 — not ``W Uᵀ`` for the site's ``(W_u, β)``,
    so a kernel that computed ``Q`` from ``W`` instead of reading them would be caught."""
    generator = torch.Generator().manual_seed(seed)
    rank = s["down_weight"].shape[0]
    device = s["weights"][0].device
    factors = [
        (torch.randn(w.shape[0], 2 * rank + 2, generator=generator) * 0.5).to(device)
        for w in s["weights"]
    ]
    alpha = torch.softmax(torch.randn(2, generator=generator), dim=0)
    mix = torch.cat([alpha, torch.randn(rank, generator=generator) * 0.5]).to(device)
    return factors, mix


def merged_from_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    factors: torch.Tensor,
    mix: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W + P W_d1`` and ``b + Q[:, r]`` for ``Q = [P | ·]`` from the factors and the mix
    (:func:`products_from_factors`), in ``weight``'s dtype; float32 accumulation, float64
    in, float64 out."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    rank = down.shape[0]
    q = products_from_factors(factors.to(compute), mix.to(compute))
    new_weight = torch.addmm(weight.to(compute), q[:, :rank], down.to(compute))
    new_bias = q[:, rank] + (0 if bias is None else bias.to(compute))
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


@pytest.mark.parametrize("outs, dim, rank", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", KERNELS)
def test_given_factors_are_read_instead_of_computing_q_from_w(
    kernels, monkeypatch, outs, dim, rank, dtype
):
    """With ``factors`` and ``mix``, W' = W + P W_d1 and b' = b + Q[:, r] for
    ``Q = [P | P cᵀ + α₁ a₁ + α₂ a₂]``, ``P = α₁ A + α₂ C`` of the factors given."""
    with on_kernels(kernels) as device:
        s = site(outs, dim, rank, dtype, seed=dim + 2 * rank, device=device)
        factors, mix = given_factors(s, seed=dim)
        monkeypatch.setattr(merge_module, "torch", PoisonedTorch())
        merged = merged_linear(
            s["weights"], s["biases"], *pia_args(s), factors, mix, backend="native"
        )
        down = s["down_weight"]
        targets = zip(s["weights"], s["biases"], factors, strict=True)
        for i, (weight, bias, f) in enumerate(targets):
            reference = merged_from_factors(weight, bias, down, f, mix)
            exact = merged_from_factors(*in_float64(weight, bias, down, f, mix))
            magnitude = merged_from_factors(*in_float64(weight, bias, down, f, mix, absolute=True))
            # P: 2 roundings; W': r terms and W; b': r terms, α₁ a₁, α₂ a₂ and b
            for name, ours, torch_own, exact_, magnitude_, roundings in zip(
                ("weight", "bias"), merged[i], reference, exact, magnitude, (rank + 3, rank + 5),
                strict=True,
            ):  # fmt: skip
                assert_float32_accumulation(ours, torch_own, exact_, magnitude_, roundings, name)


@pytest.mark.parametrize(
    "where, refused", [("factors", "24, 24"), ("mix", "40, 24"), ("weight", "24, 24")]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernels", KERNELS)
def test_non_finite_factors_or_weights_are_refused_with_factors_given(
    kernels, where, refused, value
):
    with on_kernels(kernels) as device:
        s = site([40, 24], 24, 5, torch.float32, seed=7, device=device)
        factors, mix = given_factors(s, seed=8)
        if where == "mix":
            mix[0] = value
        else:
            (factors if where == "factors" else s["weights"])[1][3, 2] = value
        before = [w.clone() for w in s["weights"]]
        with pytest.raises(ValueError, match=rf"\({refused}\) weight gives NaN or Inf"):
            merged_linear(s["weights"], s["biases"], *pia_args(s), factors, mix, backend="native")
        assert all(same_bits(w, b) for w, b in zip(s["weights"], before, strict=True))


def test_bad_factors_are_refused_with_a_clear_error():
    s = site([40, 24], 24, 5, torch.float32, seed=9)
    good, mix = given_factors(s, seed=10)
    cases = [
        (good[0], mix, TypeError, "factors must be a sequence"),
        (good[:1], mix, ValueError, "got 2 weights but 1 factors"),
        ([good[0], good[1][:, :5]], mix, ValueError, r"factors\[1\] must have shape \(24, 12\)"),
        ([good[0], good[1].double()], mix, TypeError, r"factors\[1\]"),
        ([good[0], good[1].t().contiguous().t()], mix, ValueError, r"factors\[1\] must"),
        (good, None, ValueError, r"mix is needed with factors: the state \(α₁, α₂, c\)"),
        (good, mix[:-1], ValueError, r"mix must have shape \(7,\)"),
        (good, mix.double(), TypeError, "mix"),
        (None, mix, ValueError, "mix is given without factors"),
    ]
    for factors, state, error, message in cases:
        with pytest.raises(error, match=message):
            merged_linear(s["weights"], s["biases"], *pia_args(s), factors, state, backend="native")


@pytest.mark.parametrize("kernels", [*KERNELS, None])  # None: the torch backend, on the CPU
def test_with_factors_the_mixed_up_projection_may_be_left_out(kernels):
    """Nothing reads ``(W_u, β)`` when every target gives its factors: the same merge
    without them; without either, a clear error."""
    backend = "torch" if kernels is None else "native"
    place = contextlib.nullcontext(torch.device("cpu")) if kernels is None else on_kernels(kernels)
    with place as device:
        s = site([40, 24], 24, 5, torch.float32, seed=11, device=device)
        factors, mix = given_factors(s, seed=12)
        args = (s["weights"], s["biases"], s["down_weight"])
        with_rows = [
            (t.merged.clone(), t.bias.clone())
            for t in merged_linear(*args, s["up_mix"], s["beta"], factors, mix, backend=backend)
        ]
        free_merge_buffers()
        without = merged_linear(*args, None, None, factors, mix, backend=backend)
        for (weight, bias), target in zip(with_rows, without, strict=True):
            if backend == "native":  # both read the factors
                assert same_bits(target.merged, weight) and same_bits(target.bias, bias)
        for w, b, f, target in zip(s["weights"], s["biases"], factors, without, strict=True):
            expected = merged_from_factors(w, b, s["down_weight"], f, mix)
            torch.testing.assert_close(target.merged, expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(target.bias, expected[1], rtol=1e-5, atol=1e-5)
        for up_mix, beta, given in [(None, None, None), (s["up_mix"], None, factors)]:
            with pytest.raises(ValueError, match="up_mix and beta are both needed"):
                merged_linear(*args, up_mix, beta, given, mix if given else None, backend=backend)


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_binding_refuses_a_target_without_what_it_reads(kernels):
    """Below the Python checks, the modules' bindings (csrc/binding.h) refuse a target
    with factors whose site has no mix, and one without factors whose site has no up rows."""
    with on_kernels(kernels) as device:
        s = site([4], 8, 2, torch.float32, seed=13, bias=False, device=device)
        weight = s["weights"][0]
        merged, new_bias = torch.empty_like(weight), torch.empty(4, device=device)
        factors, scratch = torch.randn(4, 6, device=device), torch.empty(64, device=device)
        down = s["down_weight"].data_ptr()
        for given, message in [(factors.data_ptr(), "needs its site's mix"), (0, "up rows")]:
            target = _native.merge_target(
                weight=weight.data_ptr(), out=4, ld=8, merged=merged.data_ptr(), bias=0,
                new_bias=new_bias.data_ptr(), site=0, factors=given,
            )  # fmt: skip
            no_rows = _native.merge_site(up=0, down=down, rank=2, mix=0)
            with pytest.raises(ValueError, match=message):
                _native.module(device).merge(
                    [target], [no_rows], 0, 8, scratch.data_ptr(), *_native.launch_args(device)
                )


@pytest.mark.parametrize("kernels", [*KERNELS, None])  # None: the torch backend, on the CPU
def test_a_prepared_merge_reads_each_runs_values_into_the_same_buffers(kernels):
    """``PreparedMerge.run`` merges the current values of the weights, biases, factors and
    mix (written in place between runs) into the buffers of its first run: each run equals,
    bitwise, a fresh merge of the same values."""
    backend = "torch" if kernels is None else "native"
    place = contextlib.nullcontext(torch.device("cpu")) if kernels is None else on_kernels(kernels)
    with place as device:
        sites = []
        for index, (outs, rank) in enumerate([([40, 24], 5), ([16], 3)]):
            s = site(outs, 24, rank, torch.float32, seed=20 + index, device=device)
            factors, mix = given_factors(s, seed=30 + index)
            sites.append(merge_module.SiteMerge(*s.values(), factors, mix))
        free_merge_buffers()
        elsewhere = merge_buffer_bytes()  # swapped into weights that other tests keep
        prepared = merge_module.PreparedMerge(sites, backend=backend)
        first = prepared.run()
        generator = torch.Generator().manual_seed(40)
        for _ in range(3):
            for s in sites:  # new values, same storages
                for tensor in [*s.weights, *(b for b in s.biases if b is not None), *s.factors]:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                s.mix.copy_(torch.randn(s.mix.shape, generator=generator))
            merged = prepared.run()
            if backend == "native":
                assert [[t.merged.data_ptr() for t in r] for r in merged] == [
                    [t.merged.data_ptr() for t in r] for r in first
                ]
            ours = [[(t.merged.clone(), t.bias.clone()) for t in r] for r in merged]
            fresh = merge_module.merge_sites(sites, backend=backend)
            for ours_site, fresh_site in zip(ours, fresh, strict=True):
                for (weight, bias), target in zip(ours_site, fresh_site, strict=True):
                    assert same_bits(weight, target.merged) and same_bits(bias, target.bias)
        held = sum(t.merged.nbytes for r in first for t in r)
        assert free_merge_buffers() == held and merge_buffer_bytes() == elsewhere
        again = prepared.run()  # buffers made again, the same values merged
        assert merge_buffer_bytes() == elsewhere + held
        for ours_site, fresh_site in zip(again, fresh, strict=True):
            for ours_target, target in zip(ours_site, fresh_site, strict=True):
                assert same_bits(ours_target.merged, target.merged)
                assert same_bits(ours_target.bias, target.bias)
