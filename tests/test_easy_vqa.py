"""The demo's easy-vqa questions: question types, the balanced mix, bad requests."""

from __future__ import annotations

from collections import Counter

import pytest

from eas_kernels.demo.easy_vqa import (
    QUESTION_TYPES,
    VQARecord,
    easy_vqa_records,
    interleave_types,
    question_type,
)


def record(answer: str, index: int) -> VQARecord:
    return VQARecord(f"question {index}", answer, index, "train")


def test_interleave_types_takes_the_types_in_turn_keeping_their_order():
    answers = ["yes", "no", "red", "yes", "circle", "blue", "no", "yes", "triangle"]
    records = [record(answer, i) for i, answer in enumerate(answers)]
    ordered = interleave_types(records)
    assert [r.answer for r in ordered] == [
        "red", "circle", "yes",
        "blue", "triangle", "no",
        "yes", "no", "yes",
    ]  # fmt: skip
    assert sorted(r.image_id for r in ordered) == list(range(len(records)))


def test_question_types_are_read_off_the_answer():
    assert [question_type(a) for a in (" teal", "rectangle", "no")] == list(QUESTION_TYPES)
    with pytest.raises(ValueError, match="not an easy-vqa answer"):
        question_type("purple")


def test_balanced_records_are_a_reordering_with_balanced_prefixes():
    pytest.importorskip("easy_vqa", reason="needs easy-vqa (pip install easy-vqa)")
    natural = easy_vqa_records("test", None, seed=3)
    balanced = easy_vqa_records("test", None, seed=3, balanced=True)
    assert sorted(natural, key=repr) == sorted(balanced, key=repr)
    head = Counter(question_type(r.answer) for r in balanced[:600])
    assert head == {kind: 200 for kind in QUESTION_TYPES}
    natural_head = Counter(question_type(r.answer) for r in natural[:600])
    assert natural_head["yes/no"] > 400  # easy-vqa holds about 3/4 yes/no questions
    assert easy_vqa_records("test", 30, seed=3, balanced=True) == balanced[:30]
    with pytest.raises(ValueError, match="limit"):
        easy_vqa_records("test", 0, seed=3, balanced=True)


def test_a_bad_question_mix_is_refused_before_anything_loads():
    from eas_kernels.demo.workload import WorkloadConfig, build_workload

    with pytest.raises(TypeError, match="balanced must be a bool"):
        build_workload(WorkloadConfig(model="tiny", balanced="yes"), log=lambda _: None)


def test_stage0_aligns_the_projector_with_the_words_and_caches_it(tmp_path):
    """Stage 0b moves the image tokens towards the embeddings of the words that describe
    the image; the cache gives the same tower and projector as training them."""
    pytest.importorskip("easy_vqa", reason="needs easy-vqa (pip install easy-vqa)")
    import torch

    from eas_kernels.demo.workload import WorkloadConfig, build_workload, stage0_cache_name

    small = {"model": "tiny", "train": 8, "held_out": 2, "test": 2, "vision_epochs": 1}
    unaligned = build_workload(WorkloadConfig(**small, align_epochs=0), log=lambda _: None)
    assert "projector_alignment" not in unaligned.info
    config = WorkloadConfig(**small, align_epochs=3)
    aligned = build_workload(config, cache_dir=tmp_path, log=lambda _: None)
    scores = aligned.info["projector_alignment"]
    # chance: 1/8 and 1/3 (a one-epoch tower tells shapes apart poorly)
    assert scores["color_accuracy"] > 0.5 and scores["shape_accuracy"] > 1 / 3
    torch.testing.assert_close(
        aligned.model.vision.state_dict(), unaligned.model.vision.state_dict(), rtol=0, atol=0
    )
    assert not torch.equal(aligned.model.projector.weight, unaligned.model.projector.weight)
    assert (tmp_path / stage0_cache_name(config)).is_file()
    cached = build_workload(config, cache_dir=tmp_path, log=lambda _: None)
    assert "cached" in cached.info["vision"]
    for module in ("vision", "projector"):
        expected = getattr(aligned.model, module).state_dict()
        torch.testing.assert_close(
            getattr(cached.model, module).state_dict(), expected, rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="align_epochs must be an int >= 0"):
        build_workload(WorkloadConfig(**{**small, "vision_epochs": 1}, align_epochs=-1))
