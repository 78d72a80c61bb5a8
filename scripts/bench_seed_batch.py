#!/usr/bin/env python3
"""The seed experiment's serving tests against `tandem serve` and llama.cpp's OpenAI
server (llama-cpp-python[server]) on the same model and thread count, one after the
other in the same run, with the ratio printed.

Tests (as in the seed notebooks):
  single: one request, "Explain how HTTP load balancers work in 3 sentences.", 100 tokens;
  batch:  8 concurrent requests of 100 tokens, one per seed prompt.
Both use /v1/completions with the chat template applied by the server (/v1/chat/completions),
temperature 0, ignore_eos so every request produces exactly 100 tokens.

Usage:
  python3 scripts/bench_seed_batch.py --tandem target/release/tandem [--model PATH] [--threads 2] [--repeats 3]
Needs llama-cpp-python with its server extras (fastapi, uvicorn, sse-starlette,
starlette-context, pydantic-settings); no other third-party package.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

SINGLE_PROMPT = "Explain how HTTP load balancers work in 3 sentences."
BATCH_PROMPTS = [
    "What is a REST API?",
    "Explain database indexing.",
    "How does DNS work?",
    "What are microservices?",
    "Describe container orchestration.",
    "What is continuous integration?",
    "Explain message queues.",
    "How does caching improve performance?",
]
MAX_TOKENS = 100
DEFAULT_MODEL = os.path.join(os.environ.get("TANDEM_CACHE_DIR", os.path.expanduser("~/.cache/tandem")),
                             "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    sys.exit(f"server at {url} not ready after {timeout}s")


def chat(url, model, prompt):
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.load(response)
    return time.perf_counter() - started, answer["usage"]["completion_tokens"]


def run_concurrently(url, model, prompts):
    results = [None] * len(prompts)

    def worker(i):
        results[i] = chat(url, model, prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    return wall, tokens, sum(r[0] for r in results) / len(results)


def measure(name, url, model, repeats):
    chat(url, model, "warm up")
    single, single_tokens = min(chat(url, model, SINGLE_PROMPT) for _ in range(repeats))
    best = None
    for _ in range(repeats):
        wall, tokens, mean_latency = run_concurrently(url, model, BATCH_PROMPTS)
        if best is None or wall < best[0]:
            best = (wall, tokens, mean_latency)
    wall, tokens, mean_latency = best
    figures = {
        "server": name,
        "single_latency_s": round(single, 3),
        "single_tokens": single_tokens,
        "single_tok_s": round(single_tokens / single, 1),
        "batch_wall_s": round(wall, 3),
        "batch_tokens": tokens,
        "batch_tok_s": round(tokens / wall, 1),
        "batch_mean_latency_s": round(mean_latency, 3),
    }
    print(json.dumps(figures), flush=True)
    return figures


def start(cmd, env=None):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tandem", required=True, help="path of the tandem binary")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    port = free_port()
    tandem = start([args.tandem, "serve", "--model", args.model, "--port", str(port),
                    "--threads", str(args.threads), "--served-model-name", "smollm2"])
    try:
        wait_ready(f"http://127.0.0.1:{port}", tandem)
        ours = measure("tandem", f"http://127.0.0.1:{port}", "smollm2", args.repeats)
    finally:
        tandem.terminate()
        tandem.wait()

    port = free_port()
    # n_parallel batches concurrent requests in llama.cpp's server when the build
    # supports it; 8 slots share the context.
    llama = start([sys.executable, "-m", "llama_cpp.server", "--model", args.model,
                   "--port", str(port), "--n_threads", str(args.threads),
                   "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
                   "--chat_format", "chatml", "--model_alias", "smollm2"])
    try:
        wait_ready(f"http://127.0.0.1:{port}", llama)
        base = measure("llama.cpp", f"http://127.0.0.1:{port}", "smollm2", args.repeats)
    finally:
        llama.terminate()
        llama.wait()

    print(f"single request: tandem {ours['single_tok_s']} tok/s vs llama.cpp {base['single_tok_s']} "
          f"tok/s = {ours['single_tok_s'] / base['single_tok_s']:.2f}x")
    print(f"batch of 8: tandem {ours['batch_tok_s']} tok/s vs llama.cpp {base['batch_tok_s']} "
          f"tok/s = {ours['batch_tok_s'] / base['batch_tok_s']:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
