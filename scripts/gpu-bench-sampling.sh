#!/usr/bin/env bash
# On a GPU machine: `tandem serve --device cuda` (Llama-3.1-8B shapes, random weights)
# with greedy tokens picked on the host (TANDEM_GPU_SAMPLING=host: every row's logits
# come back) and on the GPU (the default: only token ids come back), in the order
# host, device, device, host (ABBA, so drift in the machine shows as a spread rather
# than as a difference), each server alone on the GPU and measured by `tandem bench`
# at 1, 16 and 64 users, 512 → 128 random tokens, greedy. After each server's runs the
# engine's step histogram (tandem:engine_step_seconds) gives where a step's time went:
# mean forward and sampling time per step kind.
#
#   scripts/gpu-bench-sampling.sh TANDEM TOKENIZER_KIT OUT_DIR [CONCURRENCY…]
#
# MODES (default "host device device host") sets the servers' sampling modes, in order:
# MODES=device with two binaries run as A B B A compares engine builds. A mode may name
# a weight quantization after a colon (device:fp8 starts that server with
# --quantization fp8; scripts/gpu-bench-fp8.sh runs "device:none device:fp8"). TEMPERATURE
# (default 0, greedy) is the clients' sampling temperature: above 0 the GPU samples
# (only ids come back) where the host mode brings the logits back to sample them.
#
# TOKENIZER_KIT: the folder scripts/gguf_tokenizer_kit.py writes from the default model
# (tokenizer-only.gguf for `--load-format dummy`, hf/ for the client), as in
# scripts/gpu-bench-vllm-vs-builtin.sh. Every server gets the same seeds (a fresh server
# has an empty prefix cache), each concurrency its own.
set -euo pipefail
tandem=$(realpath "${1:?usage: gpu-bench-sampling.sh TANDEM TOKENIZER_KIT OUT_DIR}")
kit=$(realpath "${2:?}")
out=${3:?}
shift 3
concurrencies=${*:-1 16 64}
mkdir -p "$out"
cache=$(mktemp -d)
mkdir -p "$cache/models"
# --load-format dummy reads only the tokenizer from the default model's path.
cp "$kit/tokenizer-only.gguf" "$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
url=http://127.0.0.1:8300

wait_health() { # PID SECONDS
  local deadline=$((SECONDS + $2))
  until curl -sf "$url/health" > /dev/null; do
    kill -0 "$1" 2> /dev/null || { echo "exited before $url was healthy"; return 1; }
    ((SECONDS < deadline)) || { echo "$url not healthy after $2 s"; return 1; }
    sleep 2
  done
}
stop() { kill -TERM "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; }

step_summary() { # METRICS_FILE
  python3 - "$1" <<'PY'
import re, sys
sums, counts = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r'tandem:engine_step_seconds_(sum|count)\{([^}]*)\} (\S+)', line)
    if not m:
        continue
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
    key = (labels["kind"], labels["part"])
    (sums if m.group(1) == "sum" else counts)[key] = float(m.group(3))
for key in sorted(counts):
    n = counts[key]
    if n:
        print(f"    {key[0]:>7} {key[1]:>7}: {n:6.0f} steps, mean {1e3 * sums[key] / n:7.3f} ms")
PY
}

round=0
for mode in ${MODES:-host device device host}; do
  sampling=${mode%%:*}
  quantization=none
  [[ $mode == *:* ]] && quantization=${mode#*:}
  round=$((round + 1))
  name="$round-$sampling"
  [ "$quantization" = none ] || name+="-$quantization"
  echo "== $name: TANDEM_GPU_SAMPLING=$sampling tandem serve --device cuda --quantization $quantization"
  TANDEM_GPU_SAMPLING=$sampling TANDEM_CACHE_DIR=$cache \
    "$tandem" serve --device cuda --load-format dummy --model llama-3.1-8b \
    --served-model-name llama --port 8300 --max-num-seqs 64 --quantization "$quantization" \
    > "$out/$name-serve.log" 2>&1 < /dev/null &
  serve=$!
  trap 'stop "$serve"' EXIT
  if ! wait_health "$serve" 300; then
    tail -n 30 "$out/$name-serve.log"
    exit 1
  fi
  for c in $concurrencies; do
    n=$((c * 4 > 16 ? c * 4 : 16))
    "$tandem" bench --url "$url" --model llama --workload random \
      --input-len 512 --output-len 128 --range-ratio 0 --ignore-eos --temperature "${TEMPERATURE:-0}" \
      --tokenizer "$kit/hf" --num-prompts "$n" --max-concurrency "$c" --seed $((10 * c + 1)) \
      --percentiles 50,99 --json "$out/$name-c$c.json" > "$out/$name-c$c.log" 2>&1 \
      || { tail -n 20 "$out/$name-c$c.log"; exit 1; }
    python3 - "$out/$name-c$c.json" "$sampling/$quantization" "$c" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  {sys.argv[2]:>11} c={sys.argv[3]:>3} n={r['completed']:>3} failed={r.get('failed', 0)} "
      f"{r['output_throughput']:8.1f} out tok/s  "
      f"TTFT p50 {r['median_ttft_ms']:7.1f} p99 {r['p99_ttft_ms']:7.1f} ms  "
      f"TPOT p50 {r['median_tpot_ms']:6.2f} p99 {r['p99_tpot_ms']:6.2f} ms")
PY
  done
  curl -sf "$url/metrics" > "$out/$name-metrics.txt"
  echo "  engine steps over all runs ($name):"
  step_summary "$out/$name-metrics.txt"
  kill -TERM "$serve" 2> /dev/null || true
  status=0
  wait "$serve" || status=$?
  echo "  server exited with status $status"
  trap - EXIT
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
