"""What per-example routing (RoE, issue 19) costs: a training step as the router
temperature anneals, and decoding against each route's floor and against RoE's any-keeps
batch rule.

A LaVIN-layout model (d = 256, 8 layers, random weights) routed on every layer
(``RoutePlan(unit=...)``) with random, non-zero routers, shortcuts and kept adapters:

* **training step vs temperature** (``mha``): forward, backward and AdamW on a batch of 8
  × 48-token prompts under soft routes at τ = 1 and τ = 0.01, and under hard routes,
  interleaved. As τ anneals the losing soft weight underflows; a branch whose weight is
  below the dtype's epsilon is not computed (``RoutedForward``), which removed a
  subnormal slowdown (a scratch script before the fix: 794 ms at τ = 0.01 against 274 ms
  at τ = 1). The ratio τ = 0.01 / τ = 1 guards that fix.
* **batch 1** (``mha`` and ``block``): one prompt routed by a fixed route (3 of 8 units
  skipped, ``force_routes``) against the floor of that route (the unpatched model with
  those units removed), interleaved step by step (``tuning.evaluate.time_models``).
* **batch 8** (``mha`` and ``block``): 8 prompts with 8 different fixed routes (3 of 8
  units each), per-example skipping against the any-keeps rule (a unit runs for the whole
  batch when any example keeps it), and for ``mha`` per-example skipping with the skipped
  MHAs' PIAs run eagerly against the low-rank path (``RouteControl.lowrank``), decode
  steps rotating between the variants; at the short shape above (op-bound) and at a
  KV-bound one (``LONG_ARGS``: d = 512, full multi-head KV, 768-token prompts), where a
  skipped example's attention no longer reads its keys and values.

``pytest benchmarks/test_routing.py --benchmark-only``; ``extra_info`` holds the ratios,
shapes, device and versions. Nothing is asserted about speed.
"""

from __future__ import annotations

import copy
import datetime
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.roofline import machine, paired_medians, randomize_trainables
from eas_kernels import SkipPlan
from eas_kernels.models.lavin import ModelArgs, Transformer
from eas_kernels.routing import RoutePlan, force_routes, patch_routes, route_control, set_routing
from eas_kernels.tuning import Example, answer_loss, collate
from eas_kernels.tuning.evaluate import floor_model, paired_ratio, time_models

ARGS = dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=1000, multiple_of=64,
            max_seq_len=128, max_batch_size=8)  # fmt: skip
LAYERS, BATCH, PROMPT, ANSWER = 8, 8, 48, 2
# the batch-8 decode also at a KV-bound shape: 768-token prompts, full multi-head KV
LONG_ARGS = dict(ARGS, dim=512, n_kv_heads=8, max_seq_len=800)
LONG_PROMPT = 768
ROUTE = [False, True, False, False, True, False, True, False]  # 3 of 8 skipped
BATCH_ROUTES = [[(i + j) % LAYERS in (0, 3, 5) for j in range(LAYERS)] for i in range(BATCH)]


def base_model(args: dict = ARGS) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(**args)).eval()


def routed(unit: str, args: dict = ARGS) -> tuple[torch.nn.Module, Transformer]:
    base = base_model(args)
    model = patch_routes(copy.deepcopy(base), RoutePlan(LAYERS, unit=unit, ratio=0.3))
    randomize_trainables(model, seed=1)
    return model, base


def examples(prompt: int = PROMPT) -> list[Example]:
    generator = torch.Generator().manual_seed(2)
    return [
        Example(
            tuple(torch.randint(1, 900, (prompt,), generator=generator).tolist()),
            tuple(torch.randint(1, 900, (ANSWER,), generator=generator).tolist()),
        )
        for _ in range(BATCH)
    ]


def info(args: dict = ARGS, prompt: int = PROMPT, **entries: object) -> dict[str, object]:
    return dict(
        entries,
        shape=dict(args, batch=BATCH, prompt=prompt),
        date=datetime.date.today().isoformat(),
        **machine(),
    )


def test_training_step_as_the_temperature_anneals(benchmark):
    """Soft routes at τ = 1 and τ = 0.01, and hard routes: forward, backward, AdamW."""
    model, _ = routed("mha")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collate(examples(), 0)
    model.train()

    def step(mode: str, temperature: float):
        def run() -> None:
            set_routing(model, mode, temperature=temperature)
            loss = answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    variants = {
        "soft_tau_1": step("soft", 1.0),
        "soft_tau_0.01": step("soft", 0.01),
        "hard": step("hard", 1.0),
    }
    medians = benchmark.pedantic(
        lambda: paired_medians(variants, rounds=15), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        info(
            median_step_ms={k: round(1e3 * v, 2) for k, v in medians.items()},
            tau_0_01_over_tau_1=medians["soft_tau_0.01"] / medians["soft_tau_1"],
            hard_over_soft_tau_1=medians["hard"] / medians["soft_tau_1"],
        )
    )


@pytest.mark.parametrize("unit", ["mha", "block"])
def test_batch_one_decode_against_the_route_floor(benchmark, unit):
    model, base = routed(unit)
    set_routing(model, "hard")
    force_routes(model, torch.tensor([ROUTE]))
    skipped = [i for i, skip in enumerate(ROUTE) if skip]
    ffns = skipped if unit == "block" else ()
    floor = floor_model(base, SkipPlan(LAYERS, skipped, skipped_ffns=ffns))
    prompts = examples()[:4]
    timings = benchmark.pedantic(
        lambda: time_models({"routed": (model, None), "floor": (floor, None)}, prompts, 24),
        rounds=1,
        iterations=1,
    )
    ratio = paired_ratio(timings, "routed", "floor")
    benchmark.extra_info.update(
        info(
            unit=unit,
            route=skipped,
            routed_over_route_floor=ratio,
            ms_per_token={k: v["ms_per_token"] for k, v in timings.items()},
        )
    )


@pytest.mark.parametrize("shape", ["short", "long"])
@pytest.mark.parametrize("unit", ["mha", "block"])
def test_batch_eight_per_example_against_any_keeps(benchmark, unit, shape):
    args, prompt = (ARGS, PROMPT) if shape == "short" else (LONG_ARGS, LONG_PROMPT)
    model, _ = routed(unit, args)
    set_routing(model, "hard")
    force_routes(model, torch.tensor(BATCH_ROUTES))
    control = route_control(model)
    batch = collate([Example(e.prompt, ()) for e in examples(prompt)], 0)
    width = batch.tokens.shape[1]

    # (batch rule, low-rank path for skipped MHAs); block shortcuts have no low-rank path
    variants = {"per_example": ("per_example", True), "any_keeps": ("any_keeps", True)}
    if unit == "mha":
        variants["per_example_eager"] = ("per_example", False)

    @torch.no_grad()
    def decode(variant: str) -> list[float]:
        rule, control.lowrank = variants[variant]
        control.set_batch_rule(rule)
        logits = model(batch.tokens, start_pos=0, prompt_mask=batch.prompt_mask)[:, -1]
        steps = []
        for position in range(width, width + 12):
            began = time.perf_counter()
            logits = model(logits.argmax(-1, keepdim=True), start_pos=position)[:, -1]
            steps.append(time.perf_counter() - began)
        return steps

    def measure() -> dict[str, float]:
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        names = list(times)
        for round_ in range(9 if shape == "short" else 5):  # round 0 warms up; order rotates
            shift = round_ % len(names)
            for variant in names[shift:] + names[:shift]:
                steps = decode(variant)
                if round_:
                    times[variant].extend(steps)
        control.set_batch_rule("per_example")
        control.lowrank = True
        return {variant: statistics.median(values) for variant, values in times.items()}

    medians = benchmark.pedantic(measure, rounds=1, iterations=1)
    ratios = {"any_keeps_over_per_example": medians["any_keeps"] / medians["per_example"]}
    if unit == "mha":
        ratios["eager_over_lowrank"] = medians["per_example_eager"] / medians["per_example"]
    benchmark.extra_info.update(
        info(
            args,
            prompt,
            unit=unit,
            routes=[[i for i, s in enumerate(row) if s] for row in BATCH_ROUTES],
            ms_per_step={k: round(1e3 * v, 3) for k, v in medians.items()},
            **ratios,
        )
    )


def saved_activation_bytes(step: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``step``
    outside any checkpoint (a checkpoint's own hooks take the tensors saved inside it)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def test_training_step_under_gradient_checkpointing(benchmark):
    """RoE's joint stage (soft routes, τ = 1) on a Hugging Face LLaMA at SmolLM2-135M's
    shape (random weights, ``mha`` routed on all 30 layers), a batch of 4 × 128 tokens:
    forward, backward and AdamW with and without gradient checkpointing (non-reentrant,
    transformers' default), interleaved; and the activations each keeps for the backward
    pass. Expected: the saved activations fall from every layer's intermediates to the
    layer inputs (≈ 10× less), for one more forward of each layer (a step ≈ 1.3× slower)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eas_kernels.routing import route_loss
    from eas_kernels.routing.hf import checkpointing_refusal

    if checkpointing_refusal() is not None:
        pytest.skip("transformers < 5.23 checkpoints a layer's whole call (refused)")
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    models = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = patch_routes(LlamaForCausalLM(config), RoutePlan(30, unit="mha", ratio=0.3))
        randomize_trainables(model, seed=1)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        set_routing(model.train(), "soft", temperature=1.0)
        models["checkpointed" if checkpointing else "plain"] = model
    ids = torch.randint(3, 49000, (4, 128), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :96] = -100  # a 96-token prompt and 32 answer tokens

    def step(model: torch.nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        def run() -> None:
            loss, _ = route_loss(model(input_ids=ids, labels=labels).loss, model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    variants = {name: step(model) for name, model in models.items()}
    saved = {name: saved_activation_bytes(run) for name, run in variants.items()}
    medians = benchmark.pedantic(lambda: paired_medians(variants, rounds=5), rounds=1, iterations=1)
    benchmark.extra_info.update(
        info(
            dict(config.to_diff_dict(), layers=30),
            128,
            median_step_ms={k: round(1e3 * v, 1) for k, v in medians.items()},
            checkpointed_over_plain=medians["checkpointed"] / medians["plain"],
            saved_activation_mb={k: round(v / 2**20, 1) for k, v in saved.items()},
            saved_plain_over_checkpointed=saved["plain"] / saved["checkpointed"],
        )  # fmt: skip
    )
