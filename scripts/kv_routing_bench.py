#!/usr/bin/env python3
"""Issue 16's side-by-side: routing policies on four one-thread CPU workers, in one run.

For each scenario, and for each policy in turn (round_robin, prefix, kv_aware), starts
four `tandem serve --threads 1` workers publishing KV events and `tandem route` in
front (following those events), runs `tandem bench` through the router, and reads
from the workers' own /metrics how many prompt tokens their prefix caches served.
Then the **oracle**: the same requests on one worker with a cache big enough for all
of them, which finds every prefix any earlier request left behind: no placement of the
requests on four workers can find more, so its hit rate is the ceiling that
"kv_aware reaches >= 90% of the oracle" is measured against.

Scenarios:
  multi-turn      conversations whose every turn resends the transcript so far
  shared-prefix   prompts behind one of 8 system prompts, taken in turn
  evict           multi-turn with small KV caches, so workers evict what they held
  restart         multi-turn, one worker killed and restarted a third of the way in
  two-routers     multi-turn through two routers over the same workers (a round-robin
                  front router alternates them), so each router sees half the turns

    python3 scripts/kv_routing_bench.py [--tandem target/release/tandem]
        [--scenarios multi-turn,shared-prefix,evict,restart,two-routers]
        [--policies round_robin,prefix,kv_aware,kv_aware@2] [--json results.json]

A policy written `kv_aware@W` runs kv_aware with `--kv-aware-overlap-weight W`.

Prints one table per scenario: hit rate (hits / queried prompt tokens, summed over
the workers), its ratio to the oracle's, TTFT p50/p99, request throughput. Needs the
default model (`tandem model fetch`). Ports 18900-18999 on loopback.
"""
import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

WORKERS = 4
BASE = 18900


def worker_port(i):
    return BASE + 10 + i


def events_port(i):
    return BASE + 30 + i


def replay_port(i):
    return BASE + 50 + i


ROUTER_PORT = BASE + 1
ORACLE_PORT = BASE + 2

SCENARIOS = {
    "multi-turn": dict(
        bench=["--endpoint", "chat", "--workload", "multi-turn", "--num-prompts", "16",
               "--turns", "4", "--prefix-len", "32", "--input-len", "160",
               "--output-len", "16", "--max-concurrency", "4"],
        cache="256MiB"),
    "shared-prefix": dict(
        bench=["--endpoint", "completions", "--workload", "shared-prefix",
               "--num-prompts", "64", "--prefix-groups", "8", "--prefix-len", "400",
               "--input-len", "24", "--output-len", "16", "--max-concurrency", "4"],
        cache="256MiB"),
    "evict": dict(
        bench=["--endpoint", "chat", "--workload", "multi-turn", "--num-prompts", "16",
               "--turns", "4", "--prefix-len", "32", "--input-len", "160",
               "--output-len", "16", "--max-concurrency", "4"],
        cache="28MiB"),
    "restart": dict(
        bench=["--endpoint", "chat", "--workload", "multi-turn", "--num-prompts", "16",
               "--turns", "4", "--prefix-len", "32", "--input-len", "160",
               "--output-len", "16", "--max-concurrency", "4"],
        cache="256MiB", restart=True),
    "two-routers": dict(
        bench=["--endpoint", "chat", "--workload", "multi-turn", "--num-prompts", "16",
               "--turns", "4", "--prefix-len", "32", "--input-len", "160",
               "--output-len", "16", "--max-concurrency", "4"],
        cache="256MiB", routers=2),
}


def get(port, path, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read().decode()


def wait_healthy(port, what, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            if get(port, "/health", 2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} on :{port} not healthy after {seconds}s")


def prefix_counters(port):
    """(queried, hit) prompt tokens of a worker's prefix cache."""
    _, text = get(port, "/metrics")
    values = {}
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        values[name] = float(m.group(1)) if m else 0.0
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


class Cluster:
    def __init__(self, tandem, cache, logdir):
        self.tandem, self.cache, self.logdir = tandem, cache, logdir
        self.workers = [None] * WORKERS
        self.routers = []
        # Counters of worker processes that were stopped (a restart resets them).
        self.retired = [0.0, 0.0]

    def serve_args(self, i, threads=1, port=None, cache=None, events=True):
        args = [self.tandem, "serve", "--port", str(port or worker_port(i)),
                "--threads", str(threads), "--kv-cache-memory", cache or self.cache,
                "--max-model-len", "1024"]
        if events:
            config = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://*:{events_port(i)}",
                      "replay_endpoint": f"tcp://*:{replay_port(i)}", "topic": "kv"}
            args += ["--kv-events-config", json.dumps(config)]
        return args

    def start_worker(self, i):
        log = open(os.path.join(self.logdir, f"worker{i}.log"), "ab")
        self.workers[i] = subprocess.Popen(self.serve_args(i), stdout=log, stderr=log)
        wait_healthy(worker_port(i), f"worker {i}", self.workers[i])

    def stop_worker(self, i):
        q, h = prefix_counters(worker_port(i))
        self.retired[0] += q
        self.retired[1] += h
        self.workers[i].send_signal(signal.SIGKILL)
        self.workers[i].wait()

    def start(self, policy, routers=1):
        for i in range(WORKERS):
            self.start_worker(i)
        if routers == 1:
            self.routers = [self.start_router(policy, ROUTER_PORT)]
            return
        # Several routers over the same workers, each with its own view, and a
        # round-robin front router spreading the clients' requests over them.
        ports = [BASE + 3 + r for r in range(routers)]
        self.routers = [self.start_router(policy, port) for port in ports]
        args = [self.tandem, "route", "--port", str(ROUTER_PORT), "--policy", "round_robin",
                "--health-interval-ms", "500"]
        for port in ports:
            args += ["--worker", f"http://127.0.0.1:{port}"]
        log = open(os.path.join(self.logdir, f"front-{policy}.log"), "ab")
        self.routers.append(subprocess.Popen(args, stdout=log, stderr=log))
        wait_healthy(ROUTER_PORT, "front router", self.routers[-1])

    def start_router(self, policy, port):
        # "kv_aware@2": kv_aware with --kv-aware-overlap-weight 2.
        name, _, weight = policy.partition("@")
        args = [self.tandem, "route", "--port", str(port), "--policy", name,
                "--kv-events-topic", "kv", "--health-interval-ms", "500"]
        if weight:
            args += ["--kv-aware-overlap-weight", weight]
        for i in range(WORKERS):
            url = f"http://127.0.0.1:{worker_port(i)}"
            args += ["--worker", url,
                     "--kv-events", f"{url}=tcp://127.0.0.1:{events_port(i)}",
                     "--kv-replay", f"{url}=tcp://127.0.0.1:{replay_port(i)}"]
        log = open(os.path.join(self.logdir, f"router-{policy}-{port}.log"), "ab")
        router = subprocess.Popen(args, stdout=log, stderr=log)
        wait_healthy(port, "router", router)
        return router

    def hit_rate(self):
        queried, hit = self.retired
        for i in range(WORKERS):
            q, h = prefix_counters(worker_port(i))
            queried += q
            hit += h
        return hit / queried if queried else 0.0

    def stop(self):
        for proc in self.routers + self.workers:
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.routers + self.workers:
            if proc:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def bench(tandem, port, args, out, restart_hook=None):
    cmd = [tandem, "bench", "--url", f"http://127.0.0.1:{port}", "--json", out] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if restart_hook:
        restart_hook(proc)
    if proc.wait() != 0:
        sys.exit(f"tandem bench failed: {' '.join(cmd)}")
    with open(out) as f:
        return json.load(f)


def pick(doc, *names):
    for name in names:
        if name in doc:
            return doc[name]
    return float("nan")


def run_policy(tandem, name, scenario, policy, logdir):
    cluster = Cluster(tandem, scenario["cache"], logdir)
    try:
        cluster.start(policy, scenario.get("routers", 1))
        hook = None
        if scenario.get("restart"):
            def hook(proc, cluster=cluster):
                # A third of the way in (by wall clock of a previous run, roughly):
                # after the first turns have filled the caches.
                time.sleep(scenario.get("restart_after", 20))
                if proc.poll() is None:
                    cluster.stop_worker(1)
                    cluster.start_worker(1)
        out = os.path.join(logdir, f"{name}-{policy}.json")
        doc = bench(tandem, ROUTER_PORT, scenario["bench"], out, hook)
        return dict(hit_rate=cluster.hit_rate(),
                    ttft_p50=pick(doc, "median_ttft_ms", "p50_ttft_ms"),
                    ttft_p99=pick(doc, "p99_ttft_ms"),
                    throughput=doc.get("request_throughput", float("nan")),
                    completed=doc.get("completed"), failed=doc.get("failed"))
    finally:
        cluster.stop()


def run_oracle(tandem, name, scenario, logdir):
    cluster = Cluster(tandem, "1GiB", logdir)
    log = open(os.path.join(logdir, f"oracle-{name}.log"), "ab")
    proc = subprocess.Popen(cluster.serve_args(0, threads=2, port=ORACLE_PORT, cache="1GiB",
                                               events=False), stdout=log, stderr=log)
    try:
        wait_healthy(ORACLE_PORT, "oracle worker", proc)
        bench(tandem, ORACLE_PORT, scenario["bench"], os.path.join(logdir, f"{name}-oracle.json"))
        q, h = prefix_counters(ORACLE_PORT)
        return h / q if q else 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tandem", default="target/release/tandem")
    parser.add_argument("--scenarios",
                        default="multi-turn,shared-prefix,evict,restart,two-routers")
    parser.add_argument("--policies", default="round_robin,prefix,kv_aware")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--logs", help="keep worker and router logs here")
    opts = parser.parse_args()
    logdir = opts.logs or tempfile.mkdtemp(prefix="kv-routing-")
    os.makedirs(logdir, exist_ok=True)
    results = {}
    for name in opts.scenarios.split(","):
        scenario = SCENARIOS[name]
        oracle = run_oracle(opts.tandem, name, scenario, logdir)
        rows = {}
        for policy in opts.policies.split(","):
            rows[policy] = run_policy(opts.tandem, name, scenario, policy, logdir)
        results[name] = dict(oracle_hit_rate=oracle, policies=rows)
        print(f"\n{name} (oracle hit rate {oracle:.1%}; tandem bench {' '.join(scenario['bench'])})")
        print("| policy | hit rate | of oracle | TTFT p50 ms | TTFT p99 ms | req/s | failed |")
        print("|---|---|---|---|---|---|---|")
        for policy, r in rows.items():
            share = r["hit_rate"] / oracle if oracle else float("nan")
            print(f"| {policy} | {r['hit_rate']:.1%} | {share:.0%} | {r['ttft_p50']:.0f} | "
                  f"{r['ttft_p99']:.0f} | {r['throughput']:.2f} | {r['failed']} |")
        sys.stdout.flush()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\nlogs and bench JSON: {logdir}")


if __name__ == "__main__":
    main()
