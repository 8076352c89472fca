"""tests/sglang run with the SGLang venv (.venv-sglang, scripts/setup_sglang.sh), which scripts/test.sh
uses for them explicitly. Under another Python (the project's vLLM venv runs tests/) SGLang is not
importable: the directory is not collected, and the run's summary says so."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    """The process groups SGLang's layers need even at one rank (as SGLang's layer tests set them up),
    for a module that builds real SGLang layers in the test process."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0))
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    parallel_state.initialize_model_parallel(backend="gloo")
    yield
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()
    reset_context()


@pytest.fixture
def gpu_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's GPU branches on this CPU, an SM 9.0 (sglang_support.answer_gpu), for layers built in
    the test process."""
    from sglang_support import answer_gpu

    answer_gpu(monkeypatch)
