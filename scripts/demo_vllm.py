"""Serve a bundled ModelOpt fixture with vLLM, no quantization argument: the lazyxform plugin claims it.

The fixtures ship without a tokenizer (nothing may come from a hub), so a copy gets a tiny byte-level one.
Their weights are random-ish tiny Llamas: the text is noise; what matters is that it loads and runs."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: start-up in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))

from tiny_tokenizer import write_tokenizer  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    ckpt = Path(shutil.copytree(sys.argv[1], Path(tmp) / Path(sys.argv[1]).name))
    write_tokenizer(ckpt)
    llm = LLM(model=str(ckpt), max_model_len=128, enforce_eager=True)
    method = llm.llm_engine.vllm_config.model_config.quantization
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    print(f"\nvLLM served {ckpt.name} with quantization={method!r}; generated token ids {out.outputs[0].token_ids}")
    if method != "lazyxform":
        sys.exit(f"expected the lazyxform plugin to claim {ckpt.name}, got {method!r}")
