#!/usr/bin/env python3
"""End-to-end check of the GPU engine on a GPU machine (docs/gpu.md).

1. One `tandem serve --device cuda` worker answers a set of greedy requests
   (completions and chat, streamed and not): the reference answers.
2. A prefill worker and a decode worker on the GPU(s), behind `tandem route`, answer
   the same requests: the answers must be identical, every decode leg's KV must have
   been pulled (no recompute), and on one host the pull goes GPU to GPU (CUDA IPC).
3. Both layouts then serve `tandem bench`'s seed tests, for the record.

Usage: gpu_e2e.py TANDEM_BINARY MODEL [--decode-device cuda:1] [--out DIR]
Exit status 0 only if every check passed.
"""

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

PROMPTS = [
    "The capital of France is",
    "Explain how HTTP load balancers work in 3 sentences.",
    "def fibonacci(n):",
    "What is a REST API?",
]


def post(url, body, timeout=120):
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_healthy(url, proc, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            get(url + "/health", 2)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"{url} not healthy within {seconds} s")


def start(args, log):
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def streamed_text(raw):
    text = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def answers(base):
    out = []
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0}
        out.append(json.loads(post(base + "/v1/completions", body))["choices"][0]["text"])
        out.append(streamed_text(post(base + "/v1/completions", dict(body, stream=True))))
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0}
        out.append(json.loads(post(base + "/v1/chat/completions", chat))["choices"][0]["message"]["content"])
        out.append(streamed_text(post(base + "/v1/chat/completions", dict(chat, stream=True))))
    return out


def metric(text, name, labels=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench(tandem, url, workload, out_json):
    # Greedy and to the full length, so both layouts generate the same tokens.
    cmd = [tandem, "bench", "--url", url, "--workload", workload, "--temperature", "0",
           "--ignore-eos", "--json", out_json]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tandem")
    ap.add_argument("model")
    ap.add_argument("--prefill-device", default="cuda:0")
    ap.add_argument("--decode-device", default="cuda:0")
    ap.add_argument("--kv-cache-memory", default="16GiB")
    ap.add_argument("--out", default=".")
    ap.add_argument("--expect-device-pulls", action="store_true",
                    help="every pull must copy GPU to GPU (both workers on this host's GPUs)")
    a = ap.parse_args()
    # The workers' shared KV secret (protocol v2 refuses --kv-port without one).
    os.environ.setdefault("TANDEM_KV_SECRET", secrets.token_hex(32))
    os.makedirs(a.out, exist_ok=True)
    common = ["--model", a.model, "--kv-cache-memory", a.kv_cache_memory, "--max-model-len", "4096"]
    failures = []
    log = open(os.path.join(a.out, "e2e-processes.log"), "w")

    single = start([a.tandem, "serve", "--device", a.prefill_device, "--port", "8300"] + common, log)
    try:
        wait_healthy("http://127.0.0.1:8300", single)
        reference = answers("http://127.0.0.1:8300")
        print(bench(a.tandem, "http://127.0.0.1:8300", "seed-single", os.path.join(a.out, "single-seed-single.json")))
        print(bench(a.tandem, "http://127.0.0.1:8300", "seed-batch", os.path.join(a.out, "single-seed-batch.json")))
    finally:
        stop([single])

    p = start([a.tandem, "serve", "--device", a.prefill_device, "--port", "8100", "--kv-port", "5600"] + common, log)
    d = start([a.tandem, "serve", "--device", a.decode_device, "--port", "8200"] + common, log)
    procs = [p, d]
    try:
        wait_healthy("http://127.0.0.1:8100", p)
        wait_healthy("http://127.0.0.1:8200", d)
        router = start([a.tandem, "route", "--prefill", "http://127.0.0.1:8100", "--decode", "http://127.0.0.1:8200", "--port", "8192"], log)
        procs.append(router)
        wait_healthy("http://127.0.0.1:8192", router)
        disaggregated = answers("http://127.0.0.1:8192")
        for i, (want, got) in enumerate(zip(reference, disaggregated)):
            if want != got:
                failures.append(f"answer {i} differs: single {want!r}, P/D {got!r}")
        print(f"P/D answers identical to the single worker's: {len(reference) - len(failures)}/{len(reference)}")
        dm, pm = get("http://127.0.0.1:8200/metrics"), get("http://127.0.0.1:8100/metrics")
        received = metric(dm, "tandem:kv_transfer_bytes_total", 'direction="received"')
        sent = metric(pm, "tandem:kv_transfer_bytes_total", 'direction="sent"')
        recomputes = metric(dm, "tandem:kv_load_recomputes_total")
        failed = metric(dm, "tandem:kv_transfer_failures_total")
        seconds = metric(dm, "tandem:kv_transfer_seconds_sum")
        pulls = metric(dm, "tandem:kv_transfer_seconds_count")
        device_pulls = metric(dm, "tandem:kv_device_pulls_total")
        print(f"KV pulled: {received / 1e6:.1f} MB in {pulls:.0f} pulls, {seconds * 1e3:.1f} ms in all; "
              f"P sent {sent / 1e6:.1f} MB; GPU-to-GPU pulls {device_pulls:.0f}; "
              f"recomputes {recomputes:.0f}; failures {failed:.0f}")
        if received <= 0 or received != sent:
            failures.append(f"KV bytes: D received {received}, P sent {sent}")
        if a.expect_device_pulls and device_pulls != pulls:
            failures.append(f"only {device_pulls:.0f} of {pulls:.0f} pulls went GPU to GPU")
        if recomputes or failed:
            failures.append(f"{recomputes:.0f} recomputes, {failed:.0f} transfer failures")
        with open(os.path.join(a.out, "e2e-metrics-decode.txt"), "w") as f:
            f.write(dm)
        print(bench(a.tandem, "http://127.0.0.1:8192", "seed-single", os.path.join(a.out, "pd-seed-single.json")))
        print(bench(a.tandem, "http://127.0.0.1:8192", "seed-batch", os.path.join(a.out, "pd-seed-batch.json")))
    finally:
        stop(procs)
        log.close()
    with open(os.path.join(a.out, "e2e-processes.log")) as f:
        ipc = [l for l in f if re.search(r"IPC|map the prefill|reading bytes", l)]
    print("".join(ipc[-5:]))
    for f in failures:
        print("FAIL:", f)
    print("e2e:", "PASS" if not failures else "FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
