"""Build script for the native kernels of csrc/; metadata lives in pyproject.toml.

* ``eas_kernels._C`` — the CPU kernels (C++17, OpenMP, -O3; AVX-512, AVX2 and portable
  variants chosen at run time), always built;
* ``eas_kernels._C_cuda`` — the CUDA kernels, built when ``nvcc`` is found: the ``.cu``
  sources compile in parallel with ninja, include only the CUDA toolkit, and link the CUDA
  runtime statically (``-cudart static``).

Neither module links libtorch: Python passes data pointers, shapes, strides, dtype codes
and a stream handle (``eas_kernels/_native.py``), so a torch upgrade cannot break them.

Environment:
    EAS_BUILD_CUDA   unset: CUDA kernels when nvcc is found; ``0``: never; ``1``: always
                     (a build error without nvcc).
    EAS_CUDA_ARCHS   compute capabilities, e.g. ``"80;90"`` (the default: A100, H100).
    CUDA_HOME        toolkit root (else the ``nvcc`` on PATH, else /usr/local/cuda).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

from pybind11 import get_include
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")
DEFAULT_ARCHS = "80;90"


def _sources(folder: str, *suffixes: str) -> list[str]:
    return sorted(str(p) for p in (CSRC / folder).iterdir() if p.suffix in suffixes)


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_archs() -> list[str]:
    text = os.environ.get("EAS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "") for a in text.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise RuntimeError(
            f"EAS_CUDA_ARCHS must list compute capabilities like '80;90', got {text!r}"
        )
    return archs


def _cuda_plan() -> tuple[str | None, str]:
    """``(nvcc, reason)``: nvcc to build the CUDA kernels with, or None and why not."""
    switch = os.environ.get("EAS_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise RuntimeError(f"EAS_BUILD_CUDA must be unset, 0 or 1, got {switch!r}")
    if switch == "0":
        return None, "skipped: EAS_BUILD_CUDA=0"
    nvcc = _find_nvcc()
    if nvcc is None:
        if switch == "1":
            raise RuntimeError("EAS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return None, "skipped: nvcc not found"
    return nvcc, "built"


class CudaExtension(Extension):
    """The .cu kernels plus their pybind11 binding, compiled by nvcc/c++ through ninja."""

    def __init__(self, name: str, nvcc: str) -> None:
        super().__init__(name, sources=_sources("cuda", ".cu", ".cpp"))
        self.nvcc = nvcc


class BuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if isinstance(ext, CudaExtension):
            self._build_cuda(ext)
        else:
            super().build_extension(ext)

    def _build_cuda(self, ext: CudaExtension) -> None:
        archs = _cuda_archs()
        build_dir = Path(self.build_temp).resolve() / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        # SASS for every arch, plus PTX of the newest so that later GPUs can JIT-compile it.
        codes = {a: f"sm_{a}" for a in archs}
        newest = max(archs, key=int)
        codes[newest] = f"[sm_{newest},compute_{newest}]"
        gencode = " ".join(f"'-gencode=arch=compute_{a},code={c}'" for a, c in codes.items())
        cxx = shlex.split(sysconfig.get_config_var("CXX") or "c++")[0]
        includes = f"-I{ROOT / CSRC} -I{get_include()} -I{sysconfig.get_paths()['include']}"
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {ext.nvcc}",
            f"cxx = {cxx}",
            f"nvcc_flags = -std=c++17 -O3 {gencode} -Xcompiler -fPIC,-fvisibility=hidden "
            f"-DEAS_CUDA_ARCHS='\"{';'.join(archs)}\"' -I{ROOT / CSRC}",
            f"cxx_flags = -std=c++17 -O3 -fPIC -fvisibility=hidden {includes}",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $cxx $cxx_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $nvcc -shared -cudart static $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for source in ext.sources:
            path = (ROOT / source).resolve()
            obj = build_dir / (path.name + ".o")
            rule = "nvcc" if path.suffix == ".cu" else "cxx"
            lines.append(f"build {obj}: {rule} {path}")
            objects.append(str(obj))
        lines.append(f"build {target}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.run([_ninja(), "-C", str(build_dir)], check=True)

    def run(self) -> None:
        super().run()
        # What was built, for eas_kernels.backends() (next to the compiled modules).
        info = {"cuda": CUDA_REASON, "cuda_archs": _cuda_archs() if CUDA_NVCC else []}
        package_dir = Path(self.get_ext_fullpath("eas_kernels._C")).parent
        (package_dir / "_build.json").write_text(json.dumps(info, indent=1) + "\n")
        if not CUDA_NVCC:  # an in-place build must not keep a CUDA module of an older build
            for stale in package_dir.glob("_C_cuda.*"):
                stale.unlink()


def _ninja() -> str:
    found = shutil.which("ninja")
    if found:
        return found
    import ninja  # the PyPI package, listed in [build-system] requires

    return str(Path(ninja.BIN_DIR) / "ninja")


CUDA_NVCC, CUDA_REASON = _cuda_plan()
extensions: list[Extension] = [
    Pybind11Extension(
        "eas_kernels._C",
        _sources("cpu", ".cpp"),
        include_dirs=[str(CSRC)],
        depends=[*_sources("cpu", ".h", ".inc"), str(CSRC / "abi.h"), str(CSRC / "binding.h")],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
]
if CUDA_NVCC:
    extensions.append(CudaExtension("eas_kernels._C_cuda", CUDA_NVCC))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
