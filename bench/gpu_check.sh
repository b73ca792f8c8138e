#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md): a bf16 training run of the SmolLM2 pair with flash/sdpa attention, gradient
# checkpointing, packing and on-policy sampling, then the activation-memory sweep (512-4096 tokens, with and
# without checkpointing). About 3-4 minutes on one H100/H200; needs torch with CUDA, transformers, accelerate, peft,
# PyYAML. Random weights of the real shapes unless --gguf FILE is given (same timings and memory).
#   bash bench/gpu_check.sh            # on a GPU machine
#   bash bench/gpu_check.sh --smoke    # a tiny pair on the CPU, in seconds (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python bench/gpu_check.py "$@"
if [[ " $* " == *" --smoke "* ]]; then
  python bench/activation_memory.py --smoke --lengths 64 --steps 1
else
  python bench/activation_memory.py --bf16 --lengths 512 1024 2048 4096 --steps 3
fi
