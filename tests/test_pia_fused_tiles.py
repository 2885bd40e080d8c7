"""Tile configurations of the fused PIA kernels on GPUs, checked here without one (issue 16).

The configuration of a launch must fit the device's shared memory: at the largest tiles the
backward kernels need more than sm_86/sm_89 have for fp32 at r = 32, and more than an A100
has for fp64. :func:`with_fitting_tiles` falls back along ``_GPU_TILES``; these tests
check that fallback with a simulated device, and compile the real kernels for those
devices (Triton's compiler and ptxas, no GPU needed) to show where the fallback lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

from eas_kernels.ops import pia_fused  # noqa: E402
from eas_kernels.ops.pia_fused import kernel_config, with_fitting_tiles  # noqa: E402


class OnGpu:
    """What with_fitting_tiles reads of ``u``, for a tensor on ``cuda:index``."""

    def __init__(self, index: int, dtype: torch.dtype) -> None:
        self.is_cuda, self.device, self.dtype = True, torch.device("cuda", index), dtype


@pytest.fixture
def current_devices(monkeypatch):
    """Record the devices made current around launches (no CUDA here)."""
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def device(which):
        entered.append(which)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(pia_fused, "_FITTING", {})
    return entered


def test_a_configuration_that_does_not_fit_falls_back_and_is_remembered(current_devices):
    launched = []

    def run(config):
        tiles = (config["BN"], config["BD"], config["num_stages"])
        launched.append(tiles)
        if tiles in pia_fused._GPU_TILES[:2]:
            raise OutOfResources(114_944, 101_376, "shared memory")
        return "result"

    u = OnGpu(1, torch.float32)
    assert with_fitting_tiles("pia_fused_backward", u, 32, run) == "result"
    assert launched == list(pia_fused._GPU_TILES[:3])
    assert current_devices == [torch.device("cuda", 1)]  # launched on u's device, not GPU 0
    launched.clear()
    with_fitting_tiles("pia_fused_backward", u, 32, run)  # starts where it fitted
    assert launched == [pia_fused._GPU_TILES[2]]
    assert pia_fused._FITTING == {(1, "pia_fused_backward", torch.float32, 32): 2}


def test_no_fitting_configuration_is_a_clear_error(current_devices):
    def run(config):
        raise OutOfResources(10**6, 101_376, "shared memory")

    with pytest.raises(RuntimeError, match=r"no tile configuration .* fits the shared memory"):
        with_fitting_tiles("pia_fused_forward", OnGpu(0, torch.float64), 64, run)


@pytest.mark.parametrize(
    ("dtype", "accumulate", "precision"),
    [
        (torch.float32, "fp32", "ieee"),
        (torch.float64, "fp64", "ieee"),
        (torch.float16, "fp32", "tf32x3"),  # not tf32: some operands are fp32 values
        (torch.bfloat16, "fp32", "tf32x3"),
    ],
)
def test_gpu_dots_keep_fp32_accuracy(dtype, accumulate, precision):
    config = kernel_config(True, dtype, 20, (64, 64, 3))
    assert (str(config["ACC"]), config["PREC"], config["BR"]) == (accumulate, precision, 32)
    assert kernel_config(False, dtype, 20, (16, 32, 1))["PREC"] == "ieee"


@pytest.mark.parametrize(
    ("dtype", "on_gpu", "operands"),
    [
        (torch.float32, True, "fp32"),
        (torch.float64, True, "fp64"),
        (torch.float16, True, "fp16"),
        (torch.bfloat16, True, "bf16"),
        (torch.float16, False, "fp16"),
        (torch.bfloat16, False, "fp32"),  # the interpreter's tl.dot has no bf16
    ],
)
def test_stored_operands_keep_their_storage_type(dtype, on_gpu, operands):
    assert str(kernel_config(on_gpu, dtype, 8, (16, 32, 1))["OPD"]) == operands


MMA = """
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from eas_kernels.ops import pia_fused

capability, dtype = int(sys.argv[1]), sys.argv[2]
torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
stored = {"u_ptr", "g_ptr", "wd_ptr", "wu1_ptr", "wu2_ptr", "bu1_ptr", "bu2_ptr"}
stored |= {"c_ptr", "alpha_ptr"}
found = {}
for kernel in (pia_fused._down_kernel, pia_fused._bwd_token_kernel):
    config = pia_fused.kernel_config(True, torch_dtype, 8, (64, 64, 2))
    stages = config.pop("num_stages")
    signature = {
        name: "constexpr" if name in config
        else ("*i8" if name == "mask_ptr" else "*" + (dtype if name in stored else "fp32"))
        if name.endswith("_ptr") else "i32"
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=config)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_stages": stages})
    found[kernel.__name__] = sorted(set(re.findall(r"(?:wgmma.mma_async|mma.sync)\\S*",
                                                   compiled.asm["ptx"])))
print(json.dumps(found))
"""


@pytest.mark.parametrize(("capability", "dtype"), [(90, "bf16"), (80, "fp16")])
def test_dots_of_stored_16_bit_operands_run_on_16_bit_tensor_cores(capability, dtype):
    """Compiled for an H100 (wgmma) and an A100 (mma.sync): every tensor-core instruction of
    the forward down kernel and the backward token kernel (whose dots all multiply stored
    operands: u W_d1ᵀ, G W_uk) takes 16-bit operands; before, they were tf32 (three of them
    per dot under tf32x3) on upcast operands."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", MMA, str(capability), dtype],
        capture_output=True, text=True, env=environment, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    ptx_type = {"bf16": "bf16", "fp16": "f16"}[dtype]
    for kernel, instructions in found.items():
        assert instructions, f"{kernel}: no tensor-core instruction"
        assert all(f".{ptx_type}.{ptx_type}" in i for i in instructions), (kernel, instructions)


COMPILE = """
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from eas_kernels.ops import pia_fused

capability, limit, dtype, rank = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch_dtype = torch.float64 if dtype == "fp64" else torch.float32

def shared_bytes(kernel, tiles):
    config = pia_fused.kernel_config(True, torch_dtype, rank, tiles)
    stages = config.pop("num_stages")
    signature = {
        name: "constexpr" if name in config
        else ("*i8" if name == "mask_ptr" else "*" + dtype) if name.endswith("_ptr")
        else "i32"
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=config)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_stages": stages}).metadata.shared

needs = []
for tiles in pia_fused._GPU_TILES:
    kernels = (pia_fused._bwd_token_kernel, pia_fused._bwd_weight_kernel)
    needs.append(max(shared_bytes(kernel, tiles) for kernel in kernels))
    if needs[-1] <= limit:
        break
print(json.dumps(needs))
"""


@pytest.mark.parametrize(
    ("capability", "limit", "dtype", "rank"),
    [
        (86, 101_376, "fp32", 32),  # A10 / RTX 30xx (sm_89 has the same limit)
        (80, 166_912, "fp64", 8),  # A100
    ],
)
def test_the_fallback_reaches_tiles_that_fit_the_device(capability, limit, dtype, rank):
    """Compiled for the device (Triton's compiler and ptxas, in a process without the
    interpreter), the largest tiles need more than it has (the bug), and an entry of the
    fallback list fits both backward kernels. Every pointer is ``dtype`` (fp32 or fp64
    runs: inputs, state and accumulators share it), the mask int8."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    arguments = [str(capability), str(limit), dtype, str(rank)]
    result = subprocess.run(
        [sys.executable, "-c", COMPILE, *arguments],
        capture_output=True, text=True, env=environment, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    needs = json.loads(result.stdout.strip().splitlines()[-1])
    assert needs[0] > limit, needs
    assert needs[-1] <= limit, f"no configuration fits sm_{capability}: {needs}"
