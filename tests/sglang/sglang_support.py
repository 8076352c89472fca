"""Helpers for the SGLang tests: servable fixture copies, one engine per process, prompt log-probabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "lazyxform rewrites ModelOpt weights at load time!",
    "0123456789 abc XYZ",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
]
BOS = 1
VOCAB = 1024  # every bundled fixture's vocab_size
ROUTE_ENV = "LAZYXFORM_SGLANG_ROUTE"  # what lazyxform_sglang reads; spelled out so a rename breaks the tests
WORKER = Path(__file__).parent / "engine_worker.py"
WORKER_TIMEOUT_S = 600


def prompt_ids(model: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [[BOS, *tokenizer.encode(p, add_special_tokens=False).ids] for p in PROMPTS]


class EngineFailed(AssertionError):
    pass


def run_engine(
    model: Path, workdir: Path, env: dict[str, str] | None = None, weights: list[str] | None = None, **engine
) -> dict:
    """sglang.Engine on the CPU in a process of its own (engine_worker.py): its result dict, with the
    process's log under "log". A failing engine fails this call with its output."""
    request, result = workdir / "request.json", workdir / "result.pt"
    request.write_text(json.dumps({"model": str(model), "ids": prompt_ids(model), "weights": weights or [], "engine": engine}))
    done = subprocess.run(
        [sys.executable, str(WORKER), str(request), str(result)],
        env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    log = done.stdout + done.stderr
    if done.returncode != 0 or not result.exists():
        raise EngineFailed(f"{model.name}: the engine exited with {done.returncode}:\n{log[-6000:]}")
    return {**torch.load(result, weights_only=False), "log": log}



def describe(name: str, err: torch.Tensor, noise: torch.Tensor) -> str:
    return f"{name}: |SGLang - reference| max {err.max():.4f} mean {err.mean():.5f}; bf16 noise max {noise.max():.4f} mean {noise.mean():.5f}"
