#!/usr/bin/env bash
# Installs the llama.cpp baselines of the engine benchmark, once:
#
# 1. llama-cpp-python (what `cargo bench --bench forward` drives) into a virtual
#    environment, compiled for a portable AVX2/FMA baseline (not -march=native, so
#    timings compare with the tandem binary, built for x86-64-v3): about 10 minutes on
#    2 cores. Prints the path of its python:
#
#      PY=$(scripts/setup-llamacpp.sh)
#      "$PY" scripts/llamacpp_bench.py --model ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# 2. llama.cpp's own `llama-bench` and `llama-server` (the baseline users know), built
#    with cmake from the same llama.cpp source (the one vendored in that
#    llama-cpp-python release's sdist) with GGML_NATIVE=ON, so they use the
#    instructions this CPU has (AVX-512, VNNI; AMX is left out, see below): ~5 minutes
#    on 2 cores. They land in ${TANDEM_CACHE_DIR:-~/.cache/tandem}/llama.cpp-native/bin
#    and load llama.cpp's shared libraries from the build directory beside it.
#
#      scripts/setup-llamacpp.sh --native-only    # step 2 alone; prints the bin directory
#      scripts/setup-llamacpp.sh --python-only    # step 1 alone (the old behaviour)
#
# The venv is ${TANDEM_CACHE_DIR:-~/.cache/tandem}/llamacpp-venv (step 2 installs cmake
# into it). Progress goes to stderr; only the python path (or, with --native-only, the
# bin directory) goes to stdout.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
CACHE_ROOT="${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}"
VENV="$CACHE_ROOT/llamacpp-venv"
VENV_PYTHON="$VENV/bin/python"
NATIVE_DIR="$CACHE_ROOT/llama.cpp-native"

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

# The llama.cpp source vendored in the llama-cpp-python sdist of the pinned version.
fetch_llama_cpp_source() {
    local src="$NATIVE_DIR/src"
    if [[ -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
        return
    fi
    log "fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (its vendored llama.cpp)"
    local download="$NATIVE_DIR/download"
    rm -rf "$download" "$src"
    mkdir -p "$download" "$src"
    "$VENV_PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$download" >&2
    tar -xzf "$download"/llama_cpp_python-*.tar.gz -C "$src" --strip-components=1
}

# llama-bench and llama-server, native flags, into $NATIVE_DIR/bin.
build_native_tools() {
    if [[ -x "$NATIVE_DIR/bin/llama-bench" && -x "$NATIVE_DIR/bin/llama-server" ]]; then
        return
    fi
    "$VENV_PYTHON" -m pip install --quiet cmake >&2
    local cmake="$VENV/bin/cmake"
    fetch_llama_cpp_source
    log "building llama-bench and llama-server with GGML_NATIVE=ON (~5 min on 2 cores)"
    # Native, except AMX: llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) segfaults
    # on the Sapphire-Rapids-class machines this was built on (llama.cpp issue #20824,
    # open); without AMX it still uses AVX-512, VNNI and its repacked weight layouts.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    "$cmake" -S "$NATIVE_DIR/src/vendor/llama.cpp" -B "$NATIVE_DIR/build" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" >&2
    "$cmake" --build "$NATIVE_DIR/build" --target llama-bench llama-server \
        -j "$(nproc)" >&2
    mkdir -p "$NATIVE_DIR/bin"
    cp "$NATIVE_DIR/build/bin/llama-bench" "$NATIVE_DIR/build/bin/llama-server" "$NATIVE_DIR/bin/"
}

setup_python() {
    if [[ "$(installed_version)" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
        create_venv
        install_llama_cpp_python
    fi
    if [[ "$(installed_version)" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
        log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION is still not importable from $VENV_PYTHON"
        exit 1
    fi
}

main() {
    case "${1:-}" in
        --native-only)
            create_venv
            build_native_tools
            printf '%s\n' "$NATIVE_DIR/bin"
            ;;
        --python-only)
            setup_python
            printf '%s\n' "$VENV_PYTHON"
            ;;
        "")
            setup_python
            build_native_tools
            printf '%s\n' "$VENV_PYTHON"
            ;;
        *)
            log "usage: $0 [--native-only | --python-only]"
            exit 2
            ;;
    esac
}

main "$@"
