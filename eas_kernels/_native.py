"""The compiled kernels of ``csrc/``: loading, what was built, backend choice, arguments.

Two extension modules, neither linking libtorch (``setup.py``):

* ``eas_kernels._C`` — CPU kernels (OpenMP; AVX-512, AVX2 or portable code chosen at
  import for the running CPU);
* ``eas_kernels._C_cuda`` — CUDA kernels, present when ``nvcc`` was found at build time.

They take data pointers, shapes and strides (in elements), dtype codes and a CUDA stream
handle. This module is the only producer of those: every tensor is checked here first
(TypeError for a wrong type or dtype, ValueError for a wrong shape, device or layout), so
a kernel never sees an argument it cannot handle.

Backends of an op call: ``"native"`` (the compiled kernel for the tensors' device; an
error if it is unavailable), ``"torch"`` (the PyTorch reference) or ``"auto"`` (native
when built for that device and dtype and no gradient is needed, else torch). The default
is ``"auto"``; the environment variable ``EAS_BACKEND`` changes it.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.graph import increment_version

from ._checks import check_tensor

# What this module speaks of the ABI (csrc/abi.h): a compiled module whose build_info()
# reports another version, other dtype codes or other merge-target fields is not used.
ABI_VERSION = 7
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MERGE_TARGET_FIELDS = ("weight", "out", "ld", "merged", "bias", "new_bias", "site", "factors")
MERGE_SITE_FIELDS = ("up", "down", "rank", "mix")
BACKENDS = ("auto", "native", "torch")
OPS = ("merged_linear", "lowrank_factors", "add_lowrank")


def _import_with_sleeping_threads(name: str) -> ModuleType:
    """Import a module that links OpenMP (libgomp) so that its idle threads sleep.

    libgomp reads its spin count once, when it loads (with the module). Spinning idle
    threads would take the cores from torch's own OpenMP threads between kernel calls (on
    this project's 2-core machine that slowed a merge/restore loop 50-fold), so unless the
    user chose a policy, the module loads with ``GOMP_SPINCOUNT=0``; the variable is then
    removed again, torch (already loaded) is not affected.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return importlib.import_module(name)
    os.environ["GOMP_SPINCOUNT"] = "0"
    try:
        return importlib.import_module(name)
    finally:
        del os.environ["GOMP_SPINCOUNT"]


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = _import_with_sleeping_threads(name)
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    info = module.build_info()
    abi = info.get("abi")
    if abi != ABI_VERSION:
        return None, f"{name} has ABI {abi}, this package expects {ABI_VERSION}: rebuild it"
    codes = {str(dtype).removeprefix("torch."): code for dtype, code in DTYPE_CODES.items()}
    fields = tuple(info.get("merge_target_fields", ()))
    site_fields = tuple(info.get("merge_site_fields", ()))
    if (
        info.get("dtype_codes") != codes
        or fields != MERGE_TARGET_FIELDS
        or site_fields != MERGE_SITE_FIELDS
    ):
        return None, (
            f"{name} reports ABI {abi} with dtype codes {info.get('dtype_codes')}, merge "
            f"target fields {fields} and merge site fields {site_fields}, this package expects "
            f"{codes}, {MERGE_TARGET_FIELDS} and {MERGE_SITE_FIELDS}: rebuild it"
        )
    return module, None


def merge_target(**fields: object) -> tuple:
    """A merge target for a compiled module's ``merge``: ``fields`` by name (exactly
    :data:`MERGE_TARGET_FIELDS`), in the order the ABI defines."""
    return _abi_tuple("merge target", MERGE_TARGET_FIELDS, fields)


def merge_site(**fields: object) -> tuple:
    """A merge site for a compiled module's ``merge``: ``fields`` by name (exactly
    :data:`MERGE_SITE_FIELDS`), in the order the ABI defines."""
    return _abi_tuple("merge site", MERGE_SITE_FIELDS, fields)


def _abi_tuple(what: str, names: tuple[str, ...], fields: dict[str, object]) -> tuple:
    if set(fields) != set(names):
        raise TypeError(f"a {what} has the fields {names}, got {sorted(fields)}")
    return tuple(fields[name] for name in names)


def _build_record() -> dict:
    path = Path(__file__).with_name("_build.json")
    return json.loads(path.read_text()) if path.is_file() else {}


CPU, CPU_ERROR = _load("eas_kernels._C")
CUDA, CUDA_ERROR = _load("eas_kernels._C_cuda")
BUILD = _build_record()


def default_backend() -> str:
    value = os.environ.get("EAS_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"EAS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _module_for(device: torch.device) -> tuple[ModuleType | None, str]:
    """The compiled module for ``device`` and, when there is none, why."""
    if device.type == "cpu":
        return CPU, f"eas_kernels._C is not available ({CPU_ERROR}); reinstall with `pip install .`"
    if device.type == "cuda":
        if CUDA is None:
            reason = CUDA_ERROR if BUILD.get("cuda") == "built" else BUILD.get("cuda", CUDA_ERROR)
            return None, f"eas_kernels._C_cuda is not available ({reason})"
        unusable = cuda_unusable(device)
        if unusable is not None:
            return None, f"eas_kernels._C_cuda cannot run on {device}: {unusable}"
        return CUDA, ""
    return None, f"no native kernels for device type {device.type!r}"


_CUDA_USABLE: dict[int, str | None] = {}


def cuda_unusable(device: torch.device) -> str | None:
    """Why ``_C_cuda`` cannot run on CUDA ``device``, or None when it can (cached).

    The module holds machine code for the compute capabilities it was built for (a cubin
    for ``sm_XY`` runs on devices ``X.Z`` with ``Z >= Y``) and PTX of the newest, which the
    driver compiles for any later device (setup.py); it links the CUDA runtime statically:
    that runtime must see the device, which needs a driver that supports the toolkit it
    was built with.
    """
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CUDA_USABLE:
        _CUDA_USABLE[index] = _cuda_unusable(index)
    return _CUDA_USABLE[index]


def _cuda_unusable(index: int) -> str | None:
    assert CUDA is not None
    seen = CUDA.device_count()
    if seen <= index:
        return (
            f"its CUDA {CUDA.build_info()['cuda_version']} runtime sees {seen} device(s) "
            f"({CUDA.device_status()}); the driver may be too old for it"
        )
    major, minor = torch.cuda.get_device_capability(index)
    built = [str(arch) for arch in CUDA.build_info()["archs"]]
    numbers = [int(arch) for arch in built if arch.isdigit()]
    for number in numbers:
        if number // 10 == major and number % 10 <= minor:
            return None  # a cubin runs on this device
    if numbers and major * 10 + minor >= max(numbers):
        return None  # the PTX of the newest arch, compiled by the driver
    return (
        f"compute capability {major}.{minor} is not covered by the archs built "
        f'({", ".join(built)}); rebuild with EAS_CUDA_ARCHS="{major}{minor}"'
    )


def use_native(
    op: str, backend: str | None, device: torch.device, dtype: torch.dtype, needs_grad: bool
) -> bool:
    """Whether ``op`` runs its compiled kernel; raises when ``"native"`` cannot be honoured."""
    if backend is None:
        backend = default_backend()
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "torch":
        return False
    module, missing = _module_for(device)
    available = module is not None and dtype in DTYPE_CODES and not needs_grad
    if backend == "auto" or available:
        return available
    if module is None:
        raise RuntimeError(f"{op}: backend='native' was requested but {missing}")
    if dtype not in DTYPE_CODES:
        names = ", ".join(str(d) for d in DTYPE_CODES)
        raise TypeError(f"{op}: the native kernels take {names}; got {dtype}")
    raise RuntimeError(
        f"{op}: the native kernels do not record gradients; call it under torch.no_grad() "
        "or use backend='torch'"
    )


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def module(device: torch.device) -> ModuleType:
    found, _ = _module_for(device)
    assert found is not None, "use_native() said yes"
    return found


def num_threads() -> int:
    """CPU kernels use as many OpenMP threads as torch does."""
    return torch.get_num_threads()


def launch_args(device: torch.device) -> tuple[int, ...]:
    """The trailing arguments of every kernel entry point for ``device``.

    CPU: the thread count. CUDA: the device ordinal and torch's current stream there, as
    an integer handle (the kernels run in stream order with torch's own work).
    """
    if device.type == "cpu":
        return (num_threads(),)
    return (device.index, torch.cuda.current_stream(device).cuda_stream)


def bumped(tensor: torch.Tensor) -> torch.Tensor:
    """Record an in-place write made by a kernel, as torch's own in-place ops do."""
    if not tensor.is_inference():
        increment_version(tensor)
    return tensor


# ---------------------------------------------------------------------- argument checks
def check_rows(
    value: object, name: str, *, dtype: torch.dtype, device: torch.device, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor of ``shape`` whose last dimension has unit stride (rows may be strided)."""
    tensor = check_tensor(value, name, ndim=len(shape), dtype=dtype, device=device)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride along its last dimension, got strides {tensor.stride()}"
        )
    return tensor


def check_no_overlap(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A tensor a kernel may write in place: no two of its elements share memory."""
    extent = 1
    dims = sorted(
        (
            (stride, size)
            for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
            if size > 1
        )
    )
    for stride, size in dims:
        if stride < extent:
            raise ValueError(
                f"{name} has overlapping elements (shape {tuple(tensor.shape)}, strides "
                f"{tensor.stride()}): a kernel cannot write it in place"
            )
        extent = stride * size
    return tensor


def memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` byte addresses that ``tensor``'s elements can occupy."""
    extent = 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    start = tensor.data_ptr()
    return start, start + extent * tensor.element_size()


def spans_overlap(first: tuple[int, int], second: tuple[int, int]) -> bool:
    """Whether two :func:`memory_span` ranges share a byte."""
    return first[0] < second[1] and second[0] < first[1]


def check_disjoint(named: list[tuple[str, torch.Tensor]], written: int) -> None:
    """The first ``written`` tensors of ``named`` are written in place by a kernel: refuse
    (ValueError) any of them whose memory span meets another tensor's, e.g. the same weight
    passed twice to one merge, which the kernel would update twice."""
    spans = [(name, memory_span(tensor)) for name, tensor in named if tensor.numel() > 0]
    for i, (name, span) in enumerate(spans[:written]):
        for j, (other, other_span) in enumerate(spans):
            if j != i and (j > i or j >= written) and spans_overlap(span, other_span):
                raise ValueError(
                    f"{name} and {other} share memory; a kernel writing {name} in place "
                    "needs it to be apart from every other argument"
                )


def check_matrix_rows(value: object, name: str, *, device: torch.device) -> torch.Tensor:
    """A weight ``(out, d)`` in a native dtype whose rows do not overlap."""
    tensor = check_tensor(value, name, ndim=2, device=device, floating=True)
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    out, d = tensor.shape
    if (d > 1 and tensor.stride(1) != 1) or (out > 1 and tensor.stride(0) < d):
        raise ValueError(
            f"{name} must have unit stride along d and rows at least d apart, got strides "
            f"{tensor.stride()} for shape {tuple(tensor.shape)}"
        )
    return tensor


def row_stride(tensor: torch.Tensor) -> int:
    """Row stride of a ``(out, d)`` matrix; a single row counts as packed."""
    return tensor.stride(0) if tensor.shape[0] > 1 else tensor.shape[1]


def fp32_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy (or the tensor itself when it already is one)."""
    return tensor.detach().to(torch.float32).contiguous()


# ---------------------------------------------------------------------- report
def _cpu_report() -> dict:
    if CPU is None:
        return {"built": False, "error": CPU_ERROR}
    info = CPU.build_info()
    return {
        "built": True,
        "isa": CPU.isa(),
        "isas": list(CPU.isas()),
        "compiler": info["compiler"],
        "openmp": info["openmp"],
        "threads": num_threads(),
    }


def _cuda_report() -> dict:
    report: dict = {"built": CUDA is not None, "build": BUILD.get("cuda", "unknown")}
    if CUDA is None:
        report["error"] = CUDA_ERROR
        return report
    info = CUDA.build_info()
    report.update(
        archs=list(info["archs"]),
        cuda_toolkit=info["cuda_version"],
        cudart="static",
        devices=CUDA.device_count(),
        device_status=CUDA.device_status(),
    )
    return report


def backends() -> dict:
    """What was compiled and which backend each op uses on each device, as a dict.

    Keys: ``"cpu"`` and ``"cuda"`` (whether built, and how: instruction set and OpenMP,
    or CUDA archs, toolkit and the devices the static runtime sees), ``"default"`` (the
    backend of calls that name none: ``EAS_BACKEND`` or ``"auto"``), ``"dtypes"`` (what
    the native kernels take), and ``"ops"``: for each op and device, ``"native"`` or
    ``"torch"`` — what ``"auto"`` runs for float32/float16/bfloat16 tensors. Whatever the
    backend, float64 tensors and calls that need gradients run the PyTorch reference
    under ``"auto"``.
    """
    default = default_backend()
    ops = {}
    for op in OPS:
        per_device = {}
        for device, loaded in (("cpu", CPU), ("cuda", CUDA)):
            native = loaded is not None and default != "torch"
            per_device[device] = "native" if native else "torch"
        ops[op] = per_device
    return {
        "cpu": _cpu_report(),
        "cuda": _cuda_report(),
        "default": default,
        "dtypes": [str(dtype) for dtype in DTYPE_CODES],
        "ops": ops,
    }
