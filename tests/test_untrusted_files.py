"""Files of a run folder are untrusted: no loader unpickles code (issue 17, finding 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eas_kernels import SkipPlan, patch_lavin
from eas_kernels.files import load_tensor_file
from eas_kernels.tuning import EASTuner
from eas_kernels.tuning.trainer import CHECKPOINT_FILE
from tests.test_tuning import config, examples, searching_model, trainables


class RunsCode:
    """A pickle that, unpickled without weights_only, creates ``marker`` (any call would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious(path: Path, marker: Path, **entries: object) -> Path:
    """A ``torch.save`` dict at ``path`` whose entries include one that would run code."""
    torch.save({**entries, "payload": RunsCode(marker)}, path)
    return path


def test_load_tensor_file_refuses_code_truncation_and_wrong_contents(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match=r"evil\.pt is not a thing that can be read safely"):
        load_tensor_file(malicious(tmp_path / "evil.pt", marker), "thing")
    assert not marker.exists()
    torch.save({"a": torch.ones(3)}, tmp_path / "good.pt")
    assert torch.equal(load_tensor_file(tmp_path / "good.pt", "thing", ["a"])["a"], torch.ones(3))
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt is not a thing: not a file written by torch"):
        load_tensor_file(tmp_path / "cut.pt", "thing")
    (tmp_path / "text.pt").write_text("12 garbage\n")  # torch.load: "invalid literal for int()"
    with pytest.raises(ValueError, match=r"text\.pt is not a thing: not a file written by torch"):
        load_tensor_file(tmp_path / "text.pt", "thing")
    with pytest.raises(FileNotFoundError, match=r"none\.pt: no such file \(a thing\)"):
        load_tensor_file(tmp_path / "none.pt", "thing")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        load_tensor_file(tmp_path / "list.pt", "thing")
    with pytest.raises(ValueError, match=r"lacks \['b'\]"):
        load_tensor_file(tmp_path / "good.pt", "thing", ["a", "b"])


def test_a_malicious_tuner_checkpoint_is_refused_before_the_run_changes(tmp_path):
    marker = tmp_path / "ran"
    malicious(tmp_path / CHECKPOINT_FILE, marker, config={})
    model = searching_model()
    before = trainables(model)
    tuner = EASTuner(model, examples(16, 1), examples(4, 2), config(), pad_id=0, run_dir=tmp_path)
    with pytest.raises(ValueError, match="not a tuner checkpoint that can be read safely"):
        tuner.run()
    assert not marker.exists()
    assert all(torch.equal(value, before[name]) for name, value in trainables(model).items())


def test_malicious_multimodal_files_are_refused(tmp_path):
    pytest.importorskip("easy_vqa", reason="the workload needs easy-vqa")
    from eas_kernels.demo.workload import (
        MULTIMODAL_FILE,
        WorkloadConfig,
        build_workload,
        load_tuned,
        save_tuned,
        stage0_cache_name,
    )

    marker = tmp_path / "ran"
    workload_config = WorkloadConfig(model="tiny", train=4, held_out=2, test=2, vision_epochs=1)
    cache = tmp_path / "cache"
    cache.mkdir()
    malicious(cache / stage0_cache_name(workload_config), marker, vision={}, projector={})
    with pytest.raises(ValueError, match="not a stage-0 cache that can be read safely"):
        build_workload(workload_config, cache_dir=cache, log=lambda _: None)
    assert not marker.exists()

    workload = build_workload(workload_config, log=lambda _: None)
    tuned = patch_lavin(workload.model, SkipPlan(workload.model.llm.n_layers, [1]))
    folder = save_tuned(tuned, tmp_path / "tuned", active_only=True)
    base = build_workload(workload_config, pretrain_vision=False, log=lambda _: None).model
    assert load_tuned(base, folder) is not None  # the genuine file loads
    malicious(folder / MULTIMODAL_FILE, marker, vision={}, projector={})
    with pytest.raises(ValueError, match="not a tuned vision tower that can be read safely"):
        load_tuned(base, folder)
    assert not marker.exists()
