#!/usr/bin/env bash
# The router's peak RSS while N clients send 7.5 MB prompts at once, without a bound on
# request bodies in flight (8GiB) and with one (BUDGET, default 128MiB), same binary,
# back to back; prints both and the ratio (docs/benchmarks.md, "Request bodies in
# flight"). Needs the default model (`tandem model fetch`) and curl.
#
#   scripts/router-body-memory.sh TANDEM [N] [BUDGET]
set -euo pipefail
tandem=$(realpath "${1:?usage: router-body-memory.sh TANDEM [N] [BUDGET]}")
n=${2:-96}
budget=${3:-128MiB}
work=$(mktemp -d)
python3 -c "import json; print(json.dumps({'prompt': 'word ' * 1500000, 'max_tokens': 4}))" > "$work/body.json"
wait_health() { until curl -sf "$1/health" > /dev/null; do sleep 0.2; done; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2> /dev/null || echo 0; }

run() { # BUDGET → "peak_mib codes…"
  "$tandem" serve --threads 1 --max-model-len 512 --kv-cache-memory 128MiB --port 8301 \
    > "$work/worker.log" 2>&1 &
  local worker=$!
  wait_health http://127.0.0.1:8301
  "$tandem" route --worker http://127.0.0.1:8301 --port 8302 \
    --max-body-bytes-in-flight "$1" > "$work/router.log" 2>&1 &
  local router=$!
  wait_health http://127.0.0.1:8302
  sleep 1
  (while kill -0 "$router" 2> /dev/null; do rss_kib "$router"; sleep 0.01; done) > "$work/rss" &
  local sampler=$!
  local clients=()
  for _ in $(seq "$n"); do
    curl -s -o /dev/null -w '%{http_code}\n' -H 'content-type: application/json' \
      --data-binary @"$work/body.json" http://127.0.0.1:8302/v1/completions >> "$work/codes" &
    clients+=($!)
  done
  wait "${clients[@]}"
  sleep 0.5
  kill "$sampler" "$router" "$worker"
  wait 2> /dev/null || true
  echo "$(($(sort -n "$work/rss" | tail -1) / 1024)) $(sort "$work/codes" | uniq -c | tr -s ' \n' ' ')"
  rm -f "$work/codes" "$work/rss"
}

read -r unbounded unbounded_codes <<< "$(run 8GiB)"
read -r bounded bounded_codes <<< "$(run "$budget")"
echo "$n clients × 7.5 MB: router peak RSS $unbounded MiB without a bound (answers:$unbounded_codes)"
echo "$n clients × 7.5 MB: router peak RSS $bounded MiB with --max-body-bytes-in-flight $budget (answers:$bounded_codes)"
python3 -c "print(f'unbounded / bounded: {$unbounded / $bounded:.2f}×')"
rm -rf "$work"
