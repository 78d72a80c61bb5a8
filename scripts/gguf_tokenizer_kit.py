#!/usr/bin/env python3
"""The tokenizer of a GGUF model (the default model's, for `tandem serve --load-format
dummy`), in two small forms for a GPU machine where the 98 MB model does not travel:

- OUT/tokenizer-only.gguf: the GGUF's metadata (tokenizer, chat template) and no
  tensors. `--load-format dummy` reads only the tokenizer from the default model's
  path, so this file stands in for the model there (TANDEM_CACHE_DIR/models/…).
- OUT/hf/: the same byte-level BPE as a Hugging Face tokenizer folder, for clients that
  count tokens, e.g. `vllm bench serve --tokenizer OUT/hf`, so that its random
  prompts are the asked-for length in the server's own tokens.

    python3 scripts/gguf_tokenizer_kit.py ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf OUT
"""
import json
import os
import struct
import sys

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt):
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self):
        n = self.take("<Q")
        text = self.data[self.at:self.at + n].decode("utf-8", errors="surrogateescape")
        self.at += n
        return text

    def value(self, kind):
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("<I"), self.take("<Q")
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path):
    """The header's metadata as a dict, and the bytes of the header up to the end of
    the key/value section (magic, version, counts, key/values)."""
    with open(path, "rb") as f:
        head = f.read(64 << 20)  # the metadata of a small model fits easily
    r = Reader(head)
    if head[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    r.at = 4
    version = r.take("<I")
    r.take("<Q")  # tensors
    kv_count = r.take("<Q")
    kv_start = r.at
    meta = {}
    for _ in range(kv_count):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    return version, kv_count, head[kv_start:r.at], meta


def write_tokenizer_only(path, version, kv_count, kv_bytes):
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", version, 0, kv_count) + kv_bytes)


def write_hf(folder, meta):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only byte-level BPE (tokenizer.ggml.model = gpt2) is converted")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, types) if kind == 3]  # control tokens
    tok.add_special_tokens(special)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    name = lambda key: tokens[meta[key]] if key in meta else None
    json.dump({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }, open(os.path.join(folder, "tokenizer_config.json"), "w"), indent=1)
    json.dump({"model_type": "llama", "vocab_size": len(tokens)},
              open(os.path.join(folder, "config.json"), "w"), indent=1)
    return len(tokens), len(merges), len(special)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    source, out = sys.argv[1], sys.argv[2]
    version, kv_count, kv_bytes, meta = read_metadata(source)
    os.makedirs(out, exist_ok=True)
    write_tokenizer_only(os.path.join(out, "tokenizer-only.gguf"), version, kv_count, kv_bytes)
    vocab, merges, special = write_hf(os.path.join(out, "hf"), meta)
    print(f"{out}/tokenizer-only.gguf ({len(kv_bytes) + 24} bytes) and {out}/hf "
          f"({vocab} tokens, {merges} merges, {special} special)")


if __name__ == "__main__":
    main()
