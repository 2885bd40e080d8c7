"""Write ``summary.json`` of a GPU check folder (``scripts/gpu_check.sh``) and print it.

Reads the folder's ``.steps`` (one line per step: name, exit status, milliseconds),
``env.txt``, ``tests.xml`` (pytest's JUnit XML) and ``benchmarks.json``
(pytest-benchmark's), whichever exist, and writes ``summary.json``:

* ``steps``: each step's status and seconds; ``ok``: whether every step passed;
* ``environment``: device, capability, driver, versions (torch, triton, CUDA), date;
* ``tests``: counts (passed, failed, errors, skipped) and the names of failures;
* ``figures``: per benchmark, its median time and the ``extra_info`` it recorded (ratios
  against floors and rooflines, shapes, memory).

Exits 1 when a step failed (0 on success), so the check's own status says it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def read_steps(folder: Path) -> list[dict[str, Any]]:
    path = folder / ".steps"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, milliseconds = line.split()
            steps.append({"step": name, "status": int(status), "seconds": int(milliseconds) / 1000})
    return steps


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["driver"] = _driver()
    except ImportError as error:
        info["torch"] = f"not importable: {error}"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import eas_kernels

        backends = eas_kernels.backends()
        info["eas_kernels"] = eas_kernels.__version__
        info["cuda_kernels"] = backends["cuda"]
    except Exception as error:  # noqa: BLE001 - the report must be written anyway
        info["eas_kernels"] = f"not importable: {error}"
    return info


def _driver() -> str | None:
    import subprocess

    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def read_tests(folder: Path) -> dict[str, Any] | None:
    path = folder / "tests.xml"
    if not path.is_file():
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def read_figures(folder: Path) -> list[dict[str, Any]] | None:
    path = folder / "benchmarks.json"
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    return [
        {
            "name": bench["name"],
            "median_ms": round(1e3 * bench["stats"]["median"], 4),
            **bench.get("extra_info", {}),
        }
        for bench in document.get("benchmarks", [])
    ]


def summarize(folder: Path, dry_run: bool) -> dict[str, Any]:
    steps = read_steps(folder)
    return {
        "dry_run": dry_run,
        "ok": bool(steps) and all(step["status"] == 0 for step in steps),
        "steps": steps,
        "environment": environment(),
        "tests": read_tests(folder),
        "figures": read_figures(folder),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    args = parser.parse_args(argv)
    summary = summarize(args.folder, bool(args.dry_run))
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for step in summary["steps"]:
        mark = "ok" if step["status"] == 0 else f"FAILED (exit {step['status']})"
        print(f"{step['step']:14s} {step['seconds']:8.1f} s  {mark}")
    if summary["tests"] is not None:
        print("tests:", {k: v for k, v in summary["tests"].items() if k != "failures"})
    for figure in summary["figures"] or []:
        ratios = {k: v for k, v in figure.items() if "ratio" in k}
        print(f"{figure['name']:60s} {figure['median_ms']:10.3f} ms  {ratios}")
    print(f"summary: {args.folder / 'summary.json'} ({'ok' if summary['ok'] else 'FAILED'})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
