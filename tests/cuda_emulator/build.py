"""Build ``_C_cuda`` from csrc/cuda's own sources for the CPU, on the CUDA emulator.

The sources are copied with each launch ``kernel<<<grid, threads, shared, stream>>>(args)``
rewritten as ``::emu::launch(::emu::Config{grid, threads, shared, stream}, kernel, args)``
(the only change) and compiled by the host C++ compiler against ``cuda_runtime.h`` here
instead of the CUDA toolkit's. The result is a module with the real ``_C_cuda``'s bindings
(``cuda/module.cpp``) whose kernels run on the CPU, on host pointers: the native tests run
it through ``eas_kernels._native`` like the GPU module (tests/native_helpers.py,
``cuda-emulated``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

import pybind11

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", re.S)
UNITS = ("merge.cu", "lowrank.cu", "device.cu", "module.cpp")


def emulated_source(text: str) -> str:
    """``text`` with every kernel launch rewritten for the emulator."""
    return LAUNCH.sub(r"::emu::launch(::emu::Config{\2}, \1, ", text)


def _sources() -> dict[str, str]:
    files = {name: (CSRC / name).read_text() for name in ("abi.h", "binding.h")}
    for path in sorted((CSRC / "cuda").iterdir()):
        files[f"cuda/{path.name}"] = emulated_source(path.read_text())
    for path in sorted(HERE.glob("*.[hc]*")):
        files[f"emulator/{path.name}"] = path.read_text()
    files["cpu/scalar.h"] = (CSRC / "cpu" / "scalar.h").read_text()
    return files


SANITIZERS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]


def build(cache: Path, *, sanitize: bool = False) -> Path:
    """The emulated module's path, built under ``cache`` unless its sources are unchanged.

    ``sanitize``: with AddressSanitizer and UndefinedBehaviorSanitizer (load it in a process
    that preloads libasan, see :func:`sanitizer_environment`): every access of a kernel out
    of its tensors' allocations, and every undefined operation, aborts with a report.
    """
    files = _sources()
    recipe = (sanitize, sorted(files.items()), Path(__file__).read_text())  # flags too
    key = hashlib.sha256(repr(recipe).encode()).hexdigest()[:16]
    root = cache / f"emulated-{key}"
    target = root / f"_C_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.is_file():
        return target
    shutil.rmtree(root, ignore_errors=True)
    source = root / "src"
    for name, text in files.items():
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    compiler = os.environ.get("CXX", "c++")
    flags = [
        "-std=c++20", "-O2", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
        f"-I{source / 'emulator'}", f"-I{source / 'cuda'}", f"-I{source / 'cpu'}",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        '-DEAS_CUDA_ARCHS="emulated"', *(SANITIZERS if sanitize else []),
    ]  # fmt: skip
    objects = []
    for unit in (*(f"cuda/{name}" for name in UNITS), "emulator/runtime.cpp"):
        obj = root / (Path(unit).stem + ".o")
        subprocess.run(
            [compiler, *flags, "-x", "c++", "-c", str(source / unit), "-o", str(obj)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        objects.append(str(obj))
    partial = target.with_suffix(".partial")
    subprocess.run(
        [compiler, "-shared", "-pthread", *(SANITIZERS if sanitize else []), *objects,
         "-o", str(partial)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    partial.rename(target)
    return target


def sanitizer_environment() -> dict[str, str]:
    """The environment of a process that loads the sanitized module: libasan preloaded (the
    interpreter is not instrumented), leaks not reported (the interpreter's own)."""
    compiler = os.environ.get("CXX", "c++")
    libasan = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return {
        **os.environ,
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }


def load(cache: Path, *, sanitize: bool = False) -> ModuleType:
    """The emulated ``_C_cuda`` (built if needed)."""
    spec = importlib.util.spec_from_file_location("_C_cuda", build(cache, sanitize=sanitize))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
