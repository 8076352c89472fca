#!/usr/bin/env bash
# The test command of README.md and .ci/run: set up .venv, then run every test; then set up
# .venv-sglang (SGLang's CPU engine, scripts/setup_sglang.sh) and run tests/sglang with it (the
# vLLM venv cannot import SGLang, so the first run does not collect tests/sglang and says so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM pins compressed-tensors 0.17.0; the shim and layouts must also hold for the newest release.
./.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .venv/ct-newest "compressed-tensors==0.20.0" 2> >(grep -v "is ignored: it is neither" >&2)
echo "== core tests against compressed-tensors 0.20.0"
PYTHONPATH=.venv/ct-newest ./.venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_exactness.py tests/test_planner.py tests/test_modelopt.py tests/test_checkpoint.py \
  tests/test_stream.py tests/test_shards.py tests/recipes tests/ops/test_pack.py
echo "== all tests (compressed-tensors as pinned by vLLM)"
./.venv/bin/python -m pytest tests -q "$@"
echo "== SGLang: set up .venv-sglang"
start=$SECONDS
bash scripts/setup_sglang.sh
echo "SGLang set-up took $((SECONDS - start)) s"
echo "== tests/sglang (SGLang 0.5.23 CPU engine)"
exec ./.venv-sglang/bin/python -m pytest tests/sglang -q "$@"
