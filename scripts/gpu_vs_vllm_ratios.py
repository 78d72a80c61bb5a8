#!/usr/bin/env python3
"""tandem serve against vLLM from one run of scripts/gpu-bench-vllm-vs-builtin.sh: reads
the `vllm bench serve` results it saved (OUT_DIR/{tandem,vllm}-c<N>.json) and prints
tandem / vLLM per concurrency, then issue 21's serving targets where their
concurrencies were run (1 user: output tok/s >= 1.0x; 64 users: >= 0.9x and TPOT p99
<= 1.2x).

    scripts/gpu_vs_vllm_ratios.py OUT_DIR CONCURRENCY...
"""
import json
import os
import sys


def load(out, engine, c):
    path = os.path.join(out, f"{engine}-c{c}.json")
    if not os.path.exists(path):
        return None
    return json.load(open(path))


def verdict(ok):
    return "met" if ok else "MISSED"


def main():
    out, concurrencies = sys.argv[1], sys.argv[2:]
    ratios = {}
    print("tandem / vLLM (same client, same card):")
    for c in concurrencies:
        t, v = load(out, "tandem", c), load(out, "vllm", c)
        missing = [name for name, r in (("tandem", t), ("vLLM", v)) if r is None]
        if missing:
            print(f"  c={c:>3}: no result for {' and '.join(missing)}")
            continue
        r = {k: t[k] / v[k] for k in ("output_throughput", "median_tpot_ms",
                                      "p99_tpot_ms", "median_ttft_ms")}
        ratios[int(c)] = r
        print(f"  c={c:>3}: output tok/s {t['output_throughput']:.1f} / "
              f"{v['output_throughput']:.1f} = {r['output_throughput']:.2f}x   "
              f"TPOT p50 {r['median_tpot_ms']:.2f}x  p99 {r['p99_tpot_ms']:.2f}x   "
              f"TTFT p50 {r['median_ttft_ms']:.2f}x")
    if 1 in ratios:
        ok = ratios[1]["output_throughput"] >= 1.0
        print(f"issue 21, 1 user: output tok/s >= 1.0x vLLM: {verdict(ok)}")
    if 64 in ratios:
        r = ratios[64]
        ok = r["output_throughput"] >= 0.9 and r["p99_tpot_ms"] <= 1.2
        print(f"issue 21, 64 users: output tok/s >= 0.9x and TPOT p99 <= 1.2x vLLM: {verdict(ok)}")


if __name__ == "__main__":
    main()
