#!/usr/bin/env python3
"""Issue 17's churn run: workers join and leave through etcd under load, and no request fails.

Starts a real etcd, `tandem route --discovery`, and two `tandem serve --discovery`
workers (one thread each); runs `tandem bench` with many concurrent streams through
the router; meanwhile, every PERIOD seconds, alternately starts a new registered worker
or sends SIGTERM to the oldest extra one (which deregisters, then finishes its
requests). Prints the bench's completed/failed counts, the router's 2xx/5xx counts and
the churn events, and exits non-zero if any request failed.

    python3 scripts/churn_bench.py [--tandem target/release/tandem] [--streams 64]
        [--period 5] [--duration 60] [--num-prompts 1500] [--json out.json]

Needs `etcd` on the PATH (Debian's etcd-server) and the default model. Ports 18700-18799.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BASE = 18700
ETCD_CLIENT, ETCD_PEER, ROUTER = BASE + 1, BASE + 2, BASE + 3


def get(port, path, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read().decode()


def wait_http(port, path, proc, what, seconds=60, status=200):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            if get(port, path, 2)[0] == status:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} on :{port} not ready after {seconds}s")


def counter(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tandem", default="target/release/tandem")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--period", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--num-prompts", type=int, default=1500)
    p.add_argument("--json")
    opts = p.parse_args()
    if not shutil.which("etcd"):
        sys.exit("no etcd on the PATH (apt-get install etcd-server)")
    tmp = tempfile.mkdtemp(prefix="tandem-churn-")
    procs, workers, events = [], [], []
    log = lambda name: open(os.path.join(tmp, name), "ab")
    discovery = f"etcd://127.0.0.1:{ETCD_CLIENT}"
    next_port = [BASE + 10]

    def start_worker():
        port = next_port[0]
        next_port[0] += 1
        proc = subprocess.Popen(
            [opts.tandem, "serve", "--port", str(port), "--threads", "1",
             "--kv-cache-memory", "256MiB", "--max-model-len", "2048",
             "--discovery", discovery, "--discovery-ttl-secs", "3"],
            stdout=log(f"worker-{port}.log"), stderr=subprocess.STDOUT)
        wait_http(port, "/health", proc, f"worker :{port}")
        workers.append((port, proc))
        procs.append(proc)
        return port

    try:
        etcd = subprocess.Popen(
            ["etcd", "--name", "churn", "--data-dir", os.path.join(tmp, "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{ETCD_CLIENT}",
             "--advertise-client-urls", f"http://127.0.0.1:{ETCD_CLIENT}",
             "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER}",
             "--initial-cluster", f"churn=http://127.0.0.1:{ETCD_PEER}"],
            stdout=log("etcd.log"), stderr=subprocess.STDOUT)
        procs.append(etcd)
        wait_http(ETCD_CLIENT, "/health", etcd, "etcd")
        router = subprocess.Popen(
            [opts.tandem, "route", "--port", str(ROUTER), "--discovery", discovery,
             "--health-interval-ms", "500"],
            stdout=log("router.log"), stderr=subprocess.STDOUT)
        procs.append(router)
        for _ in range(2):
            start_worker()
        wait_http(ROUTER, "/health", router, "router")
        out = os.path.join(tmp, "bench.json")
        bench = subprocess.Popen(
            [opts.tandem, "bench", "--url", f"http://127.0.0.1:{ROUTER}", "--endpoint",
             "completions", "--workload", "random", "--input-len", "64", "--output-len", "32", "--num-prompts",
             str(opts.num_prompts), "--max-concurrency", str(opts.streams), "--json", out],
            stdout=log("bench.log"), stderr=subprocess.STDOUT)
        started = time.time()
        extra = []
        adding = True
        while time.time() - started < opts.duration and bench.poll() is None:
            time.sleep(opts.period)
            at = round(time.time() - started, 1)
            if adding or not extra:
                port = start_worker()
                extra.append(port)
                events.append((at, "add", port))
            else:
                port = extra.pop(0)
                proc = next(p for q, p in workers if q == port)
                proc.send_signal(signal.SIGTERM)
                events.append((at, "sigterm", port))
            adding = not adding
        churn_secs = time.time() - started
        bench.wait()
        with open(out) as f:
            doc = json.load(f)
        _, metrics = get(ROUTER, "/metrics")
        ok = counter(metrics, "tandem_router_requests_total", outcome="2xx")
        bad = counter(metrics, "tandem_router_requests_total", outcome="5xx") + counter(
            metrics, "tandem_router_requests_total", outcome="4xx")
        retries = counter(metrics, "tandem_router_retries_total")
        result = dict(streams=opts.streams, period_s=opts.period, churn_s=round(churn_secs, 1),
                      bench_s=round(doc.get("duration", 0), 1), completed=doc.get("completed"),
                      failed=doc.get("failed"), router_2xx=ok, router_errors=bad,
                      router_retries=retries, events=events,
                      request_throughput=doc.get("request_throughput"),
                      p99_ttft_ms=doc.get("p99_ttft_ms"))
        print(json.dumps(result, indent=1))
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(result, f, indent=1)
        if churn_secs < opts.duration:
            print(f"note: the load ended after {churn_secs:.0f} s, before --duration; "
                  "raise --num-prompts", file=sys.stderr)
        return 1 if (doc.get("failed") or bad) else 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(35)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"logs: {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
