#!/usr/bin/env bash
# README's first command: set up .venv, show the plan for a bundled tiny ModelOpt export (INT4 AWQ,
# which stock vLLM refuses), stream it as compressed-tensors and check one layer against the ModelOpt
# formula, then serve it with vLLM with no quantization argument.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ckpt=tests/fixtures/modelopt/${1:-int4_awq}
./.venv/bin/lazyxform inspect "$ckpt"
./.venv/bin/python scripts/demo_stream.py "$ckpt"
exec ./.venv/bin/python scripts/demo_vllm.py "$ckpt"
