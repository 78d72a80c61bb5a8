#!/usr/bin/env python3
"""A/B of the two legs of a P/D hand-off between two tandem binaries, alternated.

For each binary in turn (twice): a prefill worker (--kv-port 0) and a decode worker on
this machine, 2 threads each, then 8 fresh 512-token prompts (random token ids, so no
prefix cache helps), each run as a proxy runs it: the prefill leg (do_remote_decode),
then the streamed decode leg with the prefill answer's kv_transfer_params. Prints the
median prefill-leg time and the median and least decode-leg time to its first chunk.

    python3 scripts/handoff_ab.py NEW_TANDEM OLD_TANDEM

Needs the default model (tandem model fetch); both binaries get the same KV secret
(TANDEM_KV_SECRET; builds before protocol v2 ignore it).
"""
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import time


def start(binary, port, extra):
    env = dict(os.environ, TANDEM_KV_SECRET="ab-test-secret-0123456789abcdef")
    return subprocess.Popen([binary, "serve", "--port", str(port), "--threads", "2", "--kv-cache-memory", "512MiB", "--max-model-len", "4096"] + extra, env=env, stderr=subprocess.DEVNULL)
def wait(port):
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2); c.request("GET", "/health")
            if c.getresponse().status == 200: return
        except Exception: pass
        time.sleep(0.2)
def post(port, body, stream=False):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if stream:
        r.read1(1); t = time.perf_counter(); r.read(); return t
    return json.loads(r.read())
def run(binary, trials, seed):
    p = start(binary, 18801, ["--kv-port", "0"]); d = start(binary, 18802, [])
    wait(18801); wait(18802)
    rng = random.Random(seed); out = []
    for i in range(trials + 1):
        ids = [1000 + rng.randrange(20000) for _ in range(512)]
        t0 = time.perf_counter()
        params = post(18801, {"prompt": ids, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})["kv_transfer_params"]
        t1 = time.perf_counter()
        t2 = post(18802, {"prompt": ids, "max_tokens": 4, "stream": True, "kv_transfer_params": params}, stream=True)
        if i: out.append(((t1 - t0) * 1000, (t2 - t1) * 1000))
    p.kill(); d.kill(); p.wait(); d.wait()
    return out
for r in range(2):
    for name, b in [("new", sys.argv[1]), ("old", sys.argv[2])]:
        res = run(b, 8, r)
        print(name, "P leg median %.1f ms" % statistics.median(x[0] for x in res), "| D leg to first chunk median %.1f ms, min %.1f" % (statistics.median(x[1] for x in res), min(x[1] for x in res)), flush=True)
