#!/usr/bin/env bash
# README's first command: set up .venv, show the plan for a bundled tiny ModelOpt INT8 SmoothQuant
# export, then stream it as compressed-tensors and check one layer against the ModelOpt formula.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ckpt=tests/fixtures/modelopt/${1:-int8_sq}
./.venv/bin/lazyxform inspect "$ckpt"
exec ./.venv/bin/python scripts/demo_stream.py "$ckpt"
