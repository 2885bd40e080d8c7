"""The GPU check's report writer and argument handling (scripts/gpu_check.sh; the whole
dry run is a step of .ci/run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check_report  # noqa: E402

TESTS_XML = """<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_native_merge" name="test_a[cuda]"/>
<testcase classname="tests.test_native_merge" name="test_b[cuda]"><failure message="x"/></testcase>
<testcase classname="tests.test_cuda_graphs" name="test_c"><skipped message="y"/></testcase>
<testcase classname="tests.test_pia_fused" name="test_d"><error message="z"/></testcase>
</testsuite></testsuites>"""


def test_the_summary_collects_steps_tests_and_figures(tmp_path):
    (tmp_path / ".steps").write_text("env 0 0\nbuild 0 61250\ntests 1 90000\n")
    (tmp_path / "tests.xml").write_text(TESTS_XML)
    benchmark = {
        "name": "test_graphed_decode_step[eas_12]",
        "stats": {"median": 0.0123456},
        "extra_info": {"graphed_ratio_vs_floor": 1.01, "variant": "eas_12"},
    }
    (tmp_path / "benchmarks.json").write_text(json.dumps({"benchmarks": [benchmark]}))
    assert gpu_check_report.main([str(tmp_path)]) == 1  # the tests step failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["ok"] and summary["dry_run"] is False
    assert summary["steps"][1] == {"step": "build", "status": 0, "seconds": 61.25}
    assert summary["tests"] == {
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
        "failures": [
            "tests.test_native_merge::test_b[cuda]",
            "tests.test_pia_fused::test_d",
        ],
    }
    assert summary["figures"] == [
        {
            "name": "test_graphed_decode_step[eas_12]",
            "median_ms": 12.3456,
            "graphed_ratio_vs_floor": 1.01,
            "variant": "eas_12",
        }
    ]
    assert summary["environment"]["torch"] and summary["environment"]["eas_kernels"]


def test_a_check_whose_steps_all_passed_is_ok(tmp_path):
    (tmp_path / ".steps").write_text("env 0 0\nbuild 0 10\n")
    assert gpu_check_report.main([str(tmp_path), "--dry-run", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"] and summary["tests"] is None


def test_the_script_refuses_bad_arguments():
    for arguments, message in (([], "--out DIR is required"), (["--fast"], "unknown argument")):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *arguments],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr
