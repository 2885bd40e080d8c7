#!/usr/bin/env bash
# The GPU check: one command that verifies every CUDA and Triton kernel on a GPU and
# measures the headline figures, leaving everything in --out (at most 8 files).
#
#   bash scripts/gpu_check.sh --out DIR [--quick] [--dry-run]
#
# Steps, each under its own time limit; a failing step is recorded and the check goes on:
#   env        the GPU, driver, toolkit and Python packages
#   build      pip install -e . offline (--no-index, no build isolation), CUDA kernels
#              built for this GPU's compute capability (EAS_CUDA_ARCHS)
#   tests      pytest -m cuda: the CUDA and Triton kernels against their references
#              (fp32/fp16/bf16, poisoned outputs, 10,000 merge/restore cycles, NaN/Inf
#              refusal), the CUDA-graph replay of a decode step, bit-exact, and no host
#              sync below the root (torch.cuda.set_sync_debug_mode, tests/test_host_syncs.py)
#   memcheck, racecheck
#              compute-sanitizer over each CUDA kernel once (scripts/gpu_kernels_once.py)
#   bench      the benchmarks at LLaMA-7B shapes (bf16, batch 1, ~600-token prompts):
#              every variant against its floor, eager and under CUDA graphs; the merge
#              against its roofline; the whole model's merge in decode steps (issue 20:
#              <= 0.3); the batched low-rank path; the fused PIA kernels
#   report     summary.json: every step's status and time, the environment, the test
#              counts and the figures (scripts/gpu_check_report.py)
#
# --quick   trims the benchmarks to unpatched, LaVIN-style and EAS-12 and skips racecheck.
# --dry-run for a machine without a GPU (CI): the same steps, doing what needs none — the
#           offline install, collecting the GPU tests and benchmarks, the kernels once on
#           the CPU, the report — so that the script cannot rot.
#
# Files in DIR: check.log (all output), summary.json, env.txt, tests.xml, benchmarks.json,
# memcheck.log, racecheck.log.
set -uo pipefail
cd "$(dirname "$0")/.."

out="" quick=0 dry=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --dry-run) dry=1; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --out DIR [--quick] [--dry-run])" >&2; exit 2 ;;
    esac
done
if [[ -z "$out" ]]; then
    echo "gpu_check.sh: --out DIR is required" >&2
    exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
steps="$out/.steps"
: > "$steps"
exec > >(tee -a "$out/check.log") 2>&1

# step NAME LIMIT_SECONDS COMMAND...: run, time and record one step.
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local started status
    started=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@"
    status=$?
    printf '%s %s %s\n' "$name" "$status" "$((($(date +%s%N) - started) / 1000000))" >> "$steps"
    echo "== $name: exit $status"
}

gpu_capability() {
    "$python" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')"
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    uname -a
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    nvcc --version 2>&1 || echo "nvcc: not available"
    "$python" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|pybind11|ninja|pytest|safetensors) '
} > "$out/env.txt" 2>&1
printf 'env 0 0\n' >> "$steps"

if [[ $dry -eq 1 ]]; then
    archs="${EAS_CUDA_ARCHS:-80;90}"
else
    archs="$(gpu_capability)"
fi
step build 420 env EAS_BUILD_CUDA=1 EAS_CUDA_ARCHS="$archs" \
    "$python" -m pip install -q --no-index --no-build-isolation --no-deps -e .

if [[ $dry -eq 1 ]]; then
    step tests 300 "$python" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests/
    step kernels-once 120 "$python" scripts/gpu_kernels_once.py --device cpu
    step bench 300 "$python" -m pytest -q -p no:cacheprovider --collect-only \
        benchmarks/test_end_to_end.py benchmarks/test_merge.py benchmarks/test_lowrank.py \
        benchmarks/test_pia_fused.py benchmarks/test_model_merge.py
else
    step tests 240 "$python" -m pytest -q -p no:cacheprovider -m cuda \
        --junitxml="$out/tests.xml" tests/
    for tool in memcheck racecheck; do
        if [[ $tool == racecheck && $quick -eq 1 ]]; then continue; fi
        step "$tool" 120 compute-sanitizer --tool "$tool" --error-exitcode 1 \
            --log-file "$out/$tool.log" "$python" scripts/gpu_kernels_once.py --device cuda
    done
    selection="lavin32 or graphed or batched or merge or lowrank or pia_fused"
    if [[ $quick -eq 1 ]]; then
        selection="((lavin32 or graphed) and (unpatched or lavin_style or eas_12)) or whole_model"
    fi
    step bench 360 env EAS_BENCH_PROMPT=600 "$python" -m pytest -q -p no:cacheprovider \
        benchmarks/test_end_to_end.py benchmarks/test_merge.py benchmarks/test_lowrank.py \
        benchmarks/test_pia_fused.py benchmarks/test_model_merge.py --benchmark-only \
        -k "$selection" \
        --benchmark-json="$out/benchmarks.json"
fi

"$python" scripts/gpu_check_report.py "$out" --dry-run "$dry"
status=$?
rm -f "$steps"
exit $status
