"""The easy-vqa data set for the demo: questions, images, examples, a word tokenizer.

easy-vqa (``pip install easy-vqa``) holds 64×64 images of one coloured shape and questions
about them; :func:`vqa_examples` turns its records into tuning :class:`Example` s.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tuning.data import Example

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


class WordTokenizer:
    """A word-level tokenizer over a fixed vocabulary (tiny models, tests).

    Ids: 0 ``<pad>``, 1 ``<image>``, 2 ``<unk>``, then the words in the order given.
    Words are lower-case runs of letters; ``?`` and ``:`` are words of their own.
    """

    special = ("<pad>", "<image>", "<unk>")

    def __init__(self, words: Sequence[str]) -> None:
        vocabulary = list(self.special) + sorted(set(words) - set(self.special))
        self.vocabulary = vocabulary
        self.ids = {word: i for i, word in enumerate(vocabulary)}
        self.pad_token_id, self.image_token_id, self.unk_token_id = 0, 1, 2

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+|[?:]", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk_token_id) for word in self.words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocabulary[i] for i in ids)

    def __len__(self) -> int:
        return len(self.vocabulary)


@dataclass(frozen=True)
class VQARecord:
    """One easy-vqa question: its text, answer and image id (``split`` train or test)."""

    question: str
    answer: str
    image_id: int
    split: str


def _easy_vqa():  # noqa: ANN202 - the module
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("the easy-vqa data set is missing: pip install easy-vqa") from error
    return easy_vqa


def easy_vqa_records(
    split: str, limit: int | None, seed: int, *, balanced: bool = False
) -> list[VQARecord]:
    """``limit`` questions of ``split`` (``"train"`` or ``"test"``), a seeded random subset.

    ``balanced=True`` orders the shuffled questions round-robin over :data:`QUESTION_TYPES`
    (:func:`interleave_types`), so that every prefix holds each type about equally often;
    easy-vqa itself holds 3/4 yes/no questions.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    module = _easy_vqa()
    getter = module.get_train_questions if split == "train" else module.get_test_questions
    questions, answers, image_ids = getter()
    rows = zip(questions, answers, image_ids, strict=True)
    records = [VQARecord(q, a, int(i), split) for q, a, i in rows]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [records[i] for i in order]
    if balanced:
        shuffled = interleave_types(shuffled)
    return shuffled if limit is None else shuffled[:limit]


def interleave_types(records: Sequence[VQARecord]) -> list[VQARecord]:
    """``records`` reordered round-robin over :data:`QUESTION_TYPES` (colour, shape,
    yes/no, colour, ...), each type keeping its order; a type that runs out drops out."""
    queues = {
        kind: [r for r in records if question_type(r.answer) == kind] for kind in QUESTION_TYPES
    }
    ordered = []
    for row in itertools.zip_longest(*queues.values()):
        ordered.extend(record for record in row if record is not None)
    return ordered


def easy_vqa_images(split: str, image_ids: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{id: (3, 64, 64) float tensor in [0, 1]}`` for the given images of ``split``."""
    from PIL import Image

    module = _easy_vqa()
    paths = module.get_train_image_paths() if split == "train" else module.get_test_image_paths()
    images = {}
    for image_id in sorted(set(image_ids)):
        with Image.open(paths[image_id]) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        size = int((pixels.numel() // 3) ** 0.5)
        images[image_id] = pixels.view(size, size, 3).permute(2, 0, 1).float() / 255.0
    return images


def easy_vqa_words() -> list[str]:
    """Every word of easy-vqa's questions and answers (for a :class:`WordTokenizer`)."""
    module = _easy_vqa()
    words: set[str] = set()
    for getter in (module.get_train_questions, module.get_test_questions):
        questions, answers, _ = getter()
        for text in list(questions) + list(answers) + ["question: answer:"]:
            words.update(WordTokenizer.words(text))
    return sorted(words)


def vqa_prompt(question: str) -> str:
    return f" Question: {question} Answer:"


def vqa_examples(
    records: Sequence[VQARecord],
    images: dict[int, torch.Tensor],
    encode: object,
    image_token_id: int,
    num_image_tokens: int,
) -> list[Example]:
    """Examples ``[<image> × num_image_tokens] Question: ... Answer:`` → `` answer``.

    ``encode(text)`` gives token ids (a tokenizer's ``encode`` without special tokens).
    """
    if not callable(encode):
        raise TypeError("encode must be callable: text -> list of token ids")
    examples = []
    for record in records:
        prompt = [image_token_id] * num_image_tokens + list(encode(vqa_prompt(record.question)))
        answer = tuple(encode(" " + record.answer))
        examples.append(Example(tuple(prompt), answer, images[record.image_id]))
    return examples


QUESTION_TYPES = ("color", "shape", "yes/no")


def question_type(answer: str) -> str:
    """The kind of an easy-vqa question, read off its answer: ``"color"``, ``"shape"`` or
    ``"yes/no"`` (:data:`QUESTION_TYPES`)."""
    answer = answer.strip()
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    if answer in ("yes", "no"):
        return "yes/no"
    raise ValueError(f"{answer!r} is not an easy-vqa answer")


def image_labels(records: Sequence[VQARecord]) -> dict[int, tuple[int, int]]:
    """``{image id: (colour, shape)}`` read off the questions (``-1`` where unknown).

    Each easy-vqa image holds one shape of one colour; questions such as "what color is
    the shape?", "what is the blue shape?" or "is there a red shape?" → yes reveal them.
    """
    labels: dict[int, list[int]] = {}
    for record in records:
        entry = labels.setdefault(record.image_id, [-1, -1])
        words = WordTokenizer.words(record.question)
        if record.answer in COLORS:
            entry[0] = COLORS.index(record.answer)
        if record.answer in SHAPES:
            entry[1] = SHAPES.index(record.answer)
        affirmed = record.answer == "yes" and not {"not", "no"} & set(words)
        if record.question.startswith("what") or affirmed:
            for word in words:
                if word in COLORS:
                    entry[0] = COLORS.index(word)
                if word in SHAPES:
                    entry[1] = SHAPES.index(word)
    return {key: (value[0], value[1]) for key, value in labels.items()}
