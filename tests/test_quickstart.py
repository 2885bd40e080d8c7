"""The README's main job, ``python/eas_quickstart.py``, end to end in its ``--quick`` form.

Runs the real SmolLM2-135M-Instruct on the iris prompts (tiny subsets, one epoch) as a
subprocess, exactly as a user would, and checks the JSON report it writes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "python" / "eas_quickstart.py"
TIMED = [
    "unpatched",
    "LaVIN-style (eager)",
    "EAS k=8 (eager)",
    "EAS k=8 (merged)",
    "floor: unpatched minus 8 MHAs",
]


def test_quickstart_quick_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report" / "quick.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--seed", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "EAS k=8, PIAs merged" in completed.stdout
    assert "deepest MHAs" in completed.stdout  # says how the skip set was chosen

    report = json.loads(out.read_text(encoding="utf-8"))
    for key in (
        "model_args",
        "dataset",
        "plan",
        "settings",
        "methods",
        "accuracies",
        "timings",
        "floor_definition",
        "environment",
        "date",
    ):
        assert key in report, key
    assert report["plan"]["skipped"] == list(range(21, 29))
    assert report["plan"]["num_layers"] == 30 and report["settings"]["quick"] is True
    assert report["settings"]["seed"] == 3
    assert report["model_args"]["dim"] == 576 and report["ffn_hidden_dim"] == 1536
    assert report["environment"]["torch"]
    assert report["dataset"]["train"] > 0 and report["dataset"]["test"] > 0

    accuracies = report["accuracies"]
    assert set(accuracies) == {"unpatched_zero_shot", "LaVIN-style", "EAS"}
    for value in accuracies.values():
        assert 0.0 <= value <= 1.0

    lavin, eas = report["methods"]["LaVIN-style"], report["methods"]["EAS"]
    assert lavin["plan"]["skipped"] == [] and eas["plan"]["skipped"] == list(range(21, 29))
    assert 0 < lavin["trainable_params"] < eas["trainable_params"]
    assert 0.0 < eas["trainable_percent"] < 1.0
    assert all(math.isfinite(loss) and loss > 0 for loss in lavin["epoch_losses"])

    assert set(report["timings"]) == set(TIMED)
    for name in TIMED:
        timing = report["timings"][name]
        for key in ("ms_per_token", "first_decode_ms", "prefill_ms", "speedup_vs_unpatched"):
            assert math.isfinite(timing[key]) and timing[key] > 0, (name, key)
        assert all(ms > 0 for ms in timing["step_ms"])
    assert report["timings"]["EAS k=8 (merged)"]["mode"] == "merge"
    # The floor computes what a freshly patched EAS model computes (fresh PIAs add zero).
    assert report["floor_vs_fresh_eas_max_abs_logit_diff"] < 1e-3
