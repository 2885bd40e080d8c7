"""Per-example routing (ROE_SPEC): routes, gather/scatter, frozen routes, KV cache, merge."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import eas_kernels
from eas_kernels.routing import (
    RoutePlan,
    force_routes,
    patch_routes,
    route_control,
    routes_of,
    set_routing,
    unpatch_routes,
)
from tests.helpers import (
    assert_bitwise,
    left_pad,
    random_sequences,
    same_bits,
    structure,
    tiny_model,
    weights_snapshot,
)
from tests.reference import routed_forward_reference

UNITS = ("mha", "block")
ROUTE_MODULES = {"router", "route_pia", "kept_adapter"}


def randomize_routes(model: torch.nn.Module, seed: int = 1, router_scale: float = 3.0) -> None:
    """Non-zero routers and shortcut adapters (routers large enough to split examples)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parts = set(name.split("."))
            if "router" in parts and not parts & {"route_pia", "kept_adapter"}:
                scale = router_scale
            elif parts & {"route_pia", "kept_adapter"}:
                scale = 0.2
            else:
                continue
            parameter.copy_(
                (torch.randn(parameter.shape, generator=generator) * scale).to(parameter.dtype)
            )


def routed(
    unit: str = "mha",
    *,
    layers: list[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    trained: bool = True,
    **overrides: object,
) -> torch.nn.Module:
    model = tiny_model(seed, dtype, **overrides)
    patch_routes(model, RoutePlan(model.n_layers, unit=unit, layers=layers, skip_rank=6))
    if trained:
        randomize_routes(model, seed + 1)
    return model


def _prompt_batch(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad(random_sequences(lengths, 97, seed))


# ---------------------------------------------------------------------- the plan
def test_route_plan_round_trip_and_defaults() -> None:
    plan = RoutePlan(6, unit="block", ratio=0.25, layers=[5, 1, 3], skip_rank=4)
    assert plan.layers == (1, 3, 5) and not plan.token_mixing
    assert RoutePlan.from_dict(plan.to_dict()) == plan
    assert RoutePlan(3).layers == (0, 1, 2) and RoutePlan(3).token_mixing


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"ratio": 1.0}, ValueError, "ratio must lie in [0, 1)"),
        ({"ratio": -0.1}, ValueError, "ratio must lie in [0, 1)"),
        ({"ratio": "0.3"}, TypeError, "ratio must be a float"),
        ({"unit": "ffn"}, ValueError, "unit must be one of"),
        ({"layers": []}, ValueError, "at least one routed layer"),
        ({"layers": [4]}, ValueError, "out of range"),
        ({"layers": [1, 1]}, ValueError, "duplicate"),
        ({"skip_rank": 0}, ValueError, "skip_rank"),
    ],
)
def test_route_plan_refuses_bad_settings(kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[").replace(")", r"\)")):
        RoutePlan(4, **kwargs)


def test_route_plan_from_dict_refuses_other_documents() -> None:
    with pytest.raises(ValueError, match="not a route plan"):
        RoutePlan.from_dict({"format": "eas_kernels.SkipPlan", "version": 1})
    data = RoutePlan(4).to_dict()
    del data["unit"]
    with pytest.raises(ValueError, match="lacks"):
        RoutePlan.from_dict(data)


# ---------------------------------------------------------------------- patching
def test_fresh_routers_keep_every_unit_and_compute_the_base_model() -> None:
    base = tiny_model()
    model = routed(trained=False)
    tokens, real = _prompt_batch([5, 9, 7])
    expected = base(tokens, attention_mask=real)
    got = model(tokens, attention_mask=real)
    assert torch.equal(got, expected)
    assert not route_control(model).routes().any()


@pytest.mark.parametrize("unit", UNITS)
def test_unpatch_restores_structure_and_weights(unit: str) -> None:
    model = tiny_model()
    before, weights = structure(model), weights_snapshot(model)
    patch_routes(model, RoutePlan(model.n_layers, unit=unit, skip_rank=6))
    randomize_routes(model)
    tokens, real = _prompt_batch([1, 6])
    eas_kernels.greedy_generate(model, [[3], [4, 5, 6]], 3)
    unpatch_routes(model)
    assert structure(model) == before
    assert_bitwise(model, weights)
    del tokens, real


def test_patch_refusals_change_nothing() -> None:
    model = tiny_model()
    before = structure(model)
    with pytest.raises(TypeError, match="plan must be an eas_kernels.routing.RoutePlan"):
        patch_routes(model, eas_kernels.SkipPlan(4, [1]))
    with pytest.raises(ValueError, match="plan is for 5 layers"):
        patch_routes(model, RoutePlan(5))
    with pytest.raises(ValueError, match="skip_rank = 64 exceeds"):
        patch_routes(model, RoutePlan(4, skip_rank=64))
    assert structure(model) == before
    eas_kernels.patch_lavin(model, eas_kernels.SkipPlan(4, [1], skip_rank=6, adapter_rank=3))
    with pytest.raises(ValueError, match="not both"):
        patch_routes(model, RoutePlan(4, skip_rank=6))
    eas_kernels.unpatch(model)
    patch_routes(model, RoutePlan(4, skip_rank=6))
    with pytest.raises(ValueError, match="already routed"):
        patch_routes(model, RoutePlan(4, skip_rank=6))
    with pytest.raises(ValueError, match="not both"):
        eas_kernels.patch_lavin(model, eas_kernels.SkipPlan(4, [1]))


def test_interrupted_patch_is_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    before = structure(model)
    from eas_kernels.routing import patch as route_patch

    calls = []

    class Interrupting(route_patch.PIA):
        def __init__(self, *args: object, **kwargs: object) -> None:
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(route_patch, "PIA", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        patch_routes(model, RoutePlan(4, skip_rank=6))
    assert structure(model) == before


# ---------------------------------------------------------------------- routes
@pytest.mark.parametrize("unit", UNITS)
def test_hard_routes_follow_the_reference(unit: str) -> None:
    model = routed(unit, dtype=torch.float64, layers=[0, 2, 3])
    decisions = []
    for seed, length in enumerate([4, 7, 9, 12, 6, 10]):
        tokens = torch.tensor(random_sequences([length], 97, seed)[0])
        prompt_len = length - 2
        prompt = torch.zeros(1, length, dtype=torch.bool)
        prompt[0, :prompt_len] = True
        got = model(tokens[None], prompt_mask=prompt)[0]
        expected, weights = routed_forward_reference(model, tokens, prompt_len, unit)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # fp32 logits
        routes = route_control(model).routes()[0].tolist()
        assert routes == [bool(weights[layer]) for layer in (0, 2, 3)]
        decisions.extend(routes)
    assert 0 < sum(decisions) < len(decisions), "the routers should split the examples"


@pytest.mark.parametrize("unit", UNITS)
def test_soft_routes_follow_the_reference_forward_and_backward(unit: str) -> None:
    model = routed(unit, dtype=torch.float64)
    set_routing(model, "soft", temperature=2.5, keep_bias=0.7)
    tokens = torch.tensor(random_sequences([9], 97, 4)[0])
    prompt = torch.zeros(1, 9, dtype=torch.bool)
    prompt[0, :6] = True
    got = model(tokens[None], prompt_mask=prompt)[0]
    expected, weights = routed_forward_reference(model, tokens, 6, unit, soft=(2.5, 0.7))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # fp32 logits
    control = route_control(model)
    for layer, weight in weights.items():
        assert control.skip_weights[layer].item() == pytest.approx(
            weight, rel=1e-6
        )  # fp32 norms and RoPE inside
    got.square().mean().backward()
    routers = [block.router.weight.grad for block in model.layers]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in routers)
    adapters = [p for b in model.layers for p in b.kept_adapter.parameters()]
    assert all(p.grad is not None for p in adapters)
    base = [p for n, p in model.named_parameters() if not set(n.split(".")) & ROUTE_MODULES]
    assert base and all(p.grad is None for p in base)


def _decode_batch(
    model: torch.nn.Module, tokens: torch.Tensor, real: torch.Tensor, answer: torch.Tensor
) -> torch.Tensor:
    """Logits of the prefill's last position and of each answer token fed one by one."""
    outputs = [model(tokens, start_pos=0, prompt_mask=real)[:, -1]]
    for step in range(answer.shape[1] - 1):
        position = tokens.shape[1] + step
        outputs.append(model(answer[:, step : step + 1], start_pos=position)[:, -1])
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("unit", UNITS)
def test_teacher_forcing_equals_incremental_decoding(unit: str) -> None:
    model = routed(unit, seed=2)
    prompts, real = _prompt_batch([3, 8, 5, 11], seed=5)
    answer = torch.randint(1, 97, (4, 4), generator=torch.Generator().manual_seed(9))
    full = torch.cat([prompts, answer], dim=1)
    attention = torch.cat([real, torch.ones_like(answer, dtype=torch.bool)], dim=1)
    prompt_mask = torch.cat([real, torch.zeros_like(answer, dtype=torch.bool)], dim=1)
    forced_logits = model(full, prompt_mask=prompt_mask, attention_mask=attention)
    teacher_routes = route_control(model).routes()
    width = prompts.shape[1]
    expected = forced_logits[:, width - 1 : width - 1 + answer.shape[1]]
    got = _decode_batch(model, prompts, real, answer)
    assert torch.equal(route_control(model).routes(), teacher_routes)
    assert teacher_routes.any() and not teacher_routes.all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_equals_each_example_alone(unit: str, dtype: torch.dtype) -> None:
    model = routed(unit, seed=4, dtype=dtype)
    prompts, real = _prompt_batch([6, 2, 9, 4, 7], seed=6)
    routes = torch.tensor(
        [
            [True] * 4,
            [False] * 4,
            [True, False, True, False],
            [False, True, True, False],
            [False] * 3 + [True],
        ]
    )
    answer = torch.randint(1, 97, (5, 3), generator=torch.Generator().manual_seed(2))
    force_routes(model, routes)
    together = _decode_batch(model, prompts, real, answer)
    for row in range(5):
        force_routes(model, routes[row : row + 1])
        alone = _decode_batch(
            model, prompts[row : row + 1], real[row : row + 1], answer[row : row + 1]
        )
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(
            together[row : row + 1].float(), alone.float(), rtol=tolerance, atol=tolerance
        )
    force_routes(model, None)
    # the routers' own (mixed) routes: the same property
    together = _decode_batch(model, prompts, real, answer)
    decided = route_control(model).routes()
    assert decided.any() and not decided.all()
    for row in range(5):
        alone = _decode_batch(
            model, prompts[row : row + 1], real[row : row + 1], answer[row : row + 1]
        )
        assert torch.equal(route_control(model).routes()[0], decided[row])
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(
            together[row : row + 1].float(), alone.float(), rtol=tolerance, atol=tolerance
        )


@pytest.mark.parametrize("unit", UNITS)
def test_kv_cache_holds_only_the_examples_that_keep_a_layer(unit: str) -> None:
    model = routed(unit)
    prompts, real = _prompt_batch([5, 3, 7, 6], seed=1)
    routes = torch.tensor(
        [
            [True, False, True, True],
            [True, False, False, True],
            [True, True, False, True],
            [True, False, False, False],
        ]
    )
    force_routes(model, routes)
    model(prompts, start_pos=0, prompt_mask=real)
    model(prompts[:, :1], start_pos=prompts.shape[1])
    args = model.params
    row_bytes = 2 * args.max_seq_len * args.kv_heads * args.head_dim * 4  # K and V, fp32
    total = 0
    for layer, block in enumerate(model.layers):
        kept = int((~routes[:, layer]).sum())
        cache = block.attention.cache_k
        if kept == 0:
            assert cache is None and block.attention.cache_v is None
        else:
            assert cache.shape[0] == kept
            total += cache.nbytes + block.attention.cache_v.nbytes
    assert total == row_bytes * int((~routes).sum())
    full = tiny_model()
    full(prompts, start_pos=0, attention_mask=real)
    full_bytes = sum(b.attention.cache_k.nbytes + b.attention.cache_v.nbytes for b in full.layers)
    assert total / full_bytes == pytest.approx(int((~routes).sum()) / routes.numel())


def test_batch_one_merges_the_skipped_mhas_and_restores_them_bitwise() -> None:
    model = routed("mha", seed=3)
    weights = weights_snapshot(model)
    routes = torch.tensor([[True, False, True, False]])
    prompts, real = _prompt_batch([7], seed=8)
    answer = torch.randint(1, 97, (1, 4), generator=torch.Generator().manual_seed(1))
    force_routes(model, routes)
    control = route_control(model)
    control.merge = False
    eager = _decode_batch(model, prompts, real, answer)
    control.merge = True
    merged = _decode_batch(model, prompts, real, answer)
    torch.testing.assert_close(merged, eager, rtol=1e-5, atol=1e-5)
    w1 = {i: model.layers[i].feed_forward.w1.weight for i in range(4)}
    pristine = weights["layers.0.feed_forward.w1.weight"]
    assert not same_bits(w1[0].detach(), pristine)  # layer 0 skipped: merged for the decode
    assert same_bits(w1[1].detach(), weights["layers.1.feed_forward.w1.weight"])
    wq = model.layers[1].attention.wq.weight  # layer 1 kept: its A_k merged into wq/wk/wv
    assert not same_bits(wq.detach(), weights["layers.1.attention.wq.weight"])
    assert same_bits(
        model.layers[0].attention.wq.weight.detach(), weights["layers.0.attention.wq.weight"]
    )
    saved = model.state_dict()  # mid-decode: the pretrained weights are saved
    assert same_bits(saved["layers.0.feed_forward.w1.weight"], pristine)
    next_step = model(answer[:, -1:], start_pos=prompts.shape[1] + answer.shape[1] - 1)
    assert not same_bits(w1[0].detach(), pristine)  # merged again for the next step
    torch.testing.assert_close(next_step[:, -1], eager_next(model, prompts, real, answer))
    for cycle in range(30):  # merge, restore, merge ...
        force_routes(model, torch.tensor([[cycle % 2 == 0, True, cycle % 3 == 0, False]]))
        _decode_batch(model, prompts, real, answer[:, :2])
    model(prompts, start_pos=0, prompt_mask=real)  # a fresh call restores
    assert_bitwise(model, weights | {k: v for k, v in model.state_dict().items() if "route" in k})


def test_batch_one_merge_changed_in_place_is_restored_with_a_warning() -> None:
    """A routed batch-1 merge put back at the next prefill discards an in-place change of
    a merged weight, with a ``RuntimeWarning``; the weights return bitwise."""
    model = routed("mha", seed=3)
    weights = weights_snapshot(model)
    force_routes(model, torch.tensor([[True, False, True, False]]))
    prompts, real = _prompt_batch([7], seed=8)
    answer = torch.randint(1, 97, (1, 3), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _decode_batch(model, prompts, real, answer)
        _decode_batch(model, prompts, real, answer)  # restored and merged again, silently
    w1 = model.layers[0].feed_forward.w1.weight  # layer 0 skips: PIA_s merged into W1
    assert not same_bits(w1.detach(), weights["layers.0.feed_forward.w1.weight"])
    with torch.no_grad():
        w1.add_(1.0)
    with pytest.warns(RuntimeWarning, match="changed in place while a PIA was merged"):
        model(prompts, start_pos=0, prompt_mask=real)
    assert_bitwise(model, weights | {k: v for k, v in model.state_dict().items() if "route" in k})


def eager_next(
    model: torch.nn.Module, prompts: torch.Tensor, real: torch.Tensor, answer: torch.Tensor
) -> torch.Tensor:
    """The logits of the step after ``answer`` decoded eagerly (no merge, no low-rank path)."""
    control = route_control(model)
    control.merge = control.lowrank = False
    try:
        _decode_batch(model, prompts, real, answer)
        return model(answer[:, -1:], start_pos=prompts.shape[1] + answer.shape[1] - 1)[:, -1]
    finally:
        control.merge = control.lowrank = True


def test_decode_refusals() -> None:
    model = routed()
    prompts, real = _prompt_batch([4, 6])
    with pytest.raises(RuntimeError, match="has no route"):
        model.layers[0](torch.zeros(2, 1, 48), 5, None, None)
    model(prompts, start_pos=0, prompt_mask=real)
    with pytest.raises(ValueError, match="decode batch size 1 differs"):
        model.layers[0](torch.zeros(1, 1, 48), 6, None, None)
    set_routing(model, "soft", temperature=1.0)
    with pytest.raises(ValueError, match="soft routing"):
        model(prompts, start_pos=0, prompt_mask=real)
    with pytest.raises(ValueError, match="mode must be one of"):
        set_routing(model, "gumbel")
    with pytest.raises(ValueError, match="one column per routed layer"):
        force_routes(model, torch.zeros(2, 3, dtype=torch.bool))
    set_routing(model, "hard")
    force_routes(model, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="forced routes are for 3 examples"):
        model(prompts, start_pos=0, prompt_mask=real)


def test_random_routes_skip_at_the_target_ratio() -> None:
    model = tiny_model()
    patch_routes(model, RoutePlan(4, ratio=0.3, skip_rank=6))
    control = route_control(model)
    control.generator = torch.Generator().manual_seed(0)
    set_routing(model, "random")
    tokens, real = _prompt_batch([5] * 8)
    skipped = []
    for _ in range(40):
        model(tokens, attention_mask=real)
        skipped.append(control.routes().float().mean())
    assert float(torch.stack(skipped).mean()) == pytest.approx(0.3, abs=0.03)


def test_deepcopy_of_a_routed_model_is_independent() -> None:
    model = routed()
    clone = copy.deepcopy(model)
    prompts, real = _prompt_batch([5, 8])
    torch.testing.assert_close(
        clone(prompts, attention_mask=real), model(prompts, attention_mask=real)
    )
    with torch.no_grad():
        clone.layers[0].router.weight.add_(1.0)
    assert route_control(clone) is not route_control(model)
    assert clone.layers[0].forward.router is clone.layers[0].router


def test_any_keeps_rule_runs_the_whole_batch_and_keeps_its_cache_rows() -> None:
    model = routed("mha", seed=4)
    prompts, real = _prompt_batch([6, 2, 9], seed=6)
    answer = torch.randint(1, 97, (3, 3), generator=torch.Generator().manual_seed(2))
    routes = torch.tensor(
        [[True, True, True, True], [False, True, True, True], [True, True, True, True]]
    )
    force_routes(model, routes)
    route_control(model).set_batch_rule("any_keeps")
    got = _decode_batch(model, prompts, real, answer)
    # layer 0 runs for every example (one keeps it); layers 1-3 are skipped by all
    assert model.layers[0].attention.cache_k.shape[0] == 3
    assert all(model.layers[i].attention.cache_k is None for i in (1, 2, 3))
    route_control(model).set_batch_rule("per_example")  # the decode keeps the prefill's rule
    step = model(answer[:, -1:], start_pos=prompts.shape[1] + 2)
    assert torch.isfinite(step).all()
    force_routes(model, torch.tensor([[False, True, True, True]] * 3))
    expected = _decode_batch(model, prompts, real, answer)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="batch_rule must be one of"):
        route_control(model).set_batch_rule("any")


@pytest.mark.parametrize("unit", UNITS)
def test_soft_routes_at_a_vanishing_temperature_run_one_branch_per_example(unit: str) -> None:
    """As τ → 0 each example's losing weight falls below the dtype's epsilon: that branch
    is not run, and the soft forward equals the hard one (both routes mixed in a batch)."""
    model = routed(unit, seed=2)
    prompts, real = _prompt_batch([3, 8, 5, 11], seed=5)
    hard = model(prompts, prompt_mask=real)
    routes = route_control(model).routes()
    assert routes.any() and not routes.all()
    set_routing(model, "soft", temperature=1e-4)
    calls = []
    original = model.layers[0].forward._kept
    model.layers[0].forward._kept = lambda x, *a: calls.append(x.shape[0]) or original(x, *a)
    soft = model(prompts, prompt_mask=real)
    torch.testing.assert_close(soft, hard, rtol=1e-6, atol=1e-6)
    assert torch.equal(route_control(model).routes(), routes)
    assert calls == [int((~routes[:, 0]).sum())]  # layer 0's kept branch: its keepers only


@pytest.mark.parametrize("unit", UNITS)
def test_save_and_load_routes_round_trip(tmp_path, unit: str) -> None:
    from eas_kernels.routing import load_routes, save_routes

    model = routed(unit, layers=[1, 3])
    prompts, real = _prompt_batch([5, 8, 3])
    expected = model(prompts, prompt_mask=real)
    folder = save_routes(model, tmp_path / "routes")
    loaded = load_routes(tiny_model(), folder)
    assert torch.equal(loaded(prompts, prompt_mask=real), expected)
    assert route_control(loaded).plan == route_control(model).plan


def test_load_routes_refuses_what_does_not_fit_and_changes_nothing(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from eas_kernels.routing import load_routes, save_routes

    folder = save_routes(routed(), tmp_path / "routes")
    other = tiny_model(dim=64)
    before = structure(other)
    with pytest.raises(ValueError, match="does not fit the model's routes"):
        load_routes(other, folder)
    assert structure(other) == before
    tensors = load_file(str(folder / "route_weights.safetensors"))
    tensors["layers.0.router.weight"][0, 0] = float("nan")
    save_file(tensors, str(folder / "route_weights.safetensors"))
    model = tiny_model()
    before = structure(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_routes(model, folder)
    assert structure(model) == before
    (folder / "route_plan.json").write_text('{"format": "eas_kernels.checkpoint"}')
    with pytest.raises(ValueError, match="not a routing checkpoint plan"):
        load_routes(model, folder)
    with pytest.raises(FileNotFoundError, match="no route_plan.json"):
        load_routes(model, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_skipped_mhas_take_the_low_rank_path_equal_to_eager(dtype: torch.dtype) -> None:
    model = routed("mha", seed=7, dtype=dtype)
    prompts, real = _prompt_batch([6, 2, 9, 4], seed=7)
    answer = torch.randint(1, 97, (4, 3), generator=torch.Generator().manual_seed(4))
    routes = torch.tensor(
        [[True, False, True, False], [False, False, True, True], [True, True, True, False],
         [False, True, False, False]]
    )  # fmt: skip
    force_routes(model, routes)
    control = route_control(model)
    control.lowrank = False
    eager = _decode_batch(model, prompts, real, answer)
    control.lowrank = True
    lowrank = _decode_batch(model, prompts, real, answer)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lowrank.float(), eager.float(), rtol=tolerance, atol=tolerance)
    forwards = routes_of(model).forwards
    assert all(f._lowrank is not None for f in forwards)  # every layer has skipped examples
    factors = [f._factors.kept for f in forwards]
    _decode_batch(model, prompts, real, answer)  # a new prompt: the same state-free factors
    assert all(f._factors.kept is kept for f, kept in zip(forwards, factors, strict=True))
    with torch.no_grad():  # the adapters change: the factors are built again
        for forward in forwards:
            forward.pia.up1.weight.mul_(1.5)
    lowrank = _decode_batch(model, prompts, real, answer)
    control.lowrank = False
    eager = _decode_batch(model, prompts, real, answer)
    torch.testing.assert_close(lowrank.float(), eager.float(), rtol=tolerance, atol=tolerance)
    assert all(f._factors.kept is not kept for f, kept in zip(forwards, factors, strict=True))


@pytest.mark.parametrize("unit", UNITS)
def test_frozen_adapters_follow_a_change_of_their_weights_between_steps(unit: str) -> None:
    """Decode steps reuse each frozen state's (W_u, β); a change of the adapter's weights
    between steps is seen, as a copy that computes them afresh sees it."""
    model = routed(unit, seed=8)
    prompts, real = _prompt_batch([5, 7, 4], seed=9)
    force_routes(model, torch.tensor([[True, False, True, False]] * 2 + [[False] * 4]))
    control = route_control(model)
    control.merge = control.lowrank = False  # every adapter runs on its frozen state
    with torch.no_grad():
        model(prompts, start_pos=0, prompt_mask=real)
        step = torch.full((3, 1), 5)
        model(step, start_pos=prompts.shape[1])
        for name, parameter in model.named_parameters():
            if "route_pia.up" in name or "kept_adapter.up" in name:
                parameter.mul_(1.7)
        twin = copy.deepcopy(model)
        got = model(step, start_pos=prompts.shape[1] + 1)
        expected = twin(step, start_pos=prompts.shape[1] + 1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("lowrank", [True, False])
def test_a_model_converted_mid_prompt_asks_for_a_new_prompt(unit: str, lowrank: bool) -> None:
    """A batch decodes its skipped rows on frozen states (eager or low-rank) that a
    conversion (``model.double()``) leaves in the old dtype: the next decode call is
    refused with a ``TypeError`` that says to start a new prompt, and the new prompt
    decodes as the model converted before its first prompt does."""
    converted_first, converted_mid = routed(unit, seed=8), routed(unit, seed=8)
    routes = torch.tensor([[True, False, True, False]] * 2 + [[False] * 4])
    for model in (converted_first, converted_mid):
        force_routes(model, routes)
        route_control(model).lowrank = lowrank
    converted_first.double()
    prompts, real = _prompt_batch([5, 7, 4], seed=9)
    step = torch.full((3, 1), 5)
    with torch.no_grad():
        converted_mid(prompts, start_pos=0, prompt_mask=real)
        converted_mid(step, start_pos=prompts.shape[1])
        converted_mid.double()
        with pytest.raises(TypeError, match=r"float32 .*float64.*new prompt"):
            converted_mid(step, start_pos=prompts.shape[1] + 1)
        outputs = []
        for model in (converted_first, converted_mid):
            model(prompts, start_pos=0, prompt_mask=real)
            outputs.append(model(step, start_pos=prompts.shape[1]))
    assert same_bits(outputs[0], outputs[1])
