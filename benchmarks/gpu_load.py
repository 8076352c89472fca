"""Load time of a real vLLM engine on 8B-shaped synthetic checkpoints: lazyxform against vLLM's own
path for the same weights, every ratio within one run.

    python benchmarks/gpu_load.py bench --data /tmp/lx-data --out DIR [--formats fp8 nvfp4 int4_awq] [--repeats 1] [--arms ARM...] [--cuda-graphs]

Per format (make_checkpoint.py's Llama-3-8B shapes, written to --data if missing):
* fp8, nvfp4: `native` (LAZYXFORM_VLLM_ROUTE=off: vLLM's ModelOpt path), `lazyxform` (route all,
  lazyxform's own reader) and `lazyxform-wrap` (route all, LAZYXFORM_VLLM_READER=off: vLLM's reader,
  rewritten by `ck.wrap`).
* nvfp4 also `ct-converted`: the peer path, the checkpoint converted offline by compressed-tensors'
  own `ModelOptNvfp4Converter` (timed once per run in `prepare`, bytes written recorded), then loaded
  by vLLM as compressed-tensors; its total is the conversion plus its ready time.
* int4_awq (vLLM has no ModelOpt path for it): `lazyxform`, `lazyxform-wrap`, and `compressed-tensors`:
  lazyxform's own stream (`iter(lazyxform.open(ckpt))`, `ck.hf_config`) written once as a
  compressed-tensors checkpoint and loaded by vLLM natively. compressed-tensors cannot express a
  run-time pre_quant_scale, so that checkpoint leaves those tensors out (the modules lazyxform scales
  at run time are listed in the results); decode tokens/s at batch 1 and 32 for these three.

Each engine runs in its own process (`worker`): `LLM(...)` with enforce_eager (`--cuda-graphs`: decode on
CUDA graphs, CUDA_GRAPHS), no tokenizer. Recorded:
import time, `LLM(...)` to ready, vLLM's model load (DefaultModelLoader.load_model: model init,
weight stream, post-processing) and its weight stream alone (load_weights), peak GPU memory
allocated during load_model, memory allocated after it. DIR/load.json and DIR/load.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONUNBUFFERED": "1"}
LLM_ARGS = {
    "enforce_eager": True,
    "skip_tokenizer_init": True,
    "max_model_len": 2048,
    "gpu_memory_utilization": 0.85,
    "dtype": "bfloat16",
    "seed": 0,
}
NATIVE_MODELOPT = ("fp8", "nvfp4")
BASELINES = ("native", "compressed-tensors")
CONVERTED = "nvfp4_ct_converted"  # each format's arm that the others are ratios of
DECODE_BATCHES = (1, 32)
DECODE_REPEATS = 3  # timed generations per batch size; the median is recorded
PROMPT_TOKENS = 32
# `--cuda-graphs`: decode steps replayed as whole CUDA graphs (captured for the decode batch sizes
# only, no torch.compile), so that tokens/s measure the kernels, not eager mode's host launches.
CUDA_GRAPHS = {
    "enforce_eager": False,
    "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": list(DECODE_BATCHES)},
}


def arms(fmt: str, data: Path) -> list[tuple[str, Path, dict[str, str]]]:
    """(arm, checkpoint, environment) of one format; the baseline first."""
    ckpt = data / fmt
    lazy = [("lazyxform", ckpt, {"LAZYXFORM_VLLM_ROUTE": "all"}), ("lazyxform-wrap", ckpt, {"LAZYXFORM_VLLM_ROUTE": "all", "LAZYXFORM_VLLM_READER": "off"})]
    if fmt == "nvfp4":
        return [("native", ckpt, {"LAZYXFORM_VLLM_ROUTE": "off"}), *lazy, ("ct-converted", data / CONVERTED, {"LAZYXFORM_VLLM_ROUTE": "off"})]
    if fmt in NATIVE_MODELOPT:
        return [("native", ckpt, {"LAZYXFORM_VLLM_ROUTE": "off"}), *lazy]
    return [("compressed-tensors", data / f"{fmt}_ct", {}), *lazy]


def write_compressed_tensors(src: Path, dst: Path, shard_bytes: int = 5 * 10**9) -> list[str]:
    """lazyxform's stream of `src` written as a compressed-tensors checkpoint; returns the tensors left
    out (run-time pre_quant_scale, which compressed-tensors cannot express)."""
    from safetensors.torch import save_file

    import lazyxform

    ck = lazyxform.open(src)
    dst.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    left_out = []
    for name, tensor in ck:
        if name.endswith(".pre_quant_scale"):
            left_out.append(name)
            continue
        if sizes[-1] and sizes[-1] + tensor.nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.to("cpu").contiguous()
        sizes[-1] += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(ck.hf_config, indent=2))
    (dst / "generation_config.json").write_text((src / "generation_config.json").read_text())
    return left_out


def convert_offline(src: Path, dst: Path) -> dict[str, Any]:
    """The peer path: compressed-tensors' ModelOpt NVFP4 converter writes a converted copy."""
    import shutil

    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter

    import lazyxform

    shutil.rmtree(dst, ignore_errors=True)
    modules = [m.name for m in lazyxform.open(src, device="cpu").plan.modules]
    began = time.perf_counter()
    convert_checkpoint(src, dst, ModelOptNvfp4Converter(targets=modules))
    # It copies every other file, ModelOpt's own quantization config too, which no longer describes
    # the tensors: what a user of the peer path deletes, so that nothing reads it as ModelOpt.
    (dst / "hf_quant_config.json").unlink(missing_ok=True)
    os.sync()  # the copy is on disk, as an offline step leaves it
    return {"convert_s": time.perf_counter() - began, "bytes_written": sum(f.stat().st_size for f in dst.iterdir())}


def prepare(data: Path, formats: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_checkpoint import write_checkpoint

    made: dict[str, Any] = {}
    for fmt in formats:
        if not (data / fmt / "config.json").exists():
            began = time.perf_counter()
            made[fmt] = {"bytes": write_checkpoint(fmt, data / fmt), "write_s": time.perf_counter() - began}
        if fmt == "nvfp4":  # every run: its time is part of the peer path's total
            made[CONVERTED] = convert_offline(data / fmt, data / CONVERTED)
        if fmt not in NATIVE_MODELOPT and not (data / f"{fmt}_ct" / "config.json").exists():
            began = time.perf_counter()
            left_out = write_compressed_tensors(data / fmt, data / f"{fmt}_ct")
            made[f"{fmt}_ct"] = {"left_out": left_out, "write_s": time.perf_counter() - began}
    return made


def run_arm(fmt: str, arm: str, ckpt: Path, env: dict[str, str], out: Path, timeout_s: float, llm_args: dict[str, Any]) -> dict[str, Any]:
    name = f"{fmt}-{arm}"
    result = out / f"{name}.json"
    request = {"model": str(ckpt), "decode": fmt not in NATIVE_MODELOPT, "llm": llm_args}
    began = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(
                [sys.executable, __file__, "worker", json.dumps(request), str(result)],
                env={**os.environ, **ENV, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    record = {"format": fmt, "arm": arm, "rc": rc, "process_s": time.perf_counter() - began}
    if rc == 0:
        record |= json.loads(result.read_text())
    else:
        record["log_tail"] = (out / f"{name}.log").read_text(errors="replace")[-3000:]
    print(f"{name}: {json.dumps({k: v for k, v in record.items() if k != 'log_tail'})}", flush=True)
    return record


def worker(request_json: str, result_path: Path) -> None:
    """One engine: times and memory of its load, decode tokens/s if asked."""
    request = json.loads(request_json)
    began = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    imported = time.perf_counter()
    stats: dict[str, Any] = {}
    load_model, load_weights = BaseModelLoader.load_model, DefaultModelLoader.load_weights

    def timed_load_model(self, *args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = load_model(self, *args, **kwargs)
        torch.cuda.synchronize()
        stats["load_model_s"] = time.perf_counter() - t
        stats["load_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        stats["loaded_gib"] = torch.cuda.memory_allocated() / GIB
        return model

    def timed_load_weights(self, *args, **kwargs):
        t = time.perf_counter()
        load_weights(self, *args, **kwargs)
        torch.cuda.synchronize()
        stats["load_weights_s"] = time.perf_counter() - t

    DefaultModelLoader.load_model = timed_load_model
    DefaultModelLoader.load_weights = timed_load_weights
    llm = LLM(model=request["model"], **{**LLM_ARGS, **request["llm"]})
    ready = time.perf_counter()
    stats |= {"import_s": imported - began, "ready_s": ready - imported, "quantization": llm.llm_engine.vllm_config.model_config.quantization}
    if request["decode"]:
        for batch in DECODE_BATCHES:
            stats[f"decode_tok_s_b{batch}"] = decode_rate(llm, SamplingParams, batch)
    result_path.write_text(json.dumps(stats))


def decode_rate(llm: Any, sampling_params: type, batch: int, tokens: int = 128) -> float:
    """Generated tokens per second for `batch` prompts of PROMPT_TOKENS tokens, `tokens` each, after a
    short warm-up of the same batch: the median of DECODE_REPEATS generations."""
    prompts = [{"prompt_token_ids": [1000 + 7 * i + j for j in range(PROMPT_TOKENS)]} for i in range(batch)]
    greedy = {"temperature": 0.0, "ignore_eos": True, "detokenize": False}
    llm.generate(prompts, sampling_params(max_tokens=4, **greedy), use_tqdm=False)
    rates = []
    for _ in range(DECODE_REPEATS):
        began = time.perf_counter()
        outs = llm.generate(prompts, sampling_params(max_tokens=tokens, **greedy), use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - began))
    return statistics.median(rates)


def summarize(records: list[dict[str, Any]]) -> str:
    """Medians per (format, arm), each arm as a ratio to its format's baseline (the first arm)."""
    keys = ("ready_s", "load_model_s", "load_weights_s", "load_peak_gib", "loaded_gib", "decode_tok_s_b1", "decode_tok_s_b32")
    lines = ["| format | arm | n | " + " | ".join(keys) + " | ready_s min-max |", "|---|---|---|" + "---|" * (len(keys) + 1)]
    for fmt in dict.fromkeys(r["format"] for r in records):
        ok = [r for r in records if r["format"] == fmt and r["rc"] == 0]
        arm_names = sorted(dict.fromkeys(r["arm"] for r in records if r["format"] == fmt), key=lambda a: a not in BASELINES)
        med = {a: {k: statistics.median(r[k] for r in ok if r["arm"] == a) for k in keys if any(k in r for r in ok if r["arm"] == a)} for a in arm_names}
        base = med[arm_names[0]]
        for a in arm_names:
            n = sum(r["arm"] == a for r in ok)
            cells = []
            for k in keys:
                if k not in med[a]:
                    cells.append("")
                elif a == arm_names[0] or k not in base:
                    cells.append(f"{med[a][k]:.2f}")
                else:
                    cells.append(f"{med[a][k]:.2f} ({med[a][k] / base[k]:.3f}x)")
            ready = [r["ready_s"] for r in ok if r["arm"] == a]
            spread = f"{min(ready):.2f}-{max(ready):.2f}" if ready else ""
            lines.append(f"| {fmt} | {a} | {n} | " + " | ".join(cells) + f" | {spread} |")
    return "\n".join(lines) + "\n"


def peer_path(converted: dict[str, Any] | None, records: list[dict[str, Any]]) -> str:
    """Convert-then-load against lazyxform's load of the ModelOpt checkpoint (ready-time medians)."""
    ready = {a: [r["ready_s"] for r in records if r["format"] == "nvfp4" and r["arm"] == a and r["rc"] == 0] for a in ("ct-converted", "lazyxform")}
    if converted is None or not all(ready.values()):
        return ""
    total = converted["convert_s"] + statistics.median(ready["ct-converted"])
    lazy = statistics.median(ready["lazyxform"])
    return (
        f"\nPeer path (nvfp4): convert {converted['convert_s']:.2f} s, writing {converted['bytes_written'] / GIB:.2f} GiB, "
        f"+ ready {statistics.median(ready['ct-converted']):.2f} s = {total:.2f} s; lazyxform ready {lazy:.2f} s, "
        f"writing 0 bytes: {total / lazy:.2f}x faster\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--data", type=Path, required=True, help="where the checkpoints are (made if missing)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--formats", nargs="*", default=["fp8", "nvfp4", "int4_awq"])
    b.add_argument("--repeats", type=int, default=1, help="rounds; each later round runs the arms in reverse order")
    b.add_argument("--timeout", type=float, default=240.0, help="seconds per engine")
    b.add_argument("--arms", nargs="*", help="arms to run beside each format's baseline (default: all)")
    b.add_argument("--cuda-graphs", action="store_true", help="every engine with CUDA_GRAPHS instead of eager mode")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("request")
    w.add_argument("result", type=Path)
    args = parser.parse_args()
    if args.command == "worker":
        worker(args.request, args.result)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    made = prepare(args.data, args.formats)
    print(f"prepared: {json.dumps(made)[:2000]}", flush=True)
    # The first engine of a machine compiles and fills caches (seen: 22 s to ready, 9-10 s after): one
    # engine first, kept out of the records.
    warm_fmt = args.formats[0]
    _, warm_ckpt, warm_env = arms(warm_fmt, args.data)[0]
    llm_args = CUDA_GRAPHS if args.cuda_graphs else {}
    warmup = run_arm(warm_fmt, "warmup", warm_ckpt, warm_env, args.out, args.timeout, llm_args)
    records = []
    for fmt in args.formats:
        baseline, *others = arms(fmt, args.data)
        order = [baseline, *(a for a in others if args.arms is None or a[0] in args.arms)]
        for round_ in range(args.repeats):
            for arm, ckpt, env in order if round_ % 2 == 0 else order[::-1]:
                records.append(run_arm(fmt, arm, ckpt, env, args.out, args.timeout, llm_args))
                (args.out / "load.json").write_text(json.dumps({"prepared": made, "llm_args": llm_args, "warmup": warmup, "runs": records}, indent=2))
    table = summarize(records) + peer_path(made.get(CONVERTED), records)
    (args.out / "load.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
