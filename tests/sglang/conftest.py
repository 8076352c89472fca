"""tests/sglang run with the SGLang venv (.venv-sglang, scripts/setup_sglang.sh), which scripts/test.sh
uses for them explicitly. Under another Python (the project's vLLM venv runs tests/) SGLang is not
importable: the directory is not collected, and the run's summary says so."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# With tests/ on sys.path this very directory is a namespace package named sglang: only a real
# package (one with an origin) counts.
_spec = importlib.util.find_spec("sglang")
SGLANG = _spec is not None and _spec.origin is not None

if SGLANG:
    # SGLang's CPU engine, chosen before SGLang reads it; sglang_support and the shared references.
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    sys.path[:0] = [str(HERE), str(HERE.parent / "vllm")]
else:
    collect_ignore_glob = ["*"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SGLANG:
        terminalreporter.write_line(
            "tests/sglang not collected: SGLang is not importable by this Python; scripts/test.sh runs them with .venv-sglang"
        )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint(name): a servable copy of a bundled fixture (with the tiny tokenizer), made once per session."""
    from helpers import servable_copies

    return servable_copies(tmp_path_factory.mktemp("fixtures"))
