#!/usr/bin/env bash
# The test command of README.md and .ci/run: set up .venv, then run every test.
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
exec ./.venv/bin/python -m pytest tests -q "$@"
