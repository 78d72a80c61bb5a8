#!/usr/bin/env bash
# On a GPU machine: `tandem serve --device cuda` at Llama-3.1-8B shapes (random weights),
# in bf16 and then with --quantization fp8, each alone on the GPU, each measured with
# `tandem bench` (random 512 -> 128 tokens, --ignore-eos, 4 prompts a user, at least 16)
# at the same concurrencies with the same seeds, tokens picked on the GPU; each server's
# exit status after SIGTERM is printed.
#
#   scripts/gpu-bench-fp8.sh TANDEM TOKENIZER_KIT OUT_DIR [CONCURRENCY…]
#
# The runs are scripts/gpu-bench-sampling.sh's with MODES="device:none device:fp8"
# (TOKENIZER_KIT and the environment variables as documented there).
set -euo pipefail
MODES=${MODES:-device:none device:fp8} exec "$(dirname "${BASH_SOURCE[0]}")/gpu-bench-sampling.sh" "$@"
