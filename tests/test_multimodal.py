"""LaVINStyleMLLM: image features at the placeholders, frozen-state decoding with images."""

from __future__ import annotations

import copy

import pytest
import torch

from eas_kernels import SkipPlan, greedy_generate, patch_lavin, reparameterize
from eas_kernels.models.multimodal import LaVINStyleMLLM, VisionTower
from tests.helpers import randomize_pias, tiny_model

IMAGE = 5  # placeholder id


def mllm(seed: int = 0) -> LaVINStyleMLLM:
    torch.manual_seed(seed)
    model = LaVINStyleMLLM(tiny_model(seed=seed), IMAGE, VisionTower(channels=8, grid=2))
    model.vision.requires_grad_(False)
    return model.eval()


def prompt(text: list[int], grid: int = 2) -> list[int]:
    return [IMAGE] * grid * grid + text


def test_image_features_replace_the_placeholders_in_order():
    model = mllm()
    images = torch.rand(2, 3, 32, 32)
    tokens = torch.tensor([prompt([9, 10, 11]), [12] + prompt([13, 14])])
    features = model.image_embeddings(images)
    embeds = model.llm.tok_embeddings(tokens).clone()
    embeds[0, :4] = features[0]
    embeds[1, 1:5] = features[1]
    expected = model.llm(tokens, embeds=embeds)
    torch.testing.assert_close(model(tokens, images=images), expected, rtol=0, atol=0)
    assert features.shape == (2, 4, model.llm.params.dim)


def test_bad_calls_are_refused():
    model = mllm()
    tokens = torch.tensor([prompt([9, 10])])
    with pytest.raises(ValueError, match="no images"):
        model(tokens)
    with pytest.raises(ValueError, match="4 image placeholders"):
        model(torch.tensor([[IMAGE, 9, 10]]), images=torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="batch"):
        model(tokens, images=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(tokens, images=torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="image_token_id"):
        LaVINStyleMLLM(tiny_model(), 1000)
    with pytest.raises(TypeError, match="llm"):
        LaVINStyleMLLM(torch.nn.Linear(2, 2), IMAGE)


def test_a_generated_placeholder_is_a_token_at_decode_steps():
    """A model may generate the placeholder id; a decode step embeds it as text (the demo's
    timing of an untuned model once stopped on it)."""
    model = mllm()
    tokens = torch.tensor([prompt([9, 10])])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        model(tokens, start_pos=0, prompt_mask=mask, images=torch.rand(1, 3, 32, 32))
        twin = copy.deepcopy(model)  # the same caches
        step = model(torch.tensor([[IMAGE]]), start_pos=tokens.shape[1])
        expected = twin.llm(torch.tensor([[IMAGE]]), start_pos=tokens.shape[1])  # as text
    torch.testing.assert_close(step, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no images"):
        model(tokens, start_pos=0)


def test_a_frozen_vision_tower_stays_in_eval_mode():
    model = mllm()
    model.train()
    assert model.llm.training and not model.vision.training
    model.vision.requires_grad_(True)
    model.train()
    assert model.vision.training


@pytest.mark.parametrize("mode", ["eager", "merge"])
def test_patched_mllm_decodes_what_teacher_forcing_computes(mode):
    """EAS_SPEC §3 with images: states over the prompt (image tokens included) at prefill."""
    model = patch_lavin(mllm(seed=3), SkipPlan(4, [1, 2], skip_rank=4, adapter_rank=2))
    randomize_pias(model, seed=4)
    image = torch.rand(1, 3, 32, 32)
    text = prompt([20, 21, 22, 23])
    reparameterize(model, mode)
    generated = greedy_generate(model, [text], 3, prefill_kwargs={"images": image})
    sequence = torch.tensor([text + generated.tokens[0]])
    prompt_mask = torch.zeros_like(sequence, dtype=torch.bool)
    prompt_mask[0, : len(text)] = True
    forced = model(sequence, prompt_mask=prompt_mask, images=image)[0, len(text) - 1 : -1]
    torch.testing.assert_close(generated.logits[0], forced, rtol=2e-4, atol=2e-4)
    other = greedy_generate(model, [text], 3, prefill_kwargs={"images": torch.rand(1, 3, 32, 32)})
    assert not torch.allclose(other.logits, generated.logits)  # the image matters


def test_batched_low_rank_accuracy_is_batch_one_merged_accuracy():
    """answer_correct decodes batches of equal answer length with the low-rank path; each
    answer is the one merged batch-1 decoding gives (EAS_SPEC §4: the modes agree)."""
    from eas_kernels.tuning import Example
    from eas_kernels.tuning.evaluate import answer_accuracy, answer_correct

    model = patch_lavin(mllm(seed=5), SkipPlan(4, [0, 3], skip_rank=4, adapter_rank=2))
    randomize_pias(model, seed=6)
    generator = torch.Generator().manual_seed(7)
    examples = []
    for index in range(11):
        text = torch.randint(6, 90, (2 + index % 4,), generator=generator).tolist()
        image = torch.rand(3, 32, 32, generator=generator)
        reference = greedy_generate(
            reparameterize(model, "merge"),
            [prompt(text)],
            1 + index % 2,
            prefill_kwargs={"images": image[None]},
        ).tokens[0]
        answer = tuple(reference) if index % 3 else (reference[0] + 1,) + tuple(reference[1:])
        examples.append(Example(tuple(prompt(text)), answer, image))
    merged = answer_correct(model, examples, pad_id=0, mode="merge")
    assert merged == [bool(i % 3) for i in range(11)]
    assert answer_correct(model, examples, pad_id=0, mode="lowrank", batch_size=4) == merged
    assert answer_correct(model, examples, pad_id=0, mode="eager", batch_size=8) == merged
    assert answer_accuracy(model, examples, pad_id=0, mode="lowrank", batch_size=3) == 7 / 11
    with pytest.raises(ValueError, match='mode "merge" decodes one prompt at a time'):
        answer_correct(model, examples, pad_id=0, mode="merge", batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        answer_correct(model, examples, pad_id=0, mode="eager", batch_size=0)
