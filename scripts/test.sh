#!/usr/bin/env bash
# The test command of README.md and .ci/run: set up .venv, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/python -m pytest tests -q "$@"
