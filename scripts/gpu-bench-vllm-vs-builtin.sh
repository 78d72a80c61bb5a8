#!/usr/bin/env bash
# On a GPU machine with vLLM installed (../shared/tools/vllm-gpu/README.md): one vLLM
# worker, then one `tandem serve --device cuda`, each alone on the GPU, both at
# Llama-3.1-8B shapes with random weights, each measured with the same `vllm bench
# serve` runs (scripts/gpu-bench-serve.sh: 512 → 128 tokens, concurrency 1, 16, 64).
#
#   scripts/gpu-bench-vllm-vs-builtin.sh TANDEM TOKENIZER_KIT OUT_DIR [CONCURRENCY…]
#
# TANDEM: a build with the `cuda` feature. TOKENIZER_KIT: the folder
# scripts/gguf_tokenizer_kit.py writes from the default model (tokenizer-only.gguf for
# `--load-format dummy`, hf/ for the benchmark client). The vLLM worker is started with
# `tandem up topologies/gpu-vllm-single.toml` and measured directly (not through the
# router); its model folder is made with MAKE_MODEL if missing, as in gpu-vllm-smoke.sh.
# Ends with tandem / vLLM per concurrency and issue 21's serving targets
# (scripts/gpu_vs_vllm_ratios.py). TEMPERATURE (default 0) is passed to both servers' clients
# (scripts/gpu-bench-serve.sh). QUANTIZATION=fp8 starts both servers with `--quantization
# fp8` (vLLM's dynamic FP8 and tandem's, the same scheme); default none.
set -euo pipefail
tandem=$(realpath "${1:?usage: gpu-bench-vllm-vs-builtin.sh TANDEM TOKENIZER_KIT OUT_DIR}")
kit=$(realpath "${2:?}")
out=${3:?}
shift 3
concurrencies=${*:-1 16 64}
here=$(cd "$(dirname "$0")" && pwd)
make_model=${MAKE_MODEL:-$here/../../shared/tools/vllm-gpu/make_model_dir.py}
quantization=${QUANTIZATION:-none}
topology=topologies/gpu-vllm-single.toml
if [ "$quantization" != none ]; then
  topology=$(mktemp --suffix .toml)
  sed "s/\"--max-model-len\", \"4096\"\]/\"--max-model-len\", \"4096\", \"--quantization\", \"$quantization\"]/" \
    topologies/gpu-vllm-single.toml > "$topology"
  grep -q -- '"--quantization"' "$topology" || { echo "could not add --quantization to $topology"; exit 1; }
fi
model_dir=/tmp/llama31-8b-dummy   # topologies/gpu-vllm-single.toml's model
mkdir -p "$out"
[ -d "$model_dir" ] || python3 "$make_model" "$model_dir" > /dev/null

wait_health() { # URL PID SECONDS
  local deadline=$((SECONDS + $3))
  until curl -sf "$1/health" > /dev/null; do
    kill -0 "$2" 2> /dev/null || { echo "exited before $1 was healthy"; return 1; }
    ((SECONDS < deadline)) || { echo "$1 not healthy after $3 s"; return 1; }
    sleep 2
  done
}
stop() { kill -TERM "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; }

echo "== vLLM: tandem up $topology (quantization $quantization), measured at the worker"
"$tandem" up "$topology" --log-dir "$out/vllm-logs" \
  --start-timeout 600 > "$out/vllm-up.out" 2>&1 < /dev/null &
up=$!
trap 'stop "$up"' EXIT
trap 'stop "$up"; exit 1' INT TERM
started=$SECONDS
if wait_health http://127.0.0.1:8192 "$up" 600; then
  echo "up after $((SECONDS - started)) s"
  "$here/gpu-bench-serve.sh" vllm http://127.0.0.1:8100 llama "$model_dir" "$out" $concurrencies || true
else
  tail -n 30 "$out/vllm-up.out" "$out"/vllm-logs/*.log
fi
stop "$up"

echo "== tandem serve --device cuda --load-format dummy --model llama-3.1-8b --quantization $quantization"
cache=$(mktemp -d)
mkdir -p "$cache/models"
# --load-format dummy reads only the tokenizer from the default model's path.
cp "$kit/tokenizer-only.gguf" "$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TANDEM_CACHE_DIR=$cache \
  LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
  "$tandem" serve --device cuda --load-format dummy --model llama-3.1-8b \
  --served-model-name llama --port 8300 --max-num-seqs 64 --quantization "$quantization" \
  > "$out/tandem-serve.log" 2>&1 < /dev/null &
serve=$!
trap 'stop "$serve"' EXIT
trap 'stop "$serve"; exit 1' INT TERM
started=$SECONDS
if wait_health http://127.0.0.1:8300 "$serve" 300; then
  echo "up after $((SECONDS - started)) s"
  "$here/gpu-bench-serve.sh" tandem http://127.0.0.1:8300 llama "$kit/hf" "$out" $concurrencies || true
else
  tail -n 30 "$out/tandem-serve.log"
fi
stop "$serve"
python3 "$here/gpu_vs_vllm_ratios.py" "$out" $concurrencies
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
