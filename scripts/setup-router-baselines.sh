#!/usr/bin/env bash
# Installs the router baselines of `cargo bench -p tandem-cli --bench router_overhead`
# into .venv-bench: vllm-router from PyPI, and what vLLM's toy proxy needs (fastapi,
# uvicorn, httpx; the proxy itself is a file of vLLM's source tree, passed as
# $TOY_PROXY). Prints the variables the bench reads.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet --upgrade pip
.venv-bench/bin/pip install --quiet vllm-router fastapi uvicorn httpx
echo "export VLLM_ROUTER=$PWD/.venv-bench/bin/vllm-router"
echo "export TOY_PROXY_PYTHON=$PWD/.venv-bench/bin/python"
