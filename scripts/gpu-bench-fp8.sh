#!/usr/bin/env bash
# On a GPU machine: `tandem serve --device cuda` at Llama-3.1-8B shapes (random weights),
# in bf16 and then with --quantization fp8, each alone on the GPU, each measured with
# `tandem bench` (random 512 -> 128 tokens, --ignore-eos, 4 prompts a user, at least 16)
# at the same concurrencies with the same seeds.
#
#   scripts/gpu-bench-fp8.sh TANDEM TOKENIZER_KIT OUT_DIR [CONCURRENCY…]
#
# TANDEM: a build with the `cuda` feature. TOKENIZER_KIT: the folder
# scripts/gguf_tokenizer_kit.py writes (tokenizer-only.gguf for --load-format dummy, hf/
# for the client), as for scripts/gpu-bench-vllm-vs-builtin.sh.
set -euo pipefail
tandem=$(realpath "${1:?usage: gpu-bench-fp8.sh TANDEM TOKENIZER_KIT OUT_DIR [CONCURRENCY…]}")
kit=$(realpath "${2:?}")
out=${3:?}
shift 3
concurrencies=${*:-1 16 64}
mkdir -p "$out"
cache=$(mktemp -d)
mkdir -p "$cache/models"
cp "$kit/tokenizer-only.gguf" "$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

for q in none fp8; do
  TANDEM_CACHE_DIR=$cache "$tandem" serve --device cuda --load-format dummy --model llama-3.1-8b \
    --served-model-name llama --port 8300 --max-num-seqs 64 --quantization "$q" \
    > "$out/serve-$q.log" 2>&1 < /dev/null &
  pid=$!
  healthy=
  for _ in $(seq 1 300); do
    curl -sf localhost:8300/health > /dev/null && { healthy=1; break; }
    kill -0 "$pid" 2> /dev/null || break
    sleep 1
  done
  [ -n "$healthy" ] || { tail -n 30 "$out/serve-$q.log"; exit 1; }
  for c in $concurrencies; do
    n=$((c * 4 > 16 ? c * 4 : 16))
    "$tandem" bench --url http://127.0.0.1:8300 --model llama --workload random \
      --input-len 512 --output-len 128 --range-ratio 0 --ignore-eos --tokenizer "$kit/hf" \
      --num-prompts "$n" --max-concurrency "$c" --seed $((10 * c + 1)) --percentiles 50,99 \
      --json "$out/$q-c$c.json" > "$out/$q-c$c.log" 2>&1 || { tail -n 20 "$out/$q-c$c.log"; exit 1; }
    python3 - "$out/$q-c$c.json" "$q" "$c" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:>5} c={sys.argv[3]:>3} n={r['completed']:>3} failed={r.get('failed', 0)} "
      f"{r['output_throughput']:8.1f} out tok/s  TTFT p50 {r['median_ttft_ms']:7.1f} p99 {r['p99_ttft_ms']:7.1f} ms  "
      f"TPOT p50 {r['median_tpot_ms']:6.2f} p99 {r['p99_tpot_ms']:6.2f} ms")
PY
  done
  kill -TERM "$pid"
  status=0
  wait "$pid" || status=$?
  echo "== $q: server exited with status $status"
done
