#!/usr/bin/env bash
# Installs llama-cpp-python (the llama.cpp baseline of the engine benchmark) into a
# virtual environment, once, and prints the path of its python:
#
#   PY=$(scripts/setup-llamacpp.sh)
#   "$PY" scripts/llamacpp_bench.py --model ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The venv is ${TANDEM_CACHE_DIR:-~/.cache/tandem}/llamacpp-venv. llama.cpp is compiled
# from source for a portable AVX2/FMA baseline (not -march=native, so timings compare
# with the tandem binary, built for x86-64-v3); this takes about 10 minutes on 2 cores.
# Progress goes to stderr; only the python path goes to stdout.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
CACHE_ROOT="${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}"
VENV="$CACHE_ROOT/llamacpp-venv"
VENV_PYTHON="$VENV/bin/python"

log() { printf '%s\n' "$*" >&2; }

installed_version() {
    "$VENV_PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true
}

create_venv() {
    if [[ -x "$VENV_PYTHON" ]]; then
        return
    fi
    local python=${PYTHON:-python3}
    log "creating a virtual environment at $VENV with $($python --version 2>&1)"
    mkdir -p "$CACHE_ROOT"
    "$python" -m venv "$VENV"
    "$VENV_PYTHON" -m pip install --quiet --upgrade pip >&2
}

install_llama_cpp_python() {
    log "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (compiles llama.cpp, ~10 min)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        "$VENV_PYTHON" -m pip install --no-cache-dir \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" numpy >&2
}

main() {
    if [[ "$(installed_version)" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
        create_venv
        install_llama_cpp_python
    fi
    if [[ "$(installed_version)" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
        log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION is still not importable from $VENV_PYTHON"
        exit 1
    fi
    printf '%s\n' "$VENV_PYTHON"
}

main "$@"
