#!/usr/bin/env bash
# On a GPU machine with vLLM installed (../shared/tools/vllm-gpu/README.md): starts a
# vLLM prefill and a vLLM decode instance behind the router through `tandem up`, sends a
# completion and a streamed chat through the router, checks that the KV moved from the
# prefill to the decode instance over NIXL, and tears everything down.
#
#   scripts/gpu-vllm-smoke.sh TANDEM [TOPOLOGY]      # default topologies/gpu-vllm-1p1d.toml
#
# Environment:
#   MAKE_MODEL  make_model_dir.py, run if the topology's model folder is missing
#               (default: ../shared/tools/vllm-gpu/make_model_dir.py)
#   LOG_DIR     where `tandem up` writes each process's log (default: a fresh temp dir)
#   THEN        a command run while the stack is up, after the checks, with $ROUTER set
#               to the router's URL (e.g. a benchmark); its failure fails the smoke test
# Anything else in the environment (UCX_LOG_LEVEL, UCX_TLS, …) reaches the workers.
set -euo pipefail
tandem=$(realpath "${1:?usage: gpu-vllm-smoke.sh TANDEM [TOPOLOGY]}")
topology=${2:-topologies/gpu-vllm-1p1d.toml}
here=$(cd "$(dirname "$0")" && pwd)
make_model=${MAKE_MODEL:-$here/../../shared/tools/vllm-gpu/make_model_dir.py}
logs=${LOG_DIR:-$(mktemp -d /tmp/tandem-smoke.XXXXXX)}
mkdir -p "$logs"

# What the topology says: the router's URL, the first decode worker's URL, the model,
# and every port it listens on.
read -r router decode model ports < <(python3 - "$topology" <<'PY'
import sys, tomllib
t = tomllib.load(open(sys.argv[1], "rb"))
port = t.get("router", {}).get("port", 8192)
workers = t["worker"]
decode = next((w for w in workers if w["role"] == "decode"), workers[0])
ports = [port] + [w[k] for w in workers for k in ("port", "kv_port") if k in w]
print(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{decode['port']}", workers[0]["model"],
      ",".join(map(str, ports)))
PY
)
if [[ $model == /* && ! -d $model ]]; then
  python3 "$make_model" "$model" >/dev/null
  echo "model folder: $model (made by $make_model)"
fi

say() { echo "== $*"; }
say "tandem doctor $topology"
# A failed check is reported, not fatal: tandem up says more about what stops a start.
"$tandem" doctor "$topology" || say "doctor found problems (above); starting anyway"

say "tandem up $topology (logs in $logs)"
"$tandem" up "$topology" --log-dir "$logs" --start-timeout 600 > "$logs/up.out" 2>&1 < /dev/null &
up=$!
# tandem up stops what it started on SIGTERM; never leave it running (it holds the GPU).
stop() {
  if kill -0 "$up" 2>/dev/null; then
    kill -TERM "$up"
    wait "$up" || true
  fi
}
trap stop EXIT
trap 'stop; exit 1' INT TERM

started=$SECONDS
until curl -sf "$router/health" > /dev/null; do
  if ! kill -0 "$up" 2>/dev/null; then
    echo "tandem up exited before the router was healthy:"; tail -n 40 "$logs/up.out"
    for f in "$logs"/*.log; do echo "--- $f"; tail -n 15 "$f"; done
    exit 1
  fi
  sleep 2
done
say "up after $((SECONDS - started)) s"
grep -E "ready|starting" "$logs/up.out" || true

# Prompts of `w<i>` words: with the dummy tokenizer each word is one token (and a
# prompt not seen before is not served from the prefix cache).
words() { python3 -c "import sys; a, n = map(int, sys.argv[1:]); print(' '.join(f'w{i}' for i in range(a, a + n)))" "$@"; }

say "completion through the router"
body=$(python3 -c 'import json, sys; print(json.dumps({"model": "llama", "prompt": sys.argv[1], "max_tokens": 16, "temperature": 0}))' "$(words 1000 300)")
curl -sf "$router/v1/completions" -H 'Content-Type: application/json' -d "$body" > "$logs/completion.json"
python3 - "$logs/completion.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
usage = r["usage"]
assert usage["prompt_tokens"] >= 300 and usage["completion_tokens"] == 16, usage
assert r["choices"][0]["text"], r
print("completion:", usage, repr(r["choices"][0]["text"][:60]))
PY

say "streamed chat through the router"
body=$(python3 -c 'import json, sys; print(json.dumps({"model": "llama", "messages": [{"role": "user", "content": sys.argv[1]}], "max_tokens": 24, "temperature": 0, "stream": True}))' "$(words 5000 200)")
curl -sfN "$router/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" > "$logs/chat.sse"
python3 - "$logs/chat.sse" <<'PY'
import json, sys
events = [l[6:] for l in open(sys.argv[1]) if l.startswith("data: ")]
assert events and events[-1].strip() == "[DONE]", events[-3:]
chunks = [json.loads(e) for e in events[:-1]]
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
assert text, "no content streamed"
print(f"chat: {len(chunks)} chunks, {len(text)} characters: {text[:60]!r}")
PY

say "the KV moved: NIXL transfers on the decode worker, P/D decisions on the router"
curl -sf "$decode/metrics" | grep -E '^vllm:nixl_(xfer_time_seconds_(count|sum)|bytes_transferred_(count|sum)|num_failed_transfers)' | tee "$logs/nixl.txt" || true
curl -sf "$router/metrics" | grep -E '^tandem_router_(pd_|requests_total)' | tee "$logs/router.txt" || true
transfers=$(awk '/^vllm:nixl_xfer_time_seconds_count/ { n += $NF } END { print n + 0 }' "$logs/nixl.txt")
if awk -v n="$transfers" 'BEGIN { exit !(n >= 2) }'; then
  say "ok: $transfers NIXL transfers for 2 requests"
else
  echo "FAIL: $transfers NIXL transfers on the decode worker for 2 requests"; exit 1
fi

if [[ -n ${THEN:-} ]]; then
  say "THEN: $THEN"
  ROUTER=$router bash -c "$THEN"
fi

say "teardown"
kill -TERM "$up"
wait "$up" || true
tail -n 3 "$logs/up.out"
for port in ${ports//,/ }; do
  if (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "FAIL: port $port still open"; exit 1; fi
done
left=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | wc -l)
say "ok: stopped; $left processes left on the GPU"
