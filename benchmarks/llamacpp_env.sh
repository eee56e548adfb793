#!/usr/bin/env bash
# Side venv for llama.cpp through llama-cpp-python, used by benchmarks/llamacpp_driver.py.
# llama-cpp-python ships as a source distribution: pip builds llama.cpp with cmake + gcc (about
# 17 minutes on 2 shared cores). The sdist is kept under $VENV/src so that llama.cpp's own
# convert_hf_to_gguf.py (in vendor/llama.cpp) can write a BF16 GGUF from the same weights.
# Idempotent: creates the venv only if missing, builds only if the import check fails.
# Usage: bash benchmarks/llamacpp_env.sh     (LLAMACPP_VENV=path to put the venv elsewhere;
#        LLAMACPP_JOBS=N parallel compile jobs, default 2; run it under `nice -n 19`)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
PYTHON=${PYTHON:-python3}
VERSION=${LLAMACPP_VERSION:-0.3.36}
CHECK="import llama_cpp, gguf, numpy"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    mkdir -p "$VENV/src"
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$VENV/src" "llama-cpp-python==$VERSION"
    SDIST=$(ls "$VENV"/src/llama_cpp_python-*.tar.gz | head -1)
    tar -xzf "$SDIST" -C "$VENV/src"
    # Native CPU build (AVX-512/VNNI/BF16 where the CPU has them); no BLAS, no GPU.
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL=${LLAMACPP_JOBS:-2}
    "$VENV/bin/pip" install -v "$SDIST"
    # The driver needs numpy and gguf only. The BF16 converter (vendor/llama.cpp/convert_hf_to_gguf.py)
    # runs under leanlm's own .venv, which has torch and transformers (see llamacpp_bridge.py).
    "$VENV/bin/pip" install -q numpy gguf
fi
"$VENV/bin/python" -c "$CHECK; import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
ls -d "$VENV"/src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py 2>/dev/null || true
