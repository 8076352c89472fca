#!/usr/bin/env python3
"""One checkpoint through vLLM (CPU) end to end, against an independent reference. Diagnosis only.

    PYTHONPATH=.:integrations/vllm .venv/bin/python scripts/vllm_e2e_fixture.py DIR [--json OUT] [--llm '{"kv_cache_dtype": "bfloat16"}']

DIR with an hf_quant_config.json: a ModelOpt fixture, served through lazyxform's plugin (no
quantization argument), compared with tests/vllm/modelopt_reference.py (transformers' model, ModelOpt's
dequant formulas and input quantizers) as tests/vllm/test_vllm_fixtures.py does: |vLLM - reference|
against the bf16 noise of the reference (max and mean over every prompt position and vocabulary entry).
DIR without one: an unquantized checkpoint, served by plain vLLM, compared with transformers' own fp32
model of it. The engine runs in a process of its own (tests/vllm/engine_worker.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "vllm")]
import os  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from tiny_tokenizer import write_tokenizer  # noqa: E402
from vllm_support import EngineFailed, run_engine  # noqa: E402


def error_head(text: str) -> list[str]:
    """The exception lines of a failed engine's stderr (last 'Error'/'Exception' line and the frame before)."""
    lines = [l for l in text.splitlines() if l.strip()]
    idx = [i for i, l in enumerate(lines) if re.match(r"^\s*(\w+\.)*\w*(Error|Exception|Exit)\b", l.strip()) or "Error:" in l]
    if not idx:
        return lines[-4:]
    i = idx[-1]
    frames = [l for l in lines[:i] if l.strip().startswith("File ")]
    return frames[-6:] + lines[i : i + 3]


def dense_logprobs(ckpt: Path, ids: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    rows = []
    with torch.no_grad():
        for p in ids:
            logits = model(torch.tensor([p])).logits[0].float()
            rows.append(torch.log_softmax(logits, dim=-1)[:-1])
    return torch.cat(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--json")
    ap.add_argument("--llm", default="{}")
    ap.add_argument("--isa", default="native")
    args = ap.parse_args()
    src = Path(args.ckpt).resolve()
    res: dict = {"ckpt": src.name}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / src.name
        shutil.copytree(src, path)
        write_tokenizer(path)
        work = Path(d) / "work"
        work.mkdir()
        try:
            out = run_engine(path, work, isa=args.isa, env={"LAZYXFORM_VLLM_CPU_KERNELS": "auto"}, **json.loads(args.llm))
        except EngineFailed as e:
            res["served"] = False
            res["error_head"] = error_head(str(e))
            res["frames"] = [l.strip() for l in str(e).splitlines() if l.strip().startswith("File ")][-12:]
            print(json.dumps(res, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
            return
        res["served"] = True
        res["quantization"] = out["quantization"]
        res["kernels"] = sorted(set(out["kernels"].values()))
        res["kv_cache_dtype"] = out["kv_cache_dtype"]
        ids, got = out["ids"], out["logprobs"]
        if (src / "hf_quant_config.json").exists():
            from modelopt_reference import Reference

            def ref(**o):
                r = Reference(path, **o)
                return torch.cat([r.logprobs(p)[:-1] for p in ids])

            try:
                want = ref()
                noise = (ref(dtype=torch.bfloat16) - want).abs()
            except Exception as e:  # noqa: BLE001
                res["reference_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                want = None
            if want is not None:
                extra = {}
                if out["kv_cache_dtype"] in ("auto", "bfloat16"):
                    # prefill logprobs read the fresh K/V (test_vllm_fixtures.PREFILL)
                    extra = {"quantize_kv_cache": False}
                if extra:
                    want = ref(**extra)
                    noise = (ref(dtype=torch.bfloat16, **extra) - want).abs()
        else:
            want = dense_logprobs(path, ids, torch.float32)
            noise = (dense_logprobs(path, ids, torch.bfloat16) - want).abs()
        if want is not None:
            err = (got - want).abs()
            res["err_max"], res["err_mean"] = float(err.max()), float(err.mean())
            res["noise_max"], res["noise_mean"] = float(noise.max()), float(noise.mean())
            res["ratio_max"], res["ratio_mean"] = res["err_max"] / res["noise_max"], res["err_mean"] / res["noise_mean"]
            res["log_warnings"] = [l[:300] for l in out["log"].splitlines() if "lazyxform" in l.lower() and ("warn" in l.lower() or "cannot" in l.lower())][:5]
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
