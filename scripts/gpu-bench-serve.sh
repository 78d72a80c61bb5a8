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
# (issue 15: both within 10%). With TANDEM_BENCH and ROUNDS=2 the runs go
# vllm, tandem, tandem, vllm (ABBA) at each concurrency, and each tool's two runs are
# also compared with each other (A/A): a difference between the tools smaller than
# the A/A spread is the run, not the tool. Every run draws its prompts from its own seed
# (10 × concurrency + run number): a run that repeated an earlier run's prompts would
# find them in the server's prefix cache (on one H200 that cut TTFT p50 at 16 users
# from 204 to 47 ms), and so would runs at two concurrencies whose prompt lists share
# a start. TEMPERATURE (default 0, greedy) is the sampling temperature both clients ask
# for; with a temperature above 0 the server samples each token (the only sampling
# parameter set: no top-k, top-p or penalties).
set -euo pipefail
name=${1:?} url=${2:?} model=${3:?} tokenizer=${4:?} out=${5:?}
shift 5
concurrencies=${*:-1 16 64}
vllm=${VLLM:-python3 -m vllm.entrypoints.cli.main}
rounds=${ROUNDS:-1}
temperature=${TEMPERATURE:-0}
mkdir -p "$out"

vllm_run() { # CONCURRENCY REQUESTS FILE_STEM SEED
  # shellcheck disable=SC2086
  $vllm bench serve --backend openai --base-url "$url" --endpoint /v1/completions \
    --model "$model" --tokenizer "$tokenizer" --dataset-name random \
    --random-input-len 512 --random-output-len 128 --ignore-eos --temperature "$temperature" \
    --num-prompts "$2" --max-concurrency "$1" --seed "$4" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    --save-result --result-dir "$out" --result-filename "$3.json" \
    > "$out/$3.log" 2>&1 || { tail -n 20 "$out/$3.log"; exit 1; }
  python3 - "$out/$3.json" "$name" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:>14} c={sys.argv[3]:>3} n={r['completed']:>3} failed={r.get('failed', 0)} "
      f"in={r['total_input_tokens']} out={r['total_output_tokens']}  "
      f"{r['output_throughput']:8.1f} out tok/s  "
      f"TTFT p50 {r['median_ttft_ms']:8.1f} p99 {r['p99_ttft_ms']:8.1f} ms  "
      f"TPOT p50 {r['median_tpot_ms']:6.2f} p99 {r['p99_tpot_ms']:6.2f} ms")
PY
}

tandem_run() { # CONCURRENCY REQUESTS FILE_STEM SEED
  "$TANDEM_BENCH" bench --url "$url" --model "$model" --workload random \
    --input-len 512 --output-len 128 --range-ratio 0 --ignore-eos --temperature "$temperature" \
    --tokenizer "$tokenizer" --num-prompts "$2" --max-concurrency "$1" --seed "$4" \
    --percentiles 50,99 --json "$out/$3.json" \
    > "$out/$3.log" 2>&1 || { tail -n 20 "$out/$3.log"; exit 1; }
}

compare() { # LABEL CONCURRENCY NUMERATOR.json DENOMINATOR.json
  python3 - "$out/$3" "$out/$4" "$name" "$2" "$1" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
keys = ["output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms"]
print(f"{sys.argv[3]:>14} c={sys.argv[4]:>3} {sys.argv[5]}: " +
      "  ".join(f"{k} {a[k]:.1f}/{b[k]:.1f} = {a[k] / b[k]:.2f}" for k in keys))
PY
}

for c in $concurrencies; do
  n=$((c * 4 > 16 ? c * 4 : 16))
  vllm_run "$c" "$n" "$name-c$c" $((10 * c + 1))
  [ -n "${TANDEM_BENCH:-}" ] || continue
  tandem_run "$c" "$n" "$name-c$c.tandem-bench" $((10 * c + 2))
  if [ "$rounds" = 2 ]; then
    tandem_run "$c" "$n" "$name-c$c.tandem-bench-2" $((10 * c + 3))
    vllm_run "$c" "$n" "$name-c$c-2" $((10 * c + 4))
    compare "tandem bench / vllm bench serve (2nd runs)" "$c" \
      "$name-c$c.tandem-bench-2.json" "$name-c$c-2.json"
    compare "A/A vllm bench serve 2nd / 1st" "$c" "$name-c$c-2.json" "$name-c$c.json"
    compare "A/A tandem bench 2nd / 1st" "$c" \
      "$name-c$c.tandem-bench-2.json" "$name-c$c.tandem-bench.json"
  fi
  compare "tandem bench / vllm bench serve" "$c" "$name-c$c.tandem-bench.json" "$name-c$c.json"
done
