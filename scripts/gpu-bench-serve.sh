#!/usr/bin/env bash
# `vllm bench serve` at several concurrencies against one OpenAI-compatible server
# (vLLM, `tandem serve`, or the router in front of them): random prompts of 512 tokens,
# 128 output tokens each (--ignore-eos), 4 requests per concurrent user (at least 16).
# Saves one JSON per concurrency and prints a line per run.
#
#   scripts/gpu-bench-serve.sh NAME URL MODEL TOKENIZER OUT_DIR [CONCURRENCY…]   # default 1 16 64
#
# TOKENIZER must be the server's own (a Hugging Face folder), so that the prompts are
# 512 tokens for the server: the model folder for a vLLM worker, the folder
# scripts/gguf_tokenizer_kit.py writes for `tandem serve` on the default model's
# tokenizer. VLLM (default `python3 -m vllm.entrypoints.cli.main`) runs vLLM's CLI.
# With TANDEM_BENCH=path/to/tandem, each run is repeated with `tandem bench` on the same
# endpoint, shapes and tokenizer, and the two tools' figures are printed side by side
# (issue 15: both within 10%).
set -euo pipefail
name=${1:?} url=${2:?} model=${3:?} tokenizer=${4:?} out=${5:?}
shift 5
concurrencies=${*:-1 16 64}
vllm=${VLLM:-python3 -m vllm.entrypoints.cli.main}
mkdir -p "$out"
for c in $concurrencies; do
  n=$((c * 4 > 16 ? c * 4 : 16))
  # shellcheck disable=SC2086
  $vllm bench serve --backend openai --base-url "$url" --endpoint /v1/completions \
    --model "$model" --tokenizer "$tokenizer" --dataset-name random \
    --random-input-len 512 --random-output-len 128 --ignore-eos --temperature 0 \
    --num-prompts "$n" --max-concurrency "$c" --seed 0 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    --save-result --result-dir "$out" --result-filename "$name-c$c.json" \
    > "$out/$name-c$c.log" 2>&1 || { tail -n 20 "$out/$name-c$c.log"; exit 1; }
  python3 - "$out/$name-c$c.json" "$name" "$c" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:>14} c={sys.argv[3]:>3} n={r['completed']:>3} failed={r.get('failed', 0)} "
      f"in={r['total_input_tokens']} out={r['total_output_tokens']}  "
      f"{r['output_throughput']:8.1f} out tok/s  "
      f"TTFT p50 {r['median_ttft_ms']:8.1f} p99 {r['p99_ttft_ms']:8.1f} ms  "
      f"TPOT p50 {r['median_tpot_ms']:6.2f} p99 {r['p99_tpot_ms']:6.2f} ms")
PY
  if [ -n "${TANDEM_BENCH:-}" ]; then
    "$TANDEM_BENCH" bench --url "$url" --model "$model" --workload random \
      --input-len 512 --output-len 128 --range-ratio 0 --ignore-eos --temperature 0 \
      --tokenizer "$tokenizer" --num-prompts "$n" --max-concurrency "$c" --seed 0 \
      --percentiles 50,99 --json "$out/$name-c$c.tandem-bench.json" \
      > "$out/$name-c$c.tandem-bench.log" 2>&1 || { tail -n 20 "$out/$name-c$c.tandem-bench.log"; exit 1; }
    python3 - "$out/$name-c$c.json" "$out/$name-c$c.tandem-bench.json" "$name" "$c" <<'PY'
import json, sys
v, t = (json.load(open(p)) for p in sys.argv[1:3])
keys = ["output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_tpot_ms"]
print(f"{sys.argv[3]:>14} c={sys.argv[4]:>3} tandem bench / vllm bench serve: " +
      "  ".join(f"{k} {t[k]:.1f}/{v[k]:.1f} = {t[k] / v[k]:.2f}" for k in keys))
PY
  fi
done
