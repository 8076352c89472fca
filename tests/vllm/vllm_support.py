"""Helpers for the vLLM tests: fixture copies vLLM can serve, in-process engines, logprobs."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from modelopt_reference import Reference
from vllm import LLM, SamplingParams

ROUTE_ENV = "LAZYXFORM_VLLM_ROUTE"  # what lazyxform_vllm reads; spelled out so a rename breaks the tests
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "lazyxform rewrites ModelOpt weights at load time!",
    "0123456789 abc XYZ",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
]
VOCAB = 1024  # every bundled fixture's vocab_size


def drop_flat_quantization_config(ckpt: Path) -> None:
    """Turn an export into the legacy layout (ModelOpt <= 0.29): hf_quant_config.json only."""
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]
    path.write_text(json.dumps(config, indent=2))


@contextmanager
def route(value: str) -> Iterator[None]:
    """LAZYXFORM_VLLM_ROUTE while vLLM parses the config (the plugin reads it only then)."""
    before = os.environ.get(ROUTE_ENV)
    os.environ[ROUTE_ENV] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[ROUTE_ENV]
        else:
            os.environ[ROUTE_ENV] = before


LLM_DEFAULTS = {"enforce_eager": True, "max_model_len": 128, "max_logprobs": -1, "dtype": "bfloat16", "seed": 0}
WORKER = Path(__file__).parent / "engine_worker.py"
WORKER_TIMEOUT_S = 600


@contextmanager
def engine(model: Path, route_value: str = "auto", **kwargs) -> Iterator[LLM]:
    """A small in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0 is set by conftest). An engine
    that fails to start leaves no process group behind for the next one."""
    with route(route_value):
        try:
            llm = LLM(model=str(model), **{**LLM_DEFAULTS, **kwargs})
        except BaseException:
            release_parallel_state()
            raise
    try:
        yield llm
    finally:
        # Now, not when the last reference dies: that could be after the next engine started, and
        # the shutdown tears down process groups the two share.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        release_parallel_state()


def release_parallel_state() -> None:
    """vLLM's process groups of this process (an in-process engine makes them; a failed start
    leaves them half made, and the next engine then fails on them)."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


def run_engine(model: Path, workdir: Path, isa: str = "native", env: dict[str, str] | None = None, **llm) -> dict:
    """An engine in its own process (engine_worker.py): its result dict. A failing engine fails this
    call with its output, and cannot touch the engines after it."""
    request = workdir / "request.json"
    result = workdir / "result.pt"
    request.write_text(json.dumps({"model": str(model), "isa": isa, "env": env or {}, "llm": llm}))
    child_env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(request), str(result)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise EngineFailed(f"{model.name} ({isa}): the engine exited with {done.returncode}:\n{done.stderr[-6000:]}")
    out = torch.load(result, weights_only=False)
    out["log"] = done.stdout + done.stderr
    return out


class EngineFailed(AssertionError):
    pass


def quantization(llm: LLM) -> str | None:
    return llm.llm_engine.vllm_config.model_config.quantization


def prompt_logprobs(llm: LLM) -> tuple[list[list[int]], torch.Tensor]:
    """The prompts' token ids, and the full-vocabulary log-probabilities vLLM assigns to each next
    prompt token: rows of all prompts stacked, [sum(len - 1), VOCAB]."""
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=-1, temperature=0), use_tqdm=False)
    rows = [[position[t].logprob for t in range(VOCAB)] for o in outs for position in o.prompt_logprobs[1:]]
    return [o.prompt_token_ids for o in outs], torch.tensor(rows)


def reference_logprobs(ckpt: Path, ids: list[list[int]], **options) -> torch.Tensor:
    """modelopt_reference's log-probabilities for the prompts, rows as prompt_logprobs' rows."""
    ref = Reference(ckpt, **options)
    return torch.cat([ref.logprobs(prompt)[:-1] for prompt in ids])


def deviation_from_reference(ckpt: Path, ids: list[list[int]], got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|got - reference| and the reference's own bf16 noise |reference in bf16 - reference|, per
    position and vocabulary entry."""
    want = reference_logprobs(ckpt, ids)
    return (got - want).abs(), (reference_logprobs(ckpt, ids, dtype=torch.bfloat16) - want).abs()


def describe(name: str, err: torch.Tensor, noise: torch.Tensor) -> str:
    return f"{name}: |vLLM - reference| max {err.max():.4f} mean {err.mean():.5f}; bf16 noise max {noise.max():.4f} mean {noise.mean():.5f}"


# --- a `vllm serve` process, asked over HTTP (tests/vllm/test_vllm_serve.py, benchmarks/gpu_fixtures.py) ---
SERVE_START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """GET `url`, or POST `body` as JSON: the status and the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        text = response.read()
        return response.status, json.loads(text) if text else {}


def wait_until_healthy(server: subprocess.Popen, base: str, log: Path, timeout_s: float = SERVE_START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if http_json(f"{base}/health", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
