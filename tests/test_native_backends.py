"""What was built, which backend runs, and the model with the native kernels forced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import eas_kernels
from eas_kernels import _native, greedy_generate, reparameterize
from eas_kernels.ops import merge_buffer_bytes, merged_linear
from tests.helpers import assert_bitwise, patched, random_sequences, weights_snapshot
from tests.native_helpers import assert_within_twice_torch_error, requires_cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


@requires_cpu_kernels
def test_backends_report_what_was_built():
    report = eas_kernels.backends()
    assert report["cpu"]["built"] and report["cpu"]["isa"] in report["cpu"]["isas"]
    assert report["cpu"]["isas"][-1] == "portable"
    assert report["default"] == os.environ.get("EAS_BACKEND", "auto")
    assert report["dtypes"] == ["torch.float32", "torch.float16", "torch.bfloat16"]
    native_default = report["default"] != "torch"
    for op in _native.OPS:
        assert report["ops"][op]["cpu"] == ("native" if native_default else "torch")
    cuda = report["cuda"]
    assert cuda["built"] == (_native.CUDA is not None)
    record = json.loads(Path(_native.__file__).with_name("_build.json").read_text())
    assert cuda["build"] == record["cuda"]
    if cuda["built"]:
        assert cuda["archs"] == record["cuda_archs"] and cuda["cudart"] == "static"
        assert cuda["devices"] == torch.cuda.device_count() or not torch.cuda.is_available()
        assert isinstance(cuda["device_status"], str)
    else:
        assert record["cuda"].startswith("skipped") and "error" in cuda


def test_the_default_backend_comes_from_eas_backend(monkeypatch):
    monkeypatch.setenv("EAS_BACKEND", "torch")
    report = _native.backends()
    assert report["default"] == "torch"
    assert all(v == "torch" for op in report["ops"].values() for v in op.values())
    monkeypatch.setattr(_native, "CPU", None)  # would fail if a kernel were called
    weight = torch.randn(6, 4)
    merged_linear([weight], [None], torch.randn(2, 4), torch.randn(2, 4), torch.randn(4))
    monkeypatch.setenv("EAS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="EAS_BACKEND must be one of"):
        _native.backends()


def test_a_missing_module_fails_loudly_only_when_asked_for(monkeypatch):
    monkeypatch.setattr(_native, "CPU", None)
    monkeypatch.setattr(_native, "CPU_ERROR", "ImportError: simulated")
    weight, args = torch.randn(6, 4), (torch.randn(2, 4), torch.randn(2, 4), torch.randn(4))
    with pytest.raises(RuntimeError, match=r"eas_kernels\._C is not available \(ImportError"):
        merged_linear([weight], [None], *args, backend="native")
    assert merged_linear([weight], [None], *args)  # auto: the PyTorch reference
    assert _native.backends()["cpu"] == {"built": False, "error": "ImportError: simulated"}
    monkeypatch.setattr(_native, "CUDA", None)
    with pytest.raises(RuntimeError, match=r"eas_kernels\._C_cuda is not available"):
        _native.use_native("add_lowrank", "native", torch.device("cuda", 0), torch.bfloat16, False)
    assert not _native.use_native(
        "add_lowrank", "auto", torch.device("cuda", 0), torch.float16, False
    )


def test_a_module_of_another_abi_is_not_used(monkeypatch):
    built = _native.CPU.build_info()
    for change, message in [
        (
            {"abi": _native.ABI_VERSION + 1},
            f"has ABI {_native.ABI_VERSION + 1}, this package expects {_native.ABI_VERSION}",
        ),
        ({"dtype_codes": {"float32": 0, "float16": 2, "bfloat16": 1}}, "dtype codes"),
        ({"merge_target_fields": ["weight", "ld", "out"]}, "merge target fields"),
        ({"merge_site_fields": ["down", "up", "rank"]}, "merge site fields"),
    ]:
        stale = types.ModuleType("eas_stale_kernels")
        stale.build_info = lambda change=change: {**built, **change}
        monkeypatch.setitem(sys.modules, "eas_stale_kernels", stale)
        module, error = _native._load("eas_stale_kernels")
        assert module is None and message in error and error.endswith("rebuild it")


def test_both_modules_report_the_abi_this_package_speaks():
    """csrc/abi.h is the one definition; the modules report it (csrc/binding.h)."""
    for module in (_native.CPU, _native.CUDA):
        if module is None:
            continue
        info = module.build_info()
        assert info["abi"] == _native.ABI_VERSION
        assert tuple(info["merge_target_fields"]) == _native.MERGE_TARGET_FIELDS
        assert tuple(info["merge_site_fields"]) == _native.MERGE_SITE_FIELDS
        floats = module.merge_scratch_floats(q_floats=40, rows=10, ranks=3, targets=2)
        assert floats == 40 + 10 + 3 + 2
    fields = dict(weight=1, out=2, ld=3, merged=4, bias=0, new_bias=5, site=0, factors=6)
    assert _native.merge_target(**fields) == (1, 2, 3, 4, 0, 5, 0, 6)
    assert _native.merge_site(up=7, down=8, rank=3, mix=9) == (7, 8, 3, 9)
    with pytest.raises(TypeError, match="a merge target has the fields"):
        _native.merge_target(weight=1)
    with pytest.raises(TypeError, match="a merge site has the fields"):
        _native.merge_site(up=1)


@pytest.mark.parametrize("user_value", [None, "123"])
def test_loading_leaves_the_environment_as_it_was(user_value):
    """The modules load with GOMP_SPINCOUNT=0 unless the user set one; it is not left set."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if user_value is not None:
        env["GOMP_SPINCOUNT"] = user_value
    code = "import os, eas_kernels._native; print(os.environ.get('GOMP_SPINCOUNT'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == str(user_value), result.stderr


def test_import_works_without_any_compiled_module():
    code = (
        "import sys\n"
        "sys.modules['eas_kernels._C'] = None\n"
        "sys.modules['eas_kernels._C_cuda'] = None\n"
        "import torch, eas_kernels\n"
        "from eas_kernels import _native\n"
        "report = _native.backends()\n"
        "assert not report['cpu']['built'] and not report['cuda']['built'], report\n"
        "assert report['ops']['merged_linear'] == {'cpu': 'torch', 'cuda': 'torch'}\n"
        "from tests.helpers import patched\n"
        "model = eas_kernels.reparameterize(patched([1], seed=1), 'merge')\n"
        "tokens = eas_kernels.greedy_generate(model, [[1, 2, 3]], 4).tokens\n"
        "print('ok', tokens)\n"
    )
    env = dict(os.environ, EAS_BACKEND="auto")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


# ---------------------------------------------------------------------- the model
@requires_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_modes_with_the_native_kernels_forced(monkeypatch, dtype):
    """EAS_BACKEND=native (a fallback to PyTorch is an error) against EAS_BACKEND=torch.

    Logits of the first decode step, where the mode is realised, against the same model in
    float64: native at most twice as far off as PyTorch. In float32 greedy tokens agree.
    """
    model = patched([0, 2], seed=50, dtype=dtype)
    exact_model = patched([0, 2], seed=50, dtype=torch.float64)
    exact_model.load_state_dict(model.state_dict())
    snapshot = weights_snapshot(model)
    prompts = {
        1: random_sequences([7], vocab=97, seed=51),
        3: random_sequences([7, 3, 11], vocab=97, seed=52),
    }
    exact = {size: greedy_generate(exact_model, p, 2).logits[:, 1] for size, p in prompts.items()}
    for mode, size in (("merge", 1), ("lowrank", 3), ("lowrank", 1), ("eager", 3)):
        results = {}
        for backend in ("torch", "native"):
            monkeypatch.setenv("EAS_BACKEND", backend)
            reparameterize(model, mode)
            results[backend] = greedy_generate(model, prompts[size], 6)
            eas_kernels.restore(model)
        assert_within_twice_torch_error(
            results["native"].logits[:, 1], results["torch"].logits[:, 1], exact[size], mode
        )
        if dtype == torch.float32:
            assert results["native"].tokens == results["torch"].tokens, mode
    assert_bitwise(model, snapshot)


@requires_cpu_kernels
def test_a_merged_model_reports_its_merged_buffers(monkeypatch):
    monkeypatch.setenv("EAS_BACKEND", "native")
    model = patched([1], seed=53)  # 4 layers: wq, wk, wv of 0, 2, 3 and w1, w3 of 1 merge
    targets = [
        getattr(model.layers[i].attention, name) for i in (0, 2, 3) for name in ("wq", "wk", "wv")
    ]
    targets += [model.layers[1].feed_forward.w1, model.layers[1].feed_forward.w3]
    merged = sum(linear.weight.nbytes for linear in targets)
    reparameterize(model, "merge")
    held = merge_buffer_bytes()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), start_pos=0)
        model(torch.tensor([[4]]), start_pos=3)
        assert merge_buffer_bytes() - held == merged
        model(torch.tensor([[1, 2]]), start_pos=0)  # restores; buffers kept for the next merge
        model(torch.tensor([[5]]), start_pos=2)
    assert merge_buffer_bytes() - held == merged


class FakeCudaModule(types.ModuleType):
    """``_C_cuda`` as built for ``archs``, whose static runtime sees ``seen`` devices."""

    def __init__(self, archs: list[str], seen: int) -> None:
        super().__init__("fake_C_cuda")
        self.archs, self.seen = archs, seen

    def build_info(self) -> dict:
        return {"abi": _native.ABI_VERSION, "archs": self.archs, "cuda_version": "13.0"}

    def device_count(self) -> int:
        return self.seen

    def device_status(self) -> str:
        return f"{self.seen} device(s)" if self.seen else "unavailable: CUDA driver is too old"


@pytest.mark.parametrize(
    ("capability", "seen", "problem"),
    [
        ((8, 0), 1, None),  # A100
        ((8, 6), 1, None),  # A10, RTX 30xx: runs the sm_80 cubin
        ((8, 9), 1, None),  # L4, RTX 40xx
        ((9, 0), 1, None),  # H100, H200
        ((7, 5), 1, r"compute capability 7\.5 is not covered by the archs built \(80, 90\)"),
        ((7, 0), 1, r"compute capability 7\.0"),  # V100
        ((10, 0), 1, None),  # B200: no sm_100 cubin, the driver compiles the sm_90 PTX
        ((12, 0), 1, None),  # RTX 50xx: likewise
        ((9, 0), 0, r"runtime sees 0 device\(s\) \(unavailable: CUDA driver is too old\)"),
    ],
)
def test_cuda_dispatch_checks_the_device_before_using_the_module(
    monkeypatch, capability, seen, problem
):
    """A GPU the CUDA module cannot run on (capability not built, driver too old for its
    static runtime) falls back to PyTorch under 'auto' and is refused under 'native'."""
    monkeypatch.setattr(_native, "CUDA", FakeCudaModule(["80", "90"], seen))
    monkeypatch.setattr(_native, "_CUDA_USABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    device = torch.device("cuda", 0)
    usable = _native.use_native("merged_linear", "auto", device, torch.bfloat16, False)
    assert usable == (problem is None)
    if problem is None:
        assert _native.use_native("merged_linear", "native", device, torch.bfloat16, False)
        return
    with pytest.raises(RuntimeError, match=r"backend='native' was requested but .*" + problem):
        _native.use_native("merged_linear", "native", device, torch.bfloat16, False)
