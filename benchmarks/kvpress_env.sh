#!/usr/bin/env bash
# Side venv for NVIDIA kvpress, used by benchmarks/kvpress_driver.py. kvpress 0.5.5 pins an older
# transformers (5.2.0) than leanlm's, so it cannot share .venv.
# Idempotent: creates the venv only if missing, installs only if an import check fails.
# Usage: bash benchmarks/kvpress_env.sh        (KVPRESS_VENV=path to put the venv elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVPRESS_VENV:-.venv-kvpress}
PYTHON=${PYTHON:-python3}
CHECK="import kvpress, hqq, optimum.quanto, gguf, accelerate, tqdm"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    # Pin torch first and on every line: a bare torch would pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q torch==2.13.0
    # kvpress pins its transformers (resolves to 5.2.0).
    "$VENV/bin/pip" install -q kvpress==0.5.5 torch==2.13.0 gguf accelerate tqdm
    # Backends of transformers' QuantizedCache: HQQ (1/2/3/4/8 bits, the driver's default) and
    # quanto (2/4 bits). Keep transformers where kvpress put it.
    TF=$("$VENV/bin/python" -c "import transformers; print(transformers.__version__)")
    "$VENV/bin/pip" install -q hqq==0.2.8.post1 optimum-quanto==0.2.7 torch==2.13.0 "transformers==$TF"
fi
"$VENV/bin/python" -c "$CHECK; import transformers, torch; from importlib.metadata import version; print('kvpress', version('kvpress'), 'transformers', transformers.__version__, 'torch', torch.__version__)"
