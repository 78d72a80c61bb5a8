#!/usr/bin/env python3
"""How closely can anything agree with the llama.cpp fixture? Measures the noise floor
that the engine's reference tests are calibrated against.

For every generation case of shared/fixtures/smollm2-llamacpp-reference.json
(teacher-forced on prompt + greedy continuation), compares the fixture's top-1 token
and top-5 logits with:
  1. an exact float64 forward pass written here in numpy over the GGUF's dequantized
     weights (needs `pip install gguf numpy`), and
  2. llama.cpp itself (llama-cpp-python, see scripts/setup-llamacpp.sh), rebuilt on this
     machine, with flash attention off and on.

Usage: python3 scripts/fixture_noise.py [--model PATH] [--fixture PATH]
"""

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIXTURE = os.path.join(HERE, "..", "crates", "engine", "tests", "fixtures",
                               "smollm2-llamacpp-reference.json")
DEFAULT_MODEL = os.path.join(os.environ.get("TANDEM_CACHE_DIR", os.path.expanduser("~/.cache/tandem")),
                             "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def exact_forward(model_path):
    """Returns f(ids) -> [T, vocab] float64 logits of SmolLM2 (Llama) from the GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(model_path)
    meta = {f.name: f for f in reader.fields.values()}

    def scalar(key):
        field = meta[key]
        return field.parts[field.data[0]][0]

    layers = int(scalar("llama.block_count"))
    heads = int(scalar("llama.attention.head_count"))
    kv_heads = int(scalar("llama.attention.head_count_kv"))
    hidden = int(scalar("llama.embedding_length"))
    head_dim = hidden // heads
    eps = float(scalar("llama.attention.layer_norm_rms_epsilon"))
    theta = float(scalar("llama.rope.freq_base"))
    weights = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float64)
        weights[t.name] = values.reshape([int(x) for x in reversed(t.shape)])

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x, pos):  # adjacent pairs, as llama.cpp rotates GGUF Llama weights
        inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)
        ang = pos[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def forward(ids):
        n = len(ids)
        pos = np.arange(n, dtype=np.float64)
        x = weights["token_embd.weight"][ids]
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for layer in range(layers):
            w = lambda name: weights[f"blk.{layer}.{name}.weight"]
            h = rms(x, w("attn_norm"))
            q = rope((h @ w("attn_q").T).reshape(n, heads, head_dim), pos)
            k = rope((h @ w("attn_k").T).reshape(n, kv_heads, head_dim), pos)
            v = (h @ w("attn_v").T).reshape(n, kv_heads, head_dim)
            attn = np.zeros((n, heads, head_dim))
            for head in range(heads):
                g = head // (heads // kv_heads)
                scores = q[:, head] @ k[:, g].T / np.sqrt(head_dim) + mask
                p = np.exp(scores - scores.max(-1, keepdims=True))
                attn[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, g]
            x = x + attn.reshape(n, hidden) @ w("attn_output").T
            h = rms(x, w("ffn_norm"))
            gate, up = h @ w("ffn_gate").T, h @ w("ffn_up").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w("ffn_down").T
        head_w = weights.get("output.weight", weights["token_embd.weight"])
        return rms(x, weights["output_norm.weight"]) @ head_w.T

    return forward


def llamacpp_forward(model_path, flash_attn):
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_ctx=1024, n_threads=2, n_batch=512, logits_all=True,
                verbose=False, flash_attn=flash_attn)

    def forward(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    return forward


def compare(name, forward, cases):
    agree = total = 0
    diffs = []
    for case in cases:
        ids = case["prompt_ids"] + case["greedy_ids"]
        logits = forward(ids)
        for i, top5 in enumerate(case["top5_logits_per_position"]):
            diffs += [abs(logits[i][tok] - value) for tok, value in top5]
            agree += int(np.argmax(logits[i]) == top5[0][0])
            total += 1
    print(f"{name:40s} top-1 agreement {agree}/{total} = {agree / total:.4f}   "
          f"mean |logit diff| on llama.cpp's top-5 {np.mean(diffs):.3f} (max {np.max(diffs):.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--fixture", default=DEFAULT_FIXTURE)
    args = parser.parse_args()
    cases = json.load(open(args.fixture))["generation"]
    compare("exact float64 forward (numpy)", exact_forward(args.model), cases)
    try:
        compare("llama.cpp rebuilt here, flash_attn off", llamacpp_forward(args.model, False), cases)
        compare("llama.cpp rebuilt here, flash_attn on", llamacpp_forward(args.model, True), cases)
    except ImportError:
        print("llama-cpp-python not installed: run scripts/setup-llamacpp.sh")


if __name__ == "__main__":
    main()
