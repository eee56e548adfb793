#!/usr/bin/env bash
# Side venv for NVIDIA kvpress (it pins its own transformers, so it cannot share .venv).
# Idempotent: creates .venv-kvpress only if missing; re-running just re-checks the pins.
# Usage: bash benchmarks/kvpress_env.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-kvpress
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.kvpress-installed

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    # Pin torch first: a bare torch would pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q torch==2.13.0
    # kvpress pins its own transformers; let pip resolve it, torch stays pinned.
    "$VENV/bin/pip" install -q kvpress==0.5.5 torch==2.13.0 gguf accelerate tqdm
    # Quantized KV cache backend for transformers' QuantizedCache (optional: the
    # driver reports an error row for the quantized press if this is missing).
    "$VENV/bin/pip" install -q optimum-quanto torch==2.13.0 || echo "optimum-quanto unavailable" >&2
    touch "$STAMP"
fi
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '?', 'transformers', transformers.__version__, 'torch', torch.__version__)"
