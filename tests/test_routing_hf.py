"""Per-example routing on Hugging Face LLaMA models: generate() (greedy, sampling, beam
search, left padding), per-layer KV rows, the batch-1 merge, refusals, Trainer."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    StaticCache,
    TrainingArguments,
)

from eas_kernels.routing import (
    RoutePlan,
    RouteSchedule,
    force_routes,
    patch_routes,
    route_control,
    route_loss,
    routes_of,
    set_routing,
    unpatch_routes,
)
from eas_kernels.routing.hf import checkpointing_refusal
from eas_kernels.routing.hf_trainer import RouteTrainer
from tests.helpers import assert_bitwise, same_bits, structure, weights_snapshot
from tests.test_hf import CACHE_ARGUMENT, cpu_training, reversal_rows, tiny_llama
from tests.test_routing import randomize_routes

pytestmark = pytest.mark.transformers  # .ci/run runs these on the oldest transformers too
UNITS = ("mha", "block")
# one row per example: skip everything routable, nothing, and two mixed routes
ROUTES = torch.tensor(
    [
        [True, True, True, True],
        [False, False, False, False],
        [True, False, True, False],
        [False, True, True, True],
    ]
)


def routed_llama(unit: str = "mha", seed: int = 0, **plan: object) -> torch.nn.Module:
    model = tiny_llama(seed).eval()
    patch_routes(model, RoutePlan(4, unit=unit, skip_rank=6, **plan))
    randomize_routes(model, seed + 1)
    return model


def prompts(seed: int = 0, lengths: tuple[int, ...] = (5, 9, 3, 7)) -> dict[str, torch.Tensor]:
    """A left-padded batch of random prompts of ``lengths`` real tokens."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 64, (length,), generator=generator)
        mask[row, width - length :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def alone(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Example ``row`` of a left-padded batch, without its padding."""
    real = int(inputs["attention_mask"][row].sum())
    return {k: v[row : row + 1, -real:] for k, v in inputs.items()}


def generate(model: torch.nn.Module, inputs: dict, **kwargs: object):
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("max_new_tokens", 5)
    with torch.no_grad():
        return model.generate(
            **inputs, return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs
        )


def step_logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)


# ---------------------------------------------------------------------- patching
def test_fresh_routes_compute_the_base_model_and_unpatch_restores_it() -> None:
    base = tiny_llama().eval()
    model = copy.deepcopy(base)
    before, snapshot = structure(model), weights_snapshot(model)
    patch_routes(model, RoutePlan(4, unit="mha", skip_rank=6))
    inputs = prompts()
    with torch.no_grad():
        expected = base(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not route_control(model).routes().any()  # zero routers keep every unit
    assert not any(p.requires_grad for n, p in model.named_parameters() if "route" not in n
                   and "kept_adapter" not in n)  # fmt: skip
    unpatch_routes(model)
    assert structure(model) == before and "generate" not in model.__dict__
    assert_bitwise(model, snapshot)


# ---------------------------------------------------------------------- generate()
@pytest.mark.parametrize("unit", UNITS)
def test_a_batch_generates_what_each_example_generates_alone(unit: str) -> None:
    model = routed_llama(unit, seed=1)
    inputs = prompts(1)
    force_routes(model, ROUTES)
    together = generate(model, inputs)
    for row in range(len(ROUTES)):
        force_routes(model, ROUTES[row : row + 1])
        single = generate(model, alone(inputs, row))
        width = inputs["input_ids"].shape[1]
        assert together.sequences[row, width:].tolist() == single.sequences[0, -5:].tolist()
        torch.testing.assert_close(
            step_logits(together)[row], step_logits(single)[0], rtol=1e-5, atol=1e-5
        )
    force_routes(model, None)
    together = generate(model, inputs)  # the routers' own routes
    decided = route_control(model).routes()
    assert decided.any() and not decided.all()
    for row in range(len(ROUTES)):
        single = generate(model, alone(inputs, row))
        assert torch.equal(route_control(model).routes()[0], decided[row])
        torch.testing.assert_close(
            step_logits(together)[row], step_logits(single)[0], rtol=1e-5, atol=1e-5
        )


def teacher_forced_logits(model: torch.nn.Module, inputs: dict, sequences: torch.Tensor):
    """Logits of each generated token's position, from one training-style forward over
    prompt and answer whose labels mark the answer (so the routes read the prompt only)."""
    width = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, width:])], dim=1)
    labels = sequences.clone()
    labels[:, :width] = -100
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, labels=labels).logits
    return logits[:, width - 1 : -1]


@pytest.mark.parametrize("unit", UNITS)
def test_sampled_answers_are_decoded_on_the_prompts_routes(unit: str) -> None:
    model = routed_llama(unit, seed=2)
    inputs = prompts(2)
    torch.manual_seed(0)
    out = generate(model, inputs, do_sample=True, top_k=20, temperature=1.5)
    routes = route_control(model).routes()
    assert routes.any() and not routes.all()
    expected = teacher_forced_logits(model, inputs, out.sequences)
    assert torch.equal(route_control(model).routes(), routes)  # no answer leak into the route
    torch.testing.assert_close(step_logits(out), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit", UNITS)
def test_beam_search_beams_inherit_their_examples_routes(unit: str) -> None:
    model = routed_llama(unit, seed=3)
    inputs = prompts(3)
    beams = 3
    force_routes(model, ROUTES.repeat_interleave(beams, dim=0))
    options = {"num_beams": beams, "min_new_tokens": 5}
    together = generate(model, inputs, num_return_sequences=2, **options)
    width = inputs["input_ids"].shape[1]
    for row in range(len(ROUTES)):
        force_routes(model, ROUTES[row : row + 1].repeat_interleave(beams, dim=0))
        single = generate(model, alone(inputs, row), num_return_sequences=2, **options)
        got = together.sequences[2 * row : 2 * row + 2, width:]
        assert got.tolist() == single.sequences[:, -got.shape[1] :].tolist()
    force_routes(model, None)
    together = generate(model, inputs, **options)
    decided = route_control(model).routes()
    assert decided.any() and not decided.all()
    assert torch.equal(decided, decided[::beams].repeat_interleave(beams, dim=0))
    for row in range(len(ROUTES)):
        single = generate(model, alone(inputs, row), **options)
        assert together.sequences[row, width:].tolist() == single.sequences[0, -5:].tolist()


def decode(model: torch.nn.Module, cache, inputs: dict, answer: torch.Tensor) -> torch.Tensor:
    """Logits of feeding ``answer`` one token at a time on ``cache``."""
    mask = inputs["attention_mask"]
    logits = []
    with torch.no_grad():
        for step in range(answer.shape[1]):
            mask = torch.cat([mask, torch.ones_like(answer[:, :1])], dim=1)
            out = model(
                input_ids=answer[:, step : step + 1], attention_mask=mask, **{CACHE_ARGUMENT: cache}
            )
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def prefill(model: torch.nn.Module, inputs: dict):
    cache = DynamicCache()
    with torch.no_grad():
        model(**inputs, **{CACHE_ARGUMENT: cache})
    return cache


@pytest.mark.parametrize("batch_rule", ["per_example", "any_keeps"])
def test_a_reordered_cache_decodes_as_the_reordered_batch(batch_rule: str) -> None:
    """reorder_cache / batch_select_indices / batch_repeat_interleave move each layer's
    kept rows, routes and states: decoding continues as if the batch had been reordered
    before the prefill."""
    model = routed_llama("mha", seed=4)
    route_control(model).set_batch_rule(batch_rule)
    inputs = prompts(4)
    answer = torch.randint(3, 64, (4, 3), generator=torch.Generator().manual_seed(5))
    force_routes(model, ROUTES)
    # under any-keeps a layer runs for every example when one keeps it: the changes keep
    # which layers some example keeps, so that the moved batch runs the same layers
    index = torch.tensor([2, 2, 0, 3, 1, 0] if batch_rule == "per_example" else [2, 0, 3, 1])
    subset = torch.tensor([3, 0] if batch_rule == "per_example" else [3, 1, 0, 2])
    reorder = lambda cache: cache.reorder_cache(index)  # noqa: E731
    select = lambda cache: cache.batch_select_indices(subset)  # noqa: E731
    repeat = lambda cache: cache.batch_repeat_interleave(2)  # noqa: E731
    for change, rows in (
        (reorder, index),
        (select, subset),
        (repeat, torch.arange(4).repeat_interleave(2)),
    ):
        force_routes(model, ROUTES)
        cache = prefill(model, inputs)
        change(cache)
        moved = {k: v[rows] for k, v in inputs.items()}
        got = decode(model, cache, moved, answer[rows])
        force_routes(model, ROUTES[rows])
        expected = decode(model, prefill(model, moved), moved, answer[rows])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit", UNITS)
def test_each_layer_caches_only_the_examples_that_keep_it(unit: str) -> None:
    model = routed_llama(unit, seed=5)
    inputs = prompts(5)
    force_routes(model, ROUTES)
    seen: list[tuple[int, ...]] = []  # the per-example arguments layer 1's attention gets

    def record(module, args, kwargs):
        per_example = (kwargs["position_ids"], *kwargs["position_embeddings"])
        seen.append(tuple(t.shape[0] for t in per_example) + (kwargs["attention_mask"].shape[0],))

    handle = model.model.layers[1].self_attn.register_forward_pre_hook(record, with_kwargs=True)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() has them
    cache = prefill(model, {**inputs, "position_ids": positions})
    handle.remove()
    assert seen == [(2, 2, 2, 2)]  # layer 1 runs for examples 1 and 2 only
    decode(model, cache, inputs, torch.full((4, 2), 7))
    tokens = inputs["input_ids"].shape[1] + 2
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    row_bytes = 2 * tokens * config.num_key_value_heads * head_dim * 4  # K and V, fp32
    total = 0
    for layer, slot in enumerate(cache.layers):
        kept = int((~ROUTES[:, layer]).sum())
        assert slot.get_seq_length() == tokens  # a layer every example skips still counts
        if kept == 0:
            assert slot.keys is None or slot.keys.numel() == 0
            continue
        assert slot.keys.shape[0] == kept and slot.values.shape[0] == kept
        total += slot.keys.nbytes + slot.values.nbytes
    assert total == row_bytes * int((~ROUTES).sum())
    full = prefill(tiny_llama().eval(), inputs)
    full_bytes = sum(s.keys.nbytes + s.values.nbytes for s in full.layers)
    assert total / full_bytes == pytest.approx(
        int((~ROUTES).sum()) / ROUTES.numel() * tokens / inputs["input_ids"].shape[1]
    )


def test_batch_one_merges_its_adapters_and_restores_them_bitwise() -> None:
    model = routed_llama("mha", seed=6)
    snapshot = weights_snapshot(model)
    inputs = alone(prompts(6), 0)
    eager = copy.deepcopy(model)
    route_control(eager).merge = False
    layers = model.model.layers
    for route in ROUTES:
        force_routes(model, route[None])
        force_routes(eager, route[None])
        merged = generate(model, inputs)
        torch.testing.assert_close(
            step_logits(merged), step_logits(generate(eager, inputs)), rtol=1e-4, atol=1e-4
        )
        for index, skips in enumerate(route.tolist()):  # each layer merged its one adapter
            gate = f"model.layers.{index}.mlp.gate_proj.weight"
            query = f"model.layers.{index}.self_attn.q_proj.weight"
            live_gate = layers[index].mlp.gate_proj.weight.detach()
            live_query = layers[index].self_attn.q_proj.weight.detach()
            assert same_bits(live_gate, snapshot[gate]) != skips
            assert same_bits(live_query, snapshot[query]) == skips
        assert_bitwise(model, snapshot)  # state_dict() gives the pretrained weights
    with torch.no_grad():
        model(**inputs)  # a fresh call puts the merge back
    for index, layer in enumerate(layers):
        for name in ("mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj"):
            live = layer.get_submodule(name).weight.detach()
            assert same_bits(live, snapshot[f"model.layers.{index}.{name}.weight"])


# ---------------------------------------------------------------------- refusals
def test_generate_refuses_what_cannot_decode_on_the_prompts_routes() -> None:
    model = routed_llama("mha", seed=7)
    inputs = prompts(7)
    snapshot = weights_snapshot(model)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, inputs, use_cache=False)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        generate(model, inputs, prefill_chunk_size=4)
    set_routing(model, "soft")
    with pytest.raises(ValueError, match="hard"):
        generate(model, inputs)
    set_routing(model, "hard")
    static = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="dynamic cache"):
        with torch.no_grad():
            model(**inputs, **{CACHE_ARGUMENT: static})
    assert_bitwise(model, snapshot)


def test_decoding_on_a_cache_the_last_prefill_did_not_fill_is_refused() -> None:
    model = routed_llama("mha", seed=8)
    inputs = prompts(8)
    answer = torch.full((4, 1), 9)
    old = prefill(model, inputs)
    prefill(model, inputs)  # a newer prefill: the old cache's routes are gone
    with pytest.raises(ValueError, match="older prefill"):
        decode(model, old, inputs, answer)
    foreign = prefill(tiny_llama().eval(), inputs)  # a continued conversation
    with pytest.raises(ValueError, match="continued conversation"):
        decode(model, foreign, inputs, answer)
    set_routing(model, "soft")
    soft = prefill(model, inputs)  # a soft forward caches nothing
    set_routing(model, "hard")
    with pytest.raises(ValueError, match="soft-routed"):
        decode(model, soft, inputs, answer)


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("unit", UNITS)
def test_soft_routes_train_the_routers_and_adapters_only(unit: str) -> None:
    model = routed_llama(unit, seed=9).train()
    set_routing(model, "soft", temperature=1.0)
    rows = reversal_rows(8)
    batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
    out = model(**batch)
    out.loss.backward()
    patch = routes_of(model)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in patch.routers())
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all(
        ".router." in n or ".route_pia." in n or ".kept_adapter." in n for n in trained
    )
    # the routes read the prompt only: the answer tokens do not move them
    mask = route_control(model).state_mask
    assert mask[:, :6].all() and not mask[:, 6:].any()


def test_route_trainer_runs_roes_stages_and_trains_only_routes(tmp_path) -> None:
    model = routed_llama("mha", seed=10)
    randomize_routes(model, 11, router_scale=0.0)  # fresh routers, trained adapters
    snapshot = weights_snapshot(model)
    arguments = cpu_training(tmp_path, 20, 5)
    stages = []
    schedule = RouteSchedule(20)
    trainer = RouteTrainer(
        model=model, args=arguments, train_dataset=reversal_rows(), route_schedule=schedule
    )
    original = schedule.apply

    def recording(m, step):
        stage = original(m, step)
        stages.append((step, stage.name))
        return stage

    schedule.apply = recording  # type: ignore[method-assign]
    trainer.train()
    assert [name for _, name in stages] == [schedule.stage(s).name for s in range(20)]
    assert {name for _, name in stages} == {"random", "routers", "joint"}
    logged = [entry for entry in trainer.state.log_history if "realized_ratio" in entry]
    assert len(logged) == 4 and all(0.0 <= e["realized_ratio"] <= 1.0 for e in logged)
    changed = [k for k, v in weights_snapshot(model).items() if not torch.equal(v, snapshot[k])]
    assert any(".router." in k for k in changed)
    assert all(".router." in k or ".route_pia." in k or ".kept_adapter." in k for k in changed)
    with pytest.raises(TypeError, match="RouteSchedule"):
        RouteTrainer(model=model, args=arguments, train_dataset=[], route_schedule=20)
    with pytest.raises(TypeError, match="not routed"):
        RouteTrainer(model=tiny_llama(), args=arguments, train_dataset=[])


CHECKPOINTING_REFUSED = checkpointing_refusal() is not None
ACTIVATION_CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if hasattr(TrainingArguments, name)
)
NEEDS_LAYER_FORWARD_CHECKPOINTING = pytest.mark.skipif(
    CHECKPOINTING_REFUSED, reason="transformers < 5.23 checkpoints a layer's whole call"
)


def checkpointed_step(
    checkpointing: bool, mode: str, reentrant: bool, unit: str = "mha", **options: object
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int]:
    """One routed training step, ``CE + exp(−5·CE)·max(0, ρ − ρ̂)``: the loss, ``ρ̂``, the
    gradients, the routes and how many times the routed layers ran their branches."""
    model = routed_llama(unit, seed=12).train()
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **options
        )
    set_routing(model, mode, **({"temperature": 0.7, "keep_bias": 0.3} if mode == "soft" else {}))
    route_control(model).generator = torch.Generator().manual_seed(5)
    branch_runs = []
    for forward in routes_of(model).forwards:
        for name in ("_run", "_soft"):
            real = getattr(forward, name)

            def counted(*a: object, _real=real, **k: object) -> torch.Tensor:
                branch_runs.append(1)
                return _real(*a, **k)

            setattr(forward, name, counted)
    inputs = prompts()
    loss, realized = route_loss(model(**inputs, labels=inputs["input_ids"]).loss, model)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), realized.detach(), grads, route_control(model).routes(), len(branch_runs)


@NEEDS_LAYER_FORWARD_CHECKPOINTING
@pytest.mark.parametrize(
    ("mode", "unit"), [("random", "mha"), ("soft", "mha"), ("hard", "mha"), ("soft", "block")]
)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_step_bitwise(mode, unit, reentrant):
    """Under gradient checkpointing each routed layer decides its route outside the
    checkpoint and checkpoints its branches: the backward pass re-runs them (more branch
    runs) on the same route, so the loss with the sparsity term, ``ρ̂``, the routes and every
    gradient (routers' included, under soft routes, reentrant or not) equal an unchecked
    step's, bitwise."""
    loss, realized, grads, routes, runs = checkpointed_step(False, mode, reentrant, unit)
    loss_c, realized_c, grads_c, routes_c, runs_c = checkpointed_step(True, mode, reentrant, unit)
    assert runs_c > runs > 0  # the checkpointed branches ran again in the backward pass
    assert same_bits(loss[None], loss_c[None]) and same_bits(realized[None], realized_c[None])
    assert torch.equal(routes, routes_c) and routes.any() and not routes.all()
    assert grads.keys() == grads_c.keys() and all(same_bits(grads[n], grads_c[n]) for n in grads)
    assert all(any(f".{part}." in n for n in grads) for part in ("route_pia", "kept_adapter"))
    routers = [n for n in grads if re.search(r"layers\.\d+\.router\.", n)]
    assert (len(routers) > 0) == (mode == "soft")


@NEEDS_LAYER_FORWARD_CHECKPOINTING
def test_checkpointing_every_other_layer_gives_the_same_step_bitwise():
    """``every_n_layers=2`` (transformers >= 5.24) checkpoints layers 0 and 2 only: the
    other routed layers run as without checkpointing, and the step is the same, bitwise."""
    enable = getattr(type(tiny_llama()), "activation_checkpointing_enable", None)
    if enable is None or "every_n_layers" not in inspect.signature(enable).parameters:
        pytest.skip("this transformers release checkpoints every layer")
    loss, realized, grads, routes, runs = checkpointed_step(False, "soft", False)
    loss_c, realized_c, grads_c, routes_c, runs_c = checkpointed_step(
        True, "soft", False, every_n_layers=2
    )
    assert runs < runs_c < 2 * runs  # half of the layers ran their branches again
    assert same_bits(loss[None], loss_c[None]) and same_bits(realized[None], realized_c[None])
    assert torch.equal(routes, routes_c)
    assert grads.keys() == grads_c.keys() and all(same_bits(grads[n], grads_c[n]) for n in grads)


@NEEDS_LAYER_FORWARD_CHECKPOINTING
def test_a_checkpointed_layer_call_caches_nothing() -> None:
    """A routed layer called with a cache under gradient checkpointing drops it, as
    transformers' own layers do (the backward pass's re-run would write it twice): the
    cache stays empty and the call trains."""
    model = routed_llama("mha", seed=12).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_routing(model, "hard")
    x = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    positions = torch.arange(9)[None].expand(4, 9)
    rotary = model.model.rotary_emb(x, positions)
    cache = DynamicCache()
    layer = model.model.layers[1]
    arguments = {CACHE_ARGUMENT: cache, "use_cache": True, "position_ids": positions}
    out = layer(x, position_embeddings=rotary, **arguments)
    out.sum().backward()
    assert cache.get_seq_length() == 0 and x.grad is not None and x.grad.abs().sum() > 0


@NEEDS_LAYER_FORWARD_CHECKPOINTING
def test_route_trainer_trains_the_same_under_gradient_checkpointing(tmp_path) -> None:
    """RouteTrainer with ``gradient_checkpointing=True`` runs RoE's stages (random routes
    from the seeded RNG, then soft routes) to the same losses and weights, bitwise."""
    results = []
    for checkpointing in (False, True):
        model = routed_llama("mha", seed=10)
        flag = {ACTIVATION_CHECKPOINTING: checkpointing}  # its name since transformers 5.24
        arguments = cpu_training(tmp_path / str(checkpointing), 12, 3, **flag)
        trainer = RouteTrainer(model=model, args=arguments, train_dataset=reversal_rows())
        trainer.train()
        layers = model.model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        history = trainer.state.log_history
        losses = [(e["loss"], e["realized_ratio"]) for e in history if "loss" in e]
        results.append((losses, weights_snapshot(model)))
    (losses, weights), (losses_c, weights_c) = results
    assert len(losses) == 4 and losses == losses_c
    assert weights.keys() == weights_c.keys()
    assert all(same_bits(weights[k], weights_c[k]) for k in weights)


@pytest.mark.skipif(not CHECKPOINTING_REFUSED, reason="transformers >= 5.23 trains it")
@pytest.mark.parametrize("mode", ["random", "soft", "hard"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_before_5_23_is_refused_before_anything_runs(
    tmp_path, mode, reentrant
):
    """Before 5.23 transformers checkpoints a layer's whole call, route decision included:
    a random route would be drawn anew in the backward pass (CheckpointError, or another
    route's gradients) and a reentrant re-run leaves ρ̂ without the routers' gradient.
    Refused at the first forward in training mode (a reentrant checkpoint runs it under
    no_grad), naming the release that trains it, with the route state and the weights
    unchanged, and by RouteTrainer at construction; evaluation and the model without
    checkpointing still run."""
    model = routed_llama("mha", seed=12).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    set_routing(model, mode)
    snapshot = weights_snapshot(model)
    inputs = prompts()
    with pytest.raises(ValueError, match=r"transformers >= 5\.23; this is 5\."):
        model(**inputs, labels=inputs["input_ids"])
    assert route_control(model).skip_weights == {}
    assert_bitwise(model, snapshot)
    with torch.no_grad():
        model.eval()(**inputs)
    model.train().gradient_checkpointing_disable()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    arguments = cpu_training(tmp_path, 2, 1)
    arguments.gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient_checkpointing off"):
        RouteTrainer(model=model, args=arguments, train_dataset=reversal_rows())


# ---------------------------------------------------------------------- entry points
def test_patch_hf_and_patch_lavin_take_a_route_plan() -> None:
    import eas_kernels as E
    from tests.helpers import tiny_model

    model = tiny_llama().eval()
    snapshot, before = weights_snapshot(model), structure(model)
    plan = RoutePlan(4, unit="block", skip_rank=6)
    assert E.patch_hf(model, plan) is model and routes_of(model).plan == plan
    with torch.no_grad():
        model.generate(**prompts(), max_new_tokens=2, do_sample=False, pad_token_id=0)
    E.unpatch_hf(model)
    assert structure(model) == before
    assert_bitwise(model, snapshot)
    lavin = tiny_model()
    E.patch_lavin(lavin, RoutePlan(lavin.n_layers, unit="mha"))
    assert routes_of(lavin).plan.unit == "mha"
    with pytest.raises(TypeError, match="patch_hf"):
        E.unpatch_hf(lavin)
    E.unpatch(lavin)
    assert not hasattr(lavin, "_eas_routes")
    refusals = [
        (lambda: E.patch_lavin(tiny_llama(), plan), ValueError, "LaVIN-style blocks"),
        (lambda: E.patch_hf(tiny_model(), RoutePlan(4)), TypeError, "PreTrainedModel"),
        (lambda: E.patch_hf(tiny_llama(), plan, search=True), ValueError, "search must be"),
    ]
    for call, error, words in refusals:
        with pytest.raises(error, match=words):
            call()


def test_llava_language_model_routes_each_example() -> None:
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=63)
    ).eval()
    patch_routes(llava, RoutePlan(4, unit="mha", skip_rank=6))
    assert not any(".vision_tower." in n for n, p in llava.named_parameters() if p.requires_grad)
    randomize_routes(llava, 12)
    ids = torch.tensor([[2, 5, 6, 63, 63, 63, 63, 7, 8], [2, 9, 63, 63, 63, 63, 10, 11, 12]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    force_routes(llava, ROUTES[2:])
    together = generate(llava, inputs)
    for row in range(2):
        force_routes(llava, ROUTES[2 + row : 3 + row])
        single = generate(llava, {k: v[row : row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(
            step_logits(together)[row], step_logits(single)[0], rtol=1e-4, atol=1e-4
        )
