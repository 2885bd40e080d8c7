"""Re-parameterisation (EAS_SPEC §4): merge, low-rank and eager agree; restore is bitwise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from eas_kernels import PIA, greedy_generate, reparameterize, restore, set_skipped
from eas_kernels.ops import (
    add_lowrank_reference,
    lowrank_factors_reference,
    merged_linear_reference,
)
from eas_kernels.patch import runtime_of
from eas_kernels.pia import PIAState
from tests.helpers import (
    assert_bitwise,
    decode_logits,
    patched,
    random_sequences,
    randomize_pias,
    same_bits,
    tiny_model,
    weights_snapshot,
)
from tests.reference import merged_weight_reference, pia_reference


def random_pia(dim: int, rank: int, seed: int) -> PIA:
    torch.manual_seed(seed)
    pia = PIA(dim, rank).double()
    with torch.no_grad():
        for parameter in pia.parameters():
            parameter.normal_(0, 0.3)
    return pia


# ---------------------------------------------------------------------- the ops
@pytest.mark.parametrize("out, dim, rank", [(7, 13, 1), (40, 24, 5), (33, 64, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_merged_linear_matches_the_dense_reference_and_the_unmerged_function(
    out, dim, rank, with_bias
):
    pia = random_pia(dim, rank, seed=out)
    weight = torch.randn(out, dim, dtype=torch.float64)
    bias = torch.randn(out, dtype=torch.float64) if with_bias else None
    u = torch.randn(3, 5, dim, dtype=torch.float64)
    state = pia.compute_state(u)
    for b in range(3):
        one = type(state)(state.c[b : b + 1], state.alpha[b : b + 1])
        up_mix, beta = pia.mixed_up_projection(one)
        new_weight, new_bias = merged_linear_reference(
            weight, bias, pia.down1.weight, up_mix[0], beta[0]
        )
        ref_weight, ref_bias = merged_weight_reference(
            weight, bias, pia.down1.weight, pia.up1, pia.up2, state.c[b], state.alpha[b]
        )
        torch.testing.assert_close(new_weight, ref_weight, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(new_bias, ref_bias, rtol=1e-10, atol=1e-10)
        # the merged layer computes the unmerged one on z = u + PIA(u)
        z = (
            u[b]
            + pia_reference(pia, u[b : b + 1], state=(state.c[b : b + 1], state.alpha[b : b + 1]))[
                0
            ]
        )
        unmerged = z @ weight.t() + (0 if bias is None else bias)
        torch.testing.assert_close(
            u[b] @ new_weight.t() + new_bias, unmerged, rtol=1e-10, atol=1e-10
        )


def test_merge_never_forms_the_dense_d_by_d_matrix():
    out, dim, rank = 128, 512, 4
    pia = PIA(dim, rank)
    weight = torch.randn(out, dim)
    with FlopCounterMode(display=False) as counter:
        merged_linear_reference(
            weight, None, pia.down1.weight, torch.randn(rank, dim), torch.randn(dim)
        )
    assert counter.get_total_flops() <= 4 * out * dim * rank + 4 * out * dim
    assert 2 * out * dim * dim > 10 * counter.get_total_flops()


@pytest.mark.parametrize("batch, out, dim, rank", [(1, 9, 7, 1), (5, 31, 24, 6), (33, 16, 16, 64)])
def test_lowrank_ops_match_the_unmerged_function(batch, out, dim, rank):
    pia = random_pia(dim, rank, seed=batch)
    weight = torch.randn(out, dim, dtype=torch.float64)
    bias = torch.randn(out, dtype=torch.float64)
    u = torch.randn(batch, 4, dim, dtype=torch.float64)
    state = pia.compute_state(u)
    factor = lowrank_factors_reference(weight, pia.up_basis())
    assert factor.shape == (2 * rank + 2, out)
    projected = u @ pia.down1.weight.t()
    ours = add_lowrank_reference(u @ weight.t() + bias, projected, pia.state_mix(state), factor)
    z = u + pia_reference(pia, u, state=(state.c, state.alpha))
    torch.testing.assert_close(ours, z @ weight.t() + bias, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- on a model
@pytest.mark.parametrize("skipped", [[], [0, 2]])
def test_modes_give_the_same_logits_and_generations(skipped):
    model = patched(skipped, seed=30)
    single = random_sequences([7], vocab=97, seed=31)
    batch = random_sequences([7, 3, 11], vocab=97, seed=32)
    results = {}
    for mode in ("eager", "merge", "lowrank", "auto"):
        reparameterize(model, mode)
        results[mode, 1] = greedy_generate(model, single, 10)
        if mode != "merge":
            results[mode, 3] = greedy_generate(model, batch, 10)
    for (mode, size), result in results.items():
        reference = results["eager", size]
        assert result.tokens == reference.tokens, (mode, size)
        torch.testing.assert_close(result.logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_auto_merges_batch_one_and_keeps_weights_for_larger_batches():
    model = patched([1], seed=33)
    reparameterize(model)
    snapshot = weights_snapshot(model)
    w1 = model.layers[1].feed_forward.w1
    wq = model.layers[0].attention.wq
    model(torch.tensor([[1, 2, 3]]), start_pos=0)
    model(torch.tensor([[4]]), start_pos=3)
    assert runtime_of(model).realized == "merge"
    assert not torch.equal(w1.weight, snapshot["layers.1.feed_forward.w1.weight"])
    assert not torch.equal(wq.weight, snapshot["layers.0.attention.wq.weight"])
    assert w1.bias is not None and wq.bias is not None
    model(torch.tensor([[1, 2, 3], [3, 2, 1]]), start_pos=0)  # the next prefill restores
    assert w1.bias is None and wq.bias is None
    assert_bitwise(model, snapshot)
    model(torch.tensor([[4], [5]]), start_pos=3)
    assert runtime_of(model).realized == "lowrank"
    assert_bitwise(model, snapshot)


def test_restore_is_bitwise_and_the_mode_reapplies_at_the_next_step():
    model = patched([2, 3], seed=34)
    snapshot = weights_snapshot(model)
    reparameterize(model, "merge")
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]), start_pos=0)
        merged_step = model(torch.tensor([[9]]), start_pos=4)
        restore(model)
        assert_bitwise(model, snapshot)
        assert runtime_of(model).realized is None
        reparameterize(model, "eager")
        eager_step = model(torch.tensor([[10]]), start_pos=5)
        reparameterize(model, "merge")  # applied at once: states are frozen
        assert not torch.equal(
            model.layers[2].feed_forward.w3.weight, snapshot["layers.2.feed_forward.w3.weight"]
        )
    restore(model)
    assert_bitwise(model, snapshot)
    assert torch.isfinite(merged_step).all() and torch.isfinite(eager_step).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_thousand_merge_restore_cycles_leave_weights_bitwise_identical(dtype):
    model = patched([1], seed=35, dtype=dtype, n_layers=2, dim=32, n_heads=2, n_kv_heads=1)
    reparameterize(model, "merge")
    snapshot = weights_snapshot(model)
    generator = torch.Generator().manual_seed(36)
    changed = 0
    with torch.no_grad():
        for cycle in range(1000):
            length = int(torch.randint(1, 6, (1,), generator=generator))
            prompt = torch.randint(1, 97, (1, length), generator=generator)
            model(prompt, start_pos=0)  # restores the previous merge, computes new states
            model(torch.tensor([[cycle % 97]]), start_pos=length)  # merges them
            w1 = model.layers[1].feed_forward.w1.weight
            changed += not torch.equal(w1, snapshot["layers.1.feed_forward.w1.weight"])
    restore(model)
    assert changed == 1000
    assert_bitwise(model, snapshot)


def test_the_weights_are_read_once_per_call_and_only_after_a_change(monkeypatch):
    """The finite check of a fresh call runs in the first block only (not once per block),
    and reads the weights only when a version counter moved."""
    model = patched([1], seed=37)
    reads = []
    original = torch._foreach_norm
    monkeypatch.setattr(
        torch, "_foreach_norm", lambda *a, **k: reads.append(1) or original(*a, **k)
    )
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        model(prompt, start_pos=0)
        assert len(reads) == 1
        model(prompt, start_pos=0)
        model(prompt)  # a training-style forward is a fresh call too
        assert len(reads) == 1  # nothing changed: versions match
        model.layers[0].attn_adapter.up1.weight.add_(0.5)  # an optimizer step would do this
        model(prompt, start_pos=0)
        assert len(reads) == 2
        model.layers[0].attn_adapter.up1.weight[0, 0] = float("inf")
        with pytest.raises(ValueError, match="layer 0 attention adapter: up1.weight holds NaN"):
            model(prompt, start_pos=0)
        with pytest.raises(ValueError, match="up1.weight holds NaN"):  # refused again
            model(prompt, start_pos=0)


@pytest.mark.parametrize("mode", ["eager", "merge", "lowrank", "auto"])
def test_every_mode_refuses_a_non_finite_state_at_the_first_decode(mode):
    model = patched([1], seed=37)
    reparameterize(model, mode)
    snapshot = weights_snapshot(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), start_pos=0)
        site = runtime_of(model).active_sites[2]
        site.state = PIAState(site.state.c.clone().fill_(float("inf")), site.state.alpha)
        with pytest.raises(ValueError, match=f"{site.name}: state.c holds NaN or Inf"):
            model(torch.tensor([[3]]), start_pos=2)
    assert_bitwise(model, snapshot)
    assert runtime_of(model).realized is None


def test_a_merge_refused_for_one_site_installs_nothing(monkeypatch):
    """Every site of the model is merged in one call; the refusal of layer 1's site comes
    from the merge itself, which sees an Inf in the factors of layer 1's targets, as an
    fp16 overflow would produce. The error names the site, and
    no weight of any layer is changed — layer 0's, merged into buffers before the refusal
    was known, included."""
    import eas_kernels.kept_merge as kept_module

    model = patched([1], seed=38, dtype=torch.float16)
    reparameterize(model, "merge")
    failing = model.layers[1].feed_forward.w3.weight
    real_init = kept_module.PreparedMerge.__init__
    calls = []

    def overflowing_merge(self, sites, **kwargs):
        calls.append([len(site.weights) for site in sites])
        sites = list(sites)
        for index, site in enumerate(sites):
            if any(weight is failing for weight in site.weights):
                assert site.factors is not None and site.up_mix is None  # kept factors
                factors = [factor.clone() for factor in site.factors]
                factors[1][0, 0] = float("inf")
                sites[index] = site._replace(factors=factors)
        real_init(self, sites, **kwargs)

    monkeypatch.setattr(kept_module.PreparedMerge, "__init__", overflowing_merge)
    snapshot = weights_snapshot(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), start_pos=0)
        with pytest.raises(ValueError, match="layer 1 skip PIA.*NaN or Inf in torch.float16"):
            model(torch.tensor([[3]]), start_pos=2)
    assert calls == [[3, 2, 3, 3]]  # one call: wq, wk, wv of 0, 2, 3 and w1, w3 of layer 1
    assert_bitwise(model, snapshot)
    assert model.layers[0].attention.wq.bias is None


def test_merge_needs_batch_one_and_modes_are_validated():
    model = patched([1], seed=39)
    snapshot = weights_snapshot(model)
    reparameterize(model, "merge")
    with torch.no_grad():
        model(torch.tensor([[1, 2], [3, 4]]), start_pos=0)
        with pytest.raises(ValueError, match="batch size 1, got 2"):
            model(torch.tensor([[3], [4]]), start_pos=2)
    assert_bitwise(model, snapshot)
    with pytest.raises(ValueError, match="mode must be one of"):
        reparameterize(model, "dense")
    with pytest.raises(TypeError, match="not patched"):
        reparameterize(tiny_model(), "merge")
    with pytest.raises(TypeError, match="not patched"):
        restore(tiny_model())


def test_inference_mode_generation_then_training_then_restore():
    """Caches, pristine copies and merged biases made under inference_mode stay usable."""
    model = patched([1], seed=40)
    snapshot = weights_snapshot(model)
    reparameterize(model, "merge")
    with torch.inference_mode():
        merged = greedy_generate(model, [[1, 2, 3]], 5)
    reparameterize(model, "eager")
    assert greedy_generate(model, [[1, 2, 3]], 5).tokens == merged.tokens
    reparameterize(model, "merge")
    with torch.inference_mode():
        greedy_generate(model, [[4, 5]], 3)
    tokens = torch.randint(1, 97, (2, 6))
    prompt = torch.zeros(2, 6, dtype=torch.bool)
    prompt[:, :3] = True
    logits = model.train()(tokens, prompt_mask=prompt)  # fresh call: restores first
    torch.nn.functional.cross_entropy(
        logits[:, 2:-1].flatten(0, 1), tokens[:, 3:].flatten()
    ).backward()
    assert_bitwise(model, snapshot)


def test_state_dict_while_merged_holds_the_pretrained_weights_and_decoding_goes_on():
    """A state dict taken between decode steps (a checkpoint, save_pretrained) holds the
    pretrained weights and no added bias; the next decode step merges again."""
    pretrained = weights_snapshot(tiny_model())
    model = patched([1, 2])
    reparameterize(model, "merge")
    tokens = torch.tensor(random_sequences([6], 97, seed=3))

    def decode(take_state_dict: bool) -> torch.Tensor:
        logits = []
        with torch.no_grad():
            last = model(tokens, start_pos=0)[:, -1]
            for step in range(3):
                logits.append(last)
                if take_state_dict and step == 1:
                    state = model.state_dict()
                    assert not any(key.endswith(("wq.bias", "w1.bias")) for key in state)
                    for key, value in pretrained.items():
                        assert torch.equal(state[key], value), key
                following = last.argmax(-1, keepdim=True)
                last = model(following, start_pos=tokens.shape[1] + step)[:, -1]
        return torch.stack(logits)

    assert torch.equal(decode(take_state_dict=True), decode(take_state_dict=False))
    assert runtime_of(model).realized == "merge"


@pytest.mark.parametrize("convert", ["double", "bfloat16"])
def test_a_model_converted_while_merged_restores_the_converted_pretrained_weights(convert):
    """``model.double()`` (or ``.to(dtype)``) between decode steps converts the merged
    weights; the next prompt's restore gives the pretrained weights converted the same
    way, bitwise, and that prompt decodes as the model converted before any merge does."""
    prompts = random_sequences([6], 97, seed=3)
    second = random_sequences([5], 97, seed=4)
    converted_first = patched([1, 2])
    merged_first = patched([1, 2])
    for model in (converted_first, merged_first):
        reparameterize(model, "merge")
    greedy_generate(merged_first, prompts, 3)  # merged now, then converted
    assert runtime_of(merged_first).realized == "merge"
    for model in (merged_first, converted_first):
        getattr(model, convert)()
    expected = greedy_generate(converted_first, second, 3)
    got = greedy_generate(merged_first, second, 3)
    assert got.tokens == expected.tokens and same_bits(got.logits, expected.logits)
    for model in (merged_first, converted_first):
        restore(model)
    assert_bitwise(merged_first, weights_snapshot(converted_first))


def test_a_weight_changed_in_place_while_merged_is_restored_with_a_warning():
    """The restore puts the pretrained values back bitwise, so an in-place change of a
    merged weight (a ``mul_`` under ``no_grad``, an optimizer step) is discarded: the
    restore says so with a ``RuntimeWarning`` naming the layer's shape. Prompts in turn
    and a dtype conversion while merged warn nothing."""
    model = patched([1, 2])
    reparameterize(model, "merge")
    pristine = weights_snapshot(model)
    prompts = random_sequences([6], 97, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            greedy_generate(model, prompts, 3)
        model.double()
        greedy_generate(model, prompts, 3)
        model.float()
        greedy_generate(model, prompts, 3)
    assert runtime_of(model).realized == "merge"
    twin = copy.deepcopy(model)  # merged too; its parameters' version counters start afresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore(twin)
    assert_bitwise(twin, pristine)
    w1 = model.layers[1].feed_forward.w1.weight
    with torch.no_grad():
        w1.mul_(2.0)
    match = rf"1 linear layer\(s\) of shape \({w1.shape[0]}, {w1.shape[1]}\) were changed"
    with pytest.warns(RuntimeWarning, match=match):
        restore(model)
    assert_bitwise(model, pristine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy_generate(model, prompts, 3)  # the next prompt merges and restores cleanly
        restore(model)


@pytest.mark.parametrize("mode", ["eager", "lowrank"])
def test_a_model_converted_mid_prompt_outside_merge_asks_for_a_new_prompt(mode):
    """Eager and low-rank decoding read the prefill's frozen states, which a conversion
    (``model.double()``) leaves in the old dtype: the next decode call is refused with a
    ``TypeError`` that says to start a new prompt, before it writes anything (the KV cache
    and the frozen states stay as they were), and the new prompt decodes as the model
    converted before its first prompt does."""
    converted_first, converted_mid = patched([1, 2]), patched([1, 2])
    for model in (converted_first, converted_mid):
        reparameterize(model, mode)
    converted_first.double()
    greedy_generate(converted_mid, random_sequences([6], 97, seed=3), 3)
    converted_mid.double()
    runtime = runtime_of(converted_mid)
    states = [(site.state.c, site.state.alpha) for site in runtime.active_sites]
    caches = [
        [m.cache_k.clone(), m.cache_v.clone()]
        for m in converted_mid.modules()
        if getattr(m, "cache_k", None) is not None
    ]
    assert caches  # the LaVIN layout's KV caches
    with torch.no_grad(), pytest.raises(TypeError, match=r"float32 .*float64.*new prompt"):
        converted_mid(torch.tensor([[3]]), start_pos=6)
    assert all(
        site.state.c is c and site.state.alpha is alpha
        for site, (c, alpha) in zip(runtime.active_sites, states, strict=True)
    )
    after = [
        [m.cache_k, m.cache_v]
        for m in converted_mid.modules()
        if getattr(m, "cache_k", None) is not None
    ]
    assert all(
        same_bits(a, b) for pair, kept in zip(after, caches, strict=True)
        for a, b in zip(pair, kept, strict=True)
    )  # fmt: skip
    second = random_sequences([5], 97, seed=4)
    expected = greedy_generate(converted_first, second, 3)
    got = greedy_generate(converted_mid, second, 3)
    assert got.tokens == expected.tokens and same_bits(got.logits, expected.logits)


def test_the_runtime_moves_through_its_phases():
    """NO_STATES -> FRESH (prefill) -> DECODING (first decode: mode realised) -> FRESH (next
    prompt: weights back) ...; a new skip set drops the states; decoding needs a prefill."""
    from eas_kernels.runtime import TRANSITIONS, Phase

    model = patched([1], search=True)
    runtime = runtime_of(model)
    reparameterize(model, "merge")
    assert runtime.phase is Phase.NO_STATES
    assert (Phase.NO_STATES, Phase.DECODING) not in TRANSITIONS
    with torch.no_grad():
        with pytest.raises(ValueError, match="does not continue a prefill"):  # the model's
            model(torch.tensor([[3]]), start_pos=4)
        assert runtime.phase is Phase.NO_STATES and runtime.realized is None
        model(torch.tensor([[1, 2, 3, 4]]), start_pos=0)
        assert runtime.phase is Phase.FRESH and runtime.realized is None
        model(torch.tensor([[3]]), start_pos=4)
        assert runtime.phase is Phase.DECODING and runtime.realized == "merge"
        model(torch.tensor([[5, 6]]), start_pos=0)
        assert runtime.phase is Phase.FRESH and runtime.realized is None
        set_skipped(model, [2])
        assert runtime.phase is Phase.NO_STATES
        with pytest.raises(RuntimeError, match="must follow a prefill"):  # the runtime's
            model(torch.tensor([[3]]), start_pos=2)
    runtime.phase = Phase.NO_STATES
    with pytest.raises(RuntimeError, match="no transition from Phase.NO_STATES"):
        runtime._move(Phase.DECODING)


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_a_lowrank_target_adds_the_pia_of_its_own_input(order):
    """The low-rank path has no state shared between a site's norm and its targets: a
    target called on any input, in any order, computes ``(v + PIA(v; S)) Wᵀ``."""
    model = patched([1], seed=31)
    reparameterize(model, "lowrank")
    greedy_generate(model, random_sequences([6, 4], vocab=97, seed=14), 2)  # decoding now
    site = next(s for s in runtime_of(model).active_sites if s.layer == 1)
    targets = list(site.targets) if order == "forward" else list(reversed(site.targets))
    generator = torch.Generator().manual_seed(15)
    for tokens in (3, 1):
        v = torch.randn(2, tokens, 48, generator=generator)
        with torch.no_grad():
            adapted = v + site.pia(v, state=site.state)
            for linear in targets:
                expected = torch.nn.functional.linear(adapted, linear.weight, linear.bias)
                torch.testing.assert_close(linear(v), expected, rtol=1e-5, atol=1e-5)
            v.mul_(0.5)  # changed in place: not the projection of the previous values
            expected = torch.nn.functional.linear(
                v + site.pia(v, state=site.state), targets[0].weight, targets[0].bias
            )
            torch.testing.assert_close(targets[0](v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("at", [0, 4, 10])
def test_an_interrupt_while_swapping_the_merge_in_puts_back_what_was_swapped(monkeypatch, at):
    """Every site is merged before any swap; a KeyboardInterrupt at swap number ``at`` (of
    11: wq, wk, wv of layers 0, 2, 3 and w1, w3 of layer 1) restores the swaps before it:
    the weights are bitwise pristine, no bias was left, and the next prompt merges."""
    import eas_kernels.runtime as runtime_module
    from tests.helpers import fail_at

    model = patched([1], seed=39)
    reparameterize(model, "merge")
    snapshot = weights_snapshot(model)
    prompt = random_sequences([4], vocab=97, seed=40)
    expected = greedy_generate(model, prompt, 3)
    greedy_generate(model, prompt, 1)  # a prefill: the weights are back
    with monkeypatch.context() as context:
        fail_at(context, runtime_module, "install_merged", at)
        with pytest.raises(KeyboardInterrupt):
            greedy_generate(model, prompt, 3)
    assert_bitwise(model, snapshot)
    assert all(layer.attention.wq.bias is None for layer in model.layers)
    generated = greedy_generate(model, prompt, 3)
    assert generated.tokens == expected.tokens
    torch.testing.assert_close(generated.logits, expected.logits, rtol=0, atol=0)


# ---------------------------------------------------------------------- hooks per decode step
def hooked_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The norms that carry their site's hook now."""
    return [
        site.norm_hook.module
        for site in runtime_of(model).sites
        if site._on_norm_output in site.norm_hook.module._forward_hooks.values()
    ]


@pytest.mark.parametrize("mode", ["merge", "lowrank", "eager"])
def test_merged_and_lowrank_decoding_leave_the_norms_unhooked(mode):
    """The targets carry the PIAs once merged or low-rank: the sites' norm hooks leave
    their norms for the decode steps (and come back for the next prompt); an eager decode
    keeps them. Only the first block carries the runtime's pre-hook."""
    model = patched([1, 2])
    reparameterize(model, mode)
    sites = runtime_of(model).sites
    norms = {id(site.norm_hook.module) for site in sites}
    assert [bool(block._forward_pre_hooks) for block in model.layers] == [True, False, False, False]
    tokens = torch.tensor(random_sequences([6], 97, seed=3))
    with torch.no_grad():
        for _ in range(2):  # two prompts
            model(tokens, start_pos=0)
            assert {id(norm) for norm in hooked_norms(model)} == norms
            model(tokens[:, :1], start_pos=6)
            model(tokens[:, :1], start_pos=7)
            assert len(hooked_norms(model)) == (len(sites) if mode == "eager" else 0)
        restore(model)
        assert {id(norm) for norm in hooked_norms(model)} == norms


def test_a_suspended_norm_hook_comes_back_to_its_place_among_the_user_hooks():
    """A user's forward hooks on a site's norm run in the same order around the site's at
    every prompt: one registered before patching sees ``u``, one after sees ``u + PIA(u)``
    in every prefill; a hook registered during a merged decode runs after the site's."""
    from eas_kernels import SkipPlan, patch_lavin

    model = tiny_model()
    norm = model.layers[1].ffn_norm
    seen: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str):
        return lambda module, inputs, output: seen.append((name, output.clone()))

    norm.register_forward_hook(recorder("before"))
    patch_lavin(model, SkipPlan(4, [1], skip_rank=6, adapter_rank=3))
    randomize_pias(model)
    norm.register_forward_hook(recorder("after"))
    reparameterize(model, "merge")
    tokens = torch.tensor(random_sequences([5], 97, seed=4))
    with torch.no_grad():
        for prompt in range(3):
            seen.clear()
            model(tokens, start_pos=0)
            expected = ["before", "after"] + (["late"] if prompt == 2 else [])
            assert [name for name, _ in seen] == expected, prompt
            assert not torch.equal(seen[0][1], seen[1][1])  # the site's PIA in between
            assert torch.equal(seen[1][1], seen[-1][1])
            model(tokens[:, :1], start_pos=5)
            assert hooked_norms(model) == []  # merged: the site's hook is away
            if prompt == 1:
                norm.register_forward_hook(recorder("late"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # native merge, torch merge
def test_a_model_built_under_inference_mode_merges_and_restores(dtype):
    """Weights created under ``torch.inference_mode`` are inference tensors: the merged
    buffers and biases are inference tensors too, so that they can be swapped into those
    Parameters (before, the first merged decode step failed with torch's "Inference
    tensors do not track version counter"). Merged decoding equals eager decoding, every
    prompt alike, and the weights come back bitwise."""
    with torch.inference_mode():
        model = patched([1, 2], dtype=dtype)
    assert model.layers[1].feed_forward.w1.weight.is_inference()
    snapshot = weights_snapshot(model)
    tokens = torch.tensor(random_sequences([5], 97, seed=7))
    reparameterize(model, "eager")
    with torch.inference_mode():
        eager = decode_logits(model, tokens)
    reparameterize(model, "merge")
    with torch.inference_mode():
        merged = [decode_logits(model, tokens) for _ in range(2)]
    assert runtime_of(model).realized == "merge"
    torch.testing.assert_close(merged[0], eager, rtol=1e-4, atol=1e-4)
    assert same_bits(merged[0], merged[1])
    restore(model)
    assert_bitwise(model, snapshot)
