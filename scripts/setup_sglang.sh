#!/usr/bin/env bash
# Create .venv-sglang: SGLang 0.5.23's CPU engine, lazyxform (editable, with its SGLang plugin) and
# the test tools, on a machine without CUDA. SGLang's wheel pins CUDA packages (torch 2.14.1,
# sglang-kernel, flashinfer, ...), so it is installed without dependencies, beside torch 2.13.0+cpu
# and the dependencies its CPU engine imports, pinned where SGLang pins them. Two stand-ins make it
# import without CUDA (scripts/sglang_cpu/): a `sgl_kernel` whose kernels raise if ever called, and
# the torchvision::nms / ::qnms schemas that PyPI's torchvision (built for CUDA torch) needs.
# SGLANG_VENV names another directory (to time a fresh set-up). docs/sglang.md, "On a CPU".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SGLANG_VENV:-.venv-sglang}"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
# pip's resolver lists every CUDA requirement of sglang's metadata after each install: that conflict is
# the point of the --no-deps install, so those lines are dropped; anything else pip says is kept.
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v -e "is ignored: it is neither" -e "^sglang 0.5.23 requires " -e "pip's dependency resolver does not" >&2)
}
pip_install "torch==2.13.0+cpu" 2>/dev/null || pip_install "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
pip_install --no-deps "sglang==0.5.23"
pip_install "transformers==5.19.0" "tokenizers==0.23.2" "compressed-tensors==0.18.0" "xgrammar==0.2.7" \
  "torchvision==0.28.0" "openai==2.8.0" "sentencepiece==0.2.1" dill aiohttp fastapi uvicorn uvloop orjson msgspec \
  pyzmq psutil setproctitle pybase64 python-multipart requests numpy scipy pillow einops packaging pydantic tqdm \
  prometheus-client partial_json_parser interegular xxhash zstandard regex distro IPython gguf safetensors \
  huggingface_hub
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp -r scripts/sglang_cpu/sgl_kernel scripts/sglang_cpu/torchvision_nms_schema.py "$SITE/"
echo "import torchvision_nms_schema" > "$SITE/lazyxform_sglang_cpu.pth"
# --no-deps: the extra's one requirement, sglang, is the CPU install above (its own pins are CUDA's).
pip_install --no-deps -e ".[sglang]"
pip_install "pytest>=8" "hypothesis>=6.100"
SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "import lazyxform_sglang, sglang.srt.entrypoints.engine; print('SGLang', sglang.__version__, 'on CPU: ready')" 2>&1 | tail -1
