"""Serve a bundled ModelOpt fixture with vLLM, no quantization argument: the lazyxform plugin claims it.

The fixtures are random-ish tiny Llamas with a tiny byte-level tokenizer (tests/vllm/tiny_tokenizer.py,
shipped in each fixture directory): the text is noise; what matters is that it loads and runs."""

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: start-up in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM sets aside 92% of the memory

from vllm import LLM, SamplingParams  # noqa: E402

ckpt = Path(sys.argv[1])
prompt = "The quick brown fox"
llm = LLM(model=str(ckpt), max_model_len=128, enforce_eager=True)
method = llm.llm_engine.vllm_config.model_config.quantization
out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0].outputs[0]
print(f"\nvLLM served {ckpt.name} with quantization={method!r}")
print(f"prompt {prompt!r} -> generated text {out.text!r} (token ids {list(out.token_ids)})")
if method != "lazyxform":
    sys.exit(f"expected the lazyxform plugin to claim {ckpt.name}, got {method!r}")
if not out.text.strip():
    sys.exit("vLLM generated no visible text: does the checkpoint's tokenizer cover its vocabulary?")
