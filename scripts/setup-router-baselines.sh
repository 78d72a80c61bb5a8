#!/usr/bin/env bash
# Installs the router baselines of `cargo bench -p tandem-cli --bench router_overhead`
# into .venv-bench (vllm-router from PyPI), then prints the variable the bench reads.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet --upgrade pip
.venv-bench/bin/pip install --quiet vllm-router
echo "export VLLM_ROUTER=$PWD/.venv-bench/bin/vllm-router"
