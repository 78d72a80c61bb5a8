#!/usr/bin/env python3
"""Measure llama.cpp (through llama-cpp-python 0.3.36) on a GGUF model: the baseline
the engine benchmark compares against.

Prefill: a fixed, deterministic prompt of exactly --prompt-tokens tokens, evaluated from
an empty KV cache with n_batch=512; best of --repeats timed runs after one warm-up.
Decode: greedy single-stream generation of exactly --decode-tokens tokens after a short
prompt (end-of-sequence is ignored); every step is one single-token forward pass, timed;
best of --repeats runs after one warm-up.

Prints one JSON line on stdout:
  {"engine":"llama.cpp","prefill_tokens":512,"prefill_tok_s":...,"decode_tokens":128,
   "decode_tok_s":...,"threads":2,"peak_rss_mb":...}
Details of each run go to stderr with --verbose.

Install llama-cpp-python with scripts/setup-llamacpp.sh (it prints the python to use).
"""

import argparse
import json
import resource
import sys
import time

N_BATCH = 512
DECODE_PROMPT_TOKENS = 16
# Varied English text, so the prompt exercises ordinary merges of the tokenizer.
PROMPT_TEXT = (
    "The history of computing is a story of abstraction layered upon abstraction. "
    "Early machines were programmed by rewiring panels; later, stored programs let "
    "the same hardware run many tasks. Compilers translated readable code into "
    "instructions, operating systems shared one processor among many users, and "
    "networks connected machines across continents. Today a single request to a "
    "language model may pass through a load balancer, a scheduler, a cache of "
    "attention keys and values, and thousands of matrix multiplications before a "
    "single word comes back. "
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="path of the GGUF model")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each phase (default 3)")
    parser.add_argument("--verbose", action="store_true", help="print each run's timing to stderr")
    args = parser.parse_args(argv)
    for name in ("threads", "prompt_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_model(path, threads, n_ctx):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit(
            "llama_cpp is not importable: run scripts/setup-llamacpp.sh and use the python it prints"
        )
    return Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=N_BATCH,
        n_ubatch=N_BATCH,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )


def context_size(prompt_tokens, decode_tokens):
    """A context that holds either phase, rounded up to a multiple of 256."""
    needed = max(prompt_tokens, DECODE_PROMPT_TOKENS + decode_tokens) + 8
    return (needed + 255) // 256 * 256


def deterministic_prompt(llm, n_tokens):
    """Exactly n_tokens token ids: BOS (if the model has one), then PROMPT_TEXT's tokens
    repeated as needed and cut to length."""
    text_ids = llm.tokenize(PROMPT_TEXT.encode("utf-8"), add_bos=False, special=False)
    bos = llm.token_bos()
    ids = [bos] if bos is not None and bos >= 0 else []
    while len(ids) < n_tokens:
        ids.extend(text_ids)
    return ids[:n_tokens]


def time_prefill(llm, prompt):
    """Seconds to evaluate prompt from an empty KV cache."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - started


def greedy_next(llm):
    """The most likely next token after everything evaluated so far. Read from the
    context's last logits: without logits_all, Llama.eval does not fill Llama.scores."""
    import llama_cpp
    import numpy as np

    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


def time_decode(llm, prompt, n_tokens):
    """Per-step seconds of n_tokens greedy single-token steps after prompt."""
    llm.reset()
    llm.eval(prompt)
    step_seconds = []
    for _ in range(n_tokens):
        started = time.perf_counter()
        llm.eval([greedy_next(llm)])
        step_seconds.append(time.perf_counter() - started)
    return step_seconds


def peak_rss_mb():
    # VmHWM belongs to this process's own address space; ru_maxrss would also count a
    # parent's memory inherited at fork (the Rust benchmark starts this script).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(verbose, message):
    if verbose:
        print(message, file=sys.stderr)


def measure_prefill(llm, args):
    prompt = deterministic_prompt(llm, args.prompt_tokens)
    time_prefill(llm, prompt)  # warm-up
    runs = [time_prefill(llm, prompt) for _ in range(args.repeats)]
    for seconds in runs:
        log(args.verbose, f"prefill {len(prompt)} tokens: {seconds * 1000:.1f} ms, {len(prompt) / seconds:.1f} tok/s")
    return len(prompt) / min(runs)


def measure_decode(llm, args):
    prompt = deterministic_prompt(llm, DECODE_PROMPT_TOKENS)
    time_decode(llm, prompt, min(args.decode_tokens, 16))  # warm-up
    best = 0.0
    for _ in range(args.repeats):
        steps = time_decode(llm, prompt, args.decode_tokens)
        rate = len(steps) / sum(steps)
        ordered = sorted(steps)
        log(
            args.verbose,
            f"decode {len(steps)} tokens: {rate:.1f} tok/s, per token median "
            f"{ordered[len(ordered) // 2] * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms",
        )
        best = max(best, rate)
    return best


def main(argv):
    args = parse_args(argv)
    llm = load_model(args.model, args.threads, context_size(args.prompt_tokens, args.decode_tokens))
    prefill_tok_s = measure_prefill(llm, args)
    decode_tok_s = measure_decode(llm, args)
    result = {
        "engine": "llama.cpp",
        "prefill_tokens": args.prompt_tokens,
        "prefill_tok_s": round(prefill_tok_s, 1),
        "decode_tokens": args.decode_tokens,
        "decode_tok_s": round(decode_tok_s, 1),
        "threads": args.threads,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main(sys.argv[1:])
