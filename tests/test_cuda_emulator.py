"""The CUDA kernels' own source on the CPU under AddressSanitizer and UBSan (memcheck here).

The native kernel tests already run the CUDA sources on the CUDA emulator
(``cuda-emulated`` in tests/native_helpers.py). This runs every kernel once on the shapes
of the GPU check's compute-sanitizer step (``scripts/gpu_kernels_once.py``, which reach
every launch configuration: aligned and unaligned rows, every column tile, both row blocks
of the low-rank add) with the emulated module built with ``-fsanitize=address,undefined``:
a read or write outside a tensor's allocation, or an undefined operation, aborts the
process with a report. (A kernel reading B past its rows was caught this way when tried.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.cuda_emulator import build
from tests.native_helpers import requires_cpu_kernels

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import runpy, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from tests.cuda_emulator import build
from eas_kernels import _native
module = build.load(Path(sys.argv[2]), sanitize=True)
_native.module = lambda device: module
_native.launch_args = lambda device: (0, 0)
once = runpy.run_path(str(Path(sys.argv[1]) / "scripts" / "gpu_kernels_once.py"))
with torch.no_grad():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in once["SHAPES"]:
            once["run"](torch.device("cpu"), dtype, *shape)
print("every kernel ran clean")
"""


@requires_cpu_kernels
def test_every_cuda_kernel_runs_clean_under_address_and_undefined_behaviour_sanitizers():
    cache = Path(tempfile.gettempdir()) / "eas_kernels_cuda_emulator"
    build.build(cache, sanitize=True)  # here, so that a compile error shows as one
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT), str(cache)],
        capture_output=True, text=True, env=build.sanitizer_environment(), timeout=1200,
    )  # fmt: skip
    report = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, report
    assert "every kernel ran clean" in result.stdout, report
    assert "runtime error" not in result.stderr, report  # UBSan
