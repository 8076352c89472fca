"""Every bundled ModelOpt fixture through CUDA vLLM, `LLM(model=...)` with no quantization argument
(a few also through `vllm serve`), one engine per process, checked against the dense reference the
CPU tests use.

Two steps, so that the GPU does only what needs it:

    python benchmarks/gpu_fixtures.py serve --out DIR        # on the GPU: every run, --jobs at once
    python benchmarks/gpu_fixtures.py compare DIR            # anywhere: reference, bounds, table

`serve` starts each run in its own process (`worker`), writes DIR/<run>.pt (prompt logprobs, vLLM's
quantization method, each layer's method, scheme and kernel, timings), DIR/<run>.log, DIR/runs.json
and DIR/env.json. A run that outlives its timeout is killed after dumping its threads' stacks
(faulthandler) into its log. `compare` computes tests/vllm/modelopt_reference.py's logprobs with the
bound policy of tests/vllm/test_vllm_fixtures.py (CASES) and writes DIR/table.md and DIR/summary.json.

Runs: route `all` (lazyxform serves it) for every fixture; route `off` (vLLM's own ModelOpt path) for
the fixtures vLLM loads natively, compared bit for bit with `all`; a few `all` runs with vLLM's own
reader (LAZYXFORM_VLLM_READER=off) or its multi-thread loader, compared bit for bit with lazyxform's
reader; a few through `vllm serve` (SERVED), compared with the in-process run; and MoE runs with
vLLM's default MoE backend as probes with a short timeout (on an H200 it is FlashInfer's CUTLASS
MoE, compiled at first use when no prebuilt FlashInfer kernels are installed), next to the main
MoE runs on the Triton backend; for INT4 MoE fixtures a run on vLLM's bf16 emulation of the experts
beside its default Marlin WNA16 MoE; for every MoE fixture its dense twin (no quantization, no
lazyxform) as vLLM's own deviation from the reference on the architecture; for FP8-KV fixtures that
vLLM loads natively, both routes on a copy whose k/v scales are bf16-exact (KV_BF16); and, with
`--tp2 NAME...`, those fixtures at tensor parallel size 2, compared with their TP=1 run: the same
greedy tokens, and logprobs within the reference's bf16 noise.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "modelopt"
TESTS = [ROOT / "tests" / "vllm", ROOT / "tests"]
KV_CACHE_BYTES = 256 << 20
# Given a KV cache size, vLLM skips its start-up memory profiling, which engines sharing the GPU
# break (each sees the others' allocations come and go). It still checks that this share is free.
GPU_ARGS = {"kv_cache_memory_bytes": KV_CACHE_BYTES, "gpu_memory_utilization": 0.05}
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the worker's process: its model can be inspected
    # Greedy prompt logprobs need no FlashInfer sampler; without it no sampler kernel is compiled at start-up.
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # the CPU build's KV cache, when this runs on a CPU
    "OMP_NUM_THREADS": "2",  # engines run side by side
    "PYTHONUNBUFFERED": "1",
}
# FP8 MoE on vLLM's Triton backend (its default, FlashInfer's CUTLASS MoE, compiles for minutes); vLLM
# 0.26 has no Triton backend for WNA16 MoE ("Expected one of ['marlin', ...]"), which keeps its default.
MOE_TRITON = {"moe_backend": "triton"}
# WNA16 MoE on vLLM's "emulation" backend (the experts dequantized to bf16 once, then its Triton MoE),
# beside the Marlin WNA16 MoE it picks by default: the same weights through another kernel.
EMULATED_MOE = {"moe_backend": "emulation"}
# A MoE fixture's dense twin (tests/vllm/modelopt_reference.dense_twin: every quantized weight decoded by the
# reference's formulas, pre_quant_scale multiplied in, written as a plain bf16 checkpoint), served by
# vLLM alone: vLLM's own deviation from the reference on the architecture, no quantization involved.
DENSE = "dense"
# An FP8-KV fixture that vLLM loads natively, its k/v scales rounded to bf16 (kv_scales_bf16), on both
# routes: vLLM's ModelOpt path holds k/v scales in bf16 parameters, lazyxform keeps ModelOpt's fp32
# values, so on the fixtures as exported the two paths may differ; with bf16-exact scales they must not.
KV_BF16 = "kv-scales-bf16"
# Where vLLM 0.26 on an H200 (compute capability 9.0) computes another function than the one
# tests/vllm/test_vllm_fixtures.py's CASES check on a CPU, in its own ModelOpt path and in
# compressed-tensors' alike: modelopt_reference options replacing the case's, and the bound, for the
# check of this harness (the CPU case's deviation is reported beside it).
# * FP4 activations need compute capability 10.0: W4A4 NVFP4 and MXFP4 layers run on Marlin,
#   weight-only, so the reference is the weight-only one, with the standard 2x bound.
# * FlashAttention 3 reads K and V back from the FP8 KV cache in prefill too: the reference rounds
#   them with the exported k/v scales (ModelOpt's function; the CPU cases compare unrounded K and V).
# * W4A8_AWQ runs on CUTLASS W4A8, whose FP8 group scales and FP8 q * scale products the reference
#   then models (modelopt_reference.cutlass_w4a8_weight).
WEIGHT_ONLY = {"quantize_activations": False}
H200_CASES: dict[str, tuple[dict[str, Any], float]] = {
    **dict.fromkeys(
        ["nvfp4", "nvfp4_awq_clip", "nvfp4_awq_lite", "nvfp4_mlp_only", "mxfp4", "w4a8_mxfp4_fp8", "phi3_nvfp4", "deepseek_v3_nvfp4", "deepseek_v3_nvfp4_mtp", "lm_head_nvfp4"],
        (WEIGHT_ONLY, 2.0),
    ),
    "fp8_kv_fp8": ({}, 2.0),
    "qwen3moe_fp8": ({}, 2.0),
    "nvfp4_kv_fp8": (WEIGHT_ONLY, 2.0),
    "nvfp4_kv_nvfp4": ({**WEIGHT_ONLY, "quantize_kv_cache": False}, 2.0),  # served with a bf16 KV cache
    "w4a8_awq": ({"activation": "fp8_token", "cutlass_w4a8": True}, 1.5),
}
GREEDY_TOKENS = 16
READER_CHECKED = ("fp8", "int4_awq", "nvfp4", "w4a8_awq", "qwen3moe_fp8")
# vLLM's multi-thread safetensors loader (`model_loader_extra_config`), which lazyxform's rewrite wraps:
# compared bit for bit with the same fixture through lazyxform's reader.
MULTITHREAD = {"model_loader_extra_config": {"enable_multithread_load": True, "num_threads": 8}}
MULTITHREAD_CHECKED = ("int4_awq", "nvfp4")
# `vllm serve MODEL` with no quantization flag and no route (the engine size flags of the other runs only), vLLM's own processes (API server, engine core), the
# plugin found through its entry point in each; prompt logprobs and greedy tokens over HTTP. Compared
# with the in-process run of the path the plugin chose (bit for bit where the batches match).
SERVED = "vllm-serve"
SERVE_CHECKED = ("fp8", "int4_awq", "int8_sq", "nvfp4", "w4a8_awq", "qwen3moe_fp8")
# vLLM's kernel and backend choices, lazyxform's lines, errors.
LOG_LINE = re.compile(r"Using |Selected |lazyxform|Error|[Bb]ackend")


@dataclass(frozen=True)
class Run:
    fixture: str
    route: str  # LAZYXFORM_VLLM_ROUTE
    tag: str = ""
    llm: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 300.0

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.fixture, self.route, self.tag) if p)


def native_fixtures(fixtures: Path, names: list[str]) -> set[str]:
    """The fixtures vLLM's own ModelOpt support loads on a GPU (the plugin's routing rule)."""
    import lazyxform
    from lazyxform.routing import serves
    from lazyxform_vllm.config_parser import VLLM_NATIVE_ALGOS

    return {n for n in names if not serves(lazyxform.read_modelopt_algos(fixtures / n), "auto", False, VLLM_NATIVE_ALGOS)}


def is_moe(fixture: Path) -> bool:
    config = json.loads((fixture / "config.json").read_text())
    return bool(config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts"))


def moe_options(fixture: Path) -> dict[str, Any]:
    """The MoE backend of a fixture's main runs (MOE_TRITON)."""
    import lazyxform

    fp8 = all(algo.startswith("FP8") for algo in lazyxform.read_modelopt_algos(fixture))
    return MOE_TRITON if is_moe(fixture) and fp8 else {}


def tests_on_path() -> None:
    """The CPU tests' reference and cases, importable."""
    for p in reversed(TESTS):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def plan_runs(fixtures: Path, names: list[str], timeout_s: float, probe_s: float, tp2: list[str]) -> list[Run]:
    import lazyxform

    tests_on_path()
    from modelopt_reference import read_algos

    native = native_fixtures(fixtures, names)
    runs = [Run(n, "all", "tp2", {**moe_options(fixtures / n), "tensor_parallel_size": 2}, timeout_s=timeout_s) for n in tp2]
    for n in names:
        llm = moe_options(fixtures / n)
        routes = ["all", "off"] if n in native else ["all"]
        runs += [Run(n, r, "triton-moe" if llm else "", llm, timeout_s=timeout_s) for r in routes]
        if n in READER_CHECKED:
            runs.append(Run(n, "all", "vllm-reader" + ("-triton-moe" if llm else ""), llm, {"LAZYXFORM_VLLM_READER": "off"}, timeout_s))
        if n in MULTITHREAD_CHECKED:
            runs.append(Run(n, "all", "multithread-load", {**llm, **MULTITHREAD}, timeout_s=timeout_s))
        if n in SERVE_CHECKED:
            runs.append(Run(n, "auto", SERVED, llm, timeout_s=timeout_s))
        if n in native and read_algos(fixtures / n)[1] == "FP8":
            runs += [Run(n, r, KV_BF16, llm, timeout_s=timeout_s) for r in routes]
        if llm and probe_s > 0:  # the default MoE backend too, as a probe
            runs += [Run(n, r, "default-moe", timeout_s=probe_s) for r in routes]
        if is_moe(fixtures / n) and lazyxform.read_modelopt_algos(fixtures / n) == {"W4A16_AWQ"}:
            # INT4 experts: vLLM's bf16 emulation of them beside its default WNA16 MoE (Marlin)
            runs.append(Run(n, "all", "emulation-moe", EMULATED_MOE, timeout_s=timeout_s))
        if is_moe(fixtures / n):
            runs.append(Run(n, "off", DENSE, MOE_TRITON, timeout_s=timeout_s))
    # Probes last: they may spend their whole timeout compiling.
    return sorted(runs, key=lambda r: r.tag == "default-moe")


def serve(out: Path, fixtures: Path, names: list[str], jobs: int, timeout_s: float, probe_s: float, tp2: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(environment(), indent=2))
    done: list[dict] = []

    def finished(run: Run, rc: int, wall: float, timed_out: bool) -> None:
        done.append(record(run, rc, wall, timed_out, out))
        print(f"{run.name}: rc {rc}{' (timed out)' if timed_out else ''} in {wall:.0f} s", flush=True)
        (out / "runs.json").write_text(json.dumps(done, indent=2))

    run_processes(
        plan_runs(fixtures, names, timeout_s, probe_s, tp2), jobs, lambda run: start(run, fixtures, out), lambda run: run.timeout_s, finished
    )
    return done


T = TypeVar("T")


def run_processes(
    pending: list[T],
    jobs: int,
    launch: Callable[[T], subprocess.Popen],
    timeout_s: Callable[[T], float],
    finished: Callable[[T, int, float, bool], None],
    stacks_signal: signal.Signals | None = None,
) -> None:
    """Each item's process, `jobs` at once, launched in a session of its own (start_new_session), so
    that a kill takes its compilers and engine processes too. One that outlives its timeout is sent
    `stacks_signal` first, where given (processes that registered it with faulthandler write their
    thread stacks), then killed. finished(item, return code, wall seconds, killed for its timeout) as
    each ends. Stopped (SIGTERM, an error), this process takes those in flight along instead of
    leaving them on the GPU."""
    running: list[tuple[T, subprocess.Popen, float]] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped with {len(running)} runs in flight"))
    try:
        while pending or running:
            while pending and len(running) < jobs:
                item = pending.pop(0)
                running.append((item, launch(item), time.monotonic()))
            time.sleep(0.5)
            for entry in list(running):
                item, proc, began = entry
                wall = time.monotonic() - began
                timed_out = proc.poll() is None and wall > timeout_s(item)
                if proc.poll() is None and not timed_out:
                    continue
                if timed_out:
                    if stacks_signal is not None:
                        os.killpg(proc.pid, stacks_signal)
                        time.sleep(3)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                running.remove(entry)
                finished(item, proc.returncode, wall, timed_out)
    finally:
        for _, proc, _ in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def record(run: Run, rc: int, wall: float, timed_out: bool, out: Path) -> dict:
    log = (out / f"{run.name}.log").read_text(errors="replace")
    found = {**asdict(run), "name": run.name, "rc": rc, "wall_s": round(wall, 1), "timed_out": timed_out}
    if rc != 0:
        found["log_tail"] = log[-4000:]
    found["log_lines"] = [line[-400:] for line in log.splitlines() if LOG_LINE.search(line)][:80]
    return found


def kv_scales_bf16(ckpt: Path, dst: Path) -> Path:
    """A copy of `ckpt` whose k_scale / v_scale values are rounded to bf16 (still stored as exported,
    fp32): scales that both of vLLM's paths hold exactly."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(ckpt, dst)
    for path in dst.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        for k, t in tensors.items():
            if k.endswith((".k_scale", ".v_scale")):
                tensors[k] = t.to(torch.bfloat16).to(t.dtype)
        save_file(tensors, str(path), metadata=metadata)
    return dst


def made_once(dst: Path, make: Callable[[Path], Any]) -> Path:
    """`dst`, made by `make` into a folder beside it and then renamed, unless it exists: a folder a
    killed harness left half-written is never taken for a finished one."""
    if not dst.exists():
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make(partial)
        partial.rename(dst)
    return dst


def served_checkpoint(run: Run, fixtures: Path, out: Path) -> Path:
    """The checkpoint a run serves: its fixture, the fixture's dense twin (DENSE) or its copy with
    bf16-exact k/v scales (KV_BF16); each made once per output folder, for the runs that share it."""
    src = fixtures / run.fixture
    if run.tag == DENSE:
        tests_on_path()
        from modelopt_reference import dense_twin

        return made_once(out / DENSE / run.fixture, lambda dst: dense_twin(src, dst))
    if run.tag == KV_BF16:
        return made_once(out / KV_BF16 / run.fixture, lambda dst: kv_scales_bf16(src, dst))
    return src


def reference_checkpoint(run: Run, fixtures: Path, out: Path) -> Path:
    """The checkpoint a run's reference is computed from: what it serves (a KV_BF16 copy is made again
    where the GPU's output folder lacks it), except a dense twin, which encodes its fixture's function."""
    return fixtures / run.fixture if run.tag == DENSE else served_checkpoint(run, fixtures, out)


def start(run: Run, fixtures: Path, out: Path) -> subprocess.Popen:
    model = served_checkpoint(run, fixtures, out)
    request = out / f"{run.name}.request.json"
    log = out / f"{run.name}.log"
    request.write_text(json.dumps({"model": str(model), "route": run.route, "llm": run.llm, "env": run.env, "traceback_s": run.timeout_s - 10, "log": str(log), "serve": run.tag == SERVED}))
    with open(log, "w") as sink:
        return subprocess.Popen(
            [sys.executable, __file__, "worker", str(request), str(out / f"{run.name}.pt")],
            env={**os.environ, **WORKER_ENV},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("vllm", "torch", "triton", "flashinfer-python", "transformers", "compressed-tensors", "lazyxform"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    gpu = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return {"versions": versions, "gpu": gpu, "python": sys.version, "nproc": os.cpu_count()}


# ---- the worker: one engine ----


def label(value: Any) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, Enum):
        return value.name
    inner = getattr(value, "fused_experts", None)  # a modular MoE kernel: the experts are the kernel
    return type(value).__name__ + (f"({type(inner).__name__})" if inner is not None else "")


def kernel_attrs(obj: Any) -> list[str]:
    """The kernel, backend and experts choices an object holds (vLLM names them *kernel*, *linear*,
    *backend*, experts_cls)."""
    found = []
    for key, value in vars(obj).items():
        if value is None or isinstance(value, (bool, int, float, str, dict, list, tuple)):
            continue
        if any(word in key for word in ("kernel", "linear", "backend", "experts_cls")):
            found.append(f"{key}={label(value)}")
    return found


def layer_kernels(model: Any) -> dict[str, list[str]]:
    """Layer type (names with layer and expert numbers replaced by *) -> the distinct descriptions of
    its method, scheme and kernel, and of the attention backend."""
    types: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        parts = []
        method = getattr(module, "quant_method", None)
        if method is not None:
            parts.append(type(method).__name__)
            parts += kernel_attrs(method)
            inner = getattr(method, "inner", None)  # PreQuantScaleLinearMethod wraps another method
            if inner is not None:
                parts += [type(inner).__name__, *kernel_attrs(inner)]
            scheme = getattr(module, "scheme", None)
            if scheme is not None:
                parts += [type(scheme).__name__, *kernel_attrs(scheme)]
                inner = getattr(scheme, "inner", None)  # SGLang's PreQuantScaleScheme wraps another scheme
                if inner is not None:
                    parts += [type(inner).__name__, *kernel_attrs(inner)]
            if hasattr(module, "experts_input_scale"):  # experts' one gate/up pre_quant_scale, mixed into the method or scheme
                parts.append("experts_input_scale")
        backend = getattr(module, "attn_backend", None)
        if backend is not None:
            parts.append(f"attn_backend={backend.get_name()}")
        if parts:
            types.setdefault(re.sub(r"\.\d+(\.|$)", r".*\1", name), set()).add(" > ".join(parts))
    return {k: sorted(v) for k, v in types.items()}


def kernels_or_error(llm: Any) -> dict[str, list[str]]:
    """What layer_kernels finds, or why it found nothing: the logprobs are kept either way."""
    try:
        return llm.apply_model(layer_kernels)[0]
    except Exception as e:  # a vLLM class this does not know how to describe
        return {"error": [repr(e)]}


def worker(request_path: Path, result_path: Path) -> None:
    request = json.loads(request_path.read_text())
    faulthandler.dump_traceback_later(max(request["traceback_s"], 1), exit=False)
    os.environ.update(request["env"])
    if request["route"] == "auto":  # the plugin's default: nothing set, not even by the caller
        os.environ.pop("LAZYXFORM_VLLM_ROUTE", None)
    else:
        os.environ["LAZYXFORM_VLLM_ROUTE"] = request["route"]
    tests_on_path()
    if request.get("serve"):
        serve_worker(request, result_path)
        faulthandler.cancel_dump_traceback_later()
        return
    began = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    from vllm_support import LLM_DEFAULTS, PROMPTS, prompt_logprobs

    imported = time.perf_counter()
    gpu = GPU_ARGS if torch.cuda.is_available() else {}
    llm = LLM(model=request["model"], **{**LLM_DEFAULTS, **gpu, **request["llm"]})
    ready = time.perf_counter()
    ids, logprobs = prompt_logprobs(llm)
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0), use_tqdm=False)
    config = llm.llm_engine.vllm_config
    torch.save(
        {
            "ids": ids,
            "logprobs": logprobs,
            "tokens": [list(o.outputs[0].token_ids) for o in greedy],
            "quantization": config.model_config.quantization,
            "kv_cache_dtype": config.cache_config.cache_dtype,
            "kernels": kernels_or_error(llm),
            "import_s": imported - began,
            "ready_s": ready - imported,
        },
        result_path,
    )
    faulthandler.cancel_dump_traceback_later()


def cli_flags(args: dict[str, Any]) -> list[str]:
    """LLM(...) keyword arguments as `vllm serve` flags (True: the bare flag; a dict: JSON)."""
    flags = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (dict, str, int, float)) and value is not False:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
        else:
            raise ValueError(f"{key}={value!r}: no `vllm serve` flag written for this value")
    return flags


def serve_worker(request: dict, result_path: Path) -> None:
    """`vllm serve` (on a CPU, lazyxform-vllm: vllm-cpu's own `vllm` cannot start) in vLLM's default
    process layout, its output into this run's log; what `worker` records, asked over HTTP."""
    import torch
    from vllm_support import LLM_DEFAULTS, PROMPTS, VOCAB, free_port, http_json, wait_until_healthy

    cuda = torch.cuda.is_available()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cli = "vllm.entrypoints.cli.main" if cuda else "lazyxform_vllm"
    args = {**LLM_DEFAULTS, **(GPU_ARGS if cuda else {}), **request["llm"]}
    command = [sys.executable, "-m", cli, "serve", request["model"], "--host", "127.0.0.1", "--port", str(port), *cli_flags(args)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # vLLM's default
    began = time.perf_counter()
    # A session of its own: stopping it stops its engine core too, which holds the GPU memory.
    server = subprocess.Popen(command, env=env, stdout=sys.stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(server, base, Path(request["log"]), max(request["traceback_s"] - 60, 10))
        ready = time.perf_counter()
        url, model = f"{base}/v1/completions", request["model"]
        _, scored = http_json(url, {"model": model, "prompt": PROMPTS, "max_tokens": 1, "temperature": 0, "prompt_logprobs": -1, "return_token_ids": True}, 120)
        _, greedy = http_json(url, {"model": model, "prompt": PROMPTS, "max_tokens": GREEDY_TOKENS, "temperature": 0, "return_token_ids": True}, 120)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    choices = sorted(scored["choices"], key=lambda c: c["index"])
    rows = [[position[str(t)]["logprob"] for t in range(VOCAB)] for c in choices for position in c["prompt_logprobs"][1:]]
    log = Path(request["log"]).read_text(errors="replace")
    engine = re.search(r"quantization=(\w+).*?kv_cache_dtype=(\w+)", log)
    torch.save(
        {
            "ids": [c["prompt_token_ids"] for c in choices],
            "logprobs": torch.tensor(rows),
            "tokens": [c["token_ids"] for c in sorted(greedy["choices"], key=lambda c: c["index"])],
            "quantization": engine.group(1) if engine else None,
            "kv_cache_dtype": engine.group(2) if engine else None,
            "kernels": {"server log": sorted({line.split("] ", 1)[-1] for line in log.splitlines() if re.search(r"Using \S+ (for|kernel|backend)|lazyxform:", line)})},
            "import_s": None,  # the server's imports are inside its ready time
            "ready_s": ready - began,
        },
        result_path,
    )


# ---- compare: anywhere, after serve ----


def compare(out: Path, fixtures: Path) -> list[dict]:
    tests_on_path()
    import torch
    from modelopt_reference import deviation
    from test_vllm_fixtures import CASES

    runs = json.loads((out / "runs.json").read_text())
    results = {r["name"]: torch.load(out / f"{r['name']}.pt", weights_only=False) for r in runs if r["rc"] == 0}
    rows = []
    for run in runs:
        row = {k: run[k] for k in ("name", "fixture", "route", "tag", "rc", "timed_out", "wall_s")}
        rows.append(row)
        got = results.get(run["name"])
        if got is None:
            log = out / f"{run['name']}.log"
            row["error"] = error_line(log.read_text(errors="replace") if log.exists() else run.get("log_tail", ""), run["timed_out"])
            continue
        row.update(
            quantization=got["quantization"],
            kv_cache_dtype=str(got["kv_cache_dtype"]),
            kernels=got["kernels"],
            ready_s=round(got["ready_s"], 1),
        )
        path, case = reference_checkpoint(Run(run["fixture"], run["route"], run["tag"]), fixtures, out), CASES[run["fixture"]]
        cpu = deviation(path, got["ids"], got["logprobs"], case.reference, case.bound)
        if run["fixture"] in H200_CASES:
            row.update(deviation(path, got["ids"], got["logprobs"], *H200_CASES[run["fixture"]]))
            row["cpu_case"] = cpu
        else:
            row.update(cpu)
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        twin = twin_of(row, set(by_name))
        if twin in results and row["name"] in results:
            a, b = results[row["name"]]["logprobs"], results[twin]["logprobs"]
            row["twin"] = twin
            row["identical"] = bool(torch.equal(a, b))
            row["twin_max_diff"] = float((a - b).abs().max())
            row["twin_same_tokens"] = results[row["name"]]["tokens"] == results[twin]["tokens"]
            if row["tag"] == "tp2" and "noise_max" in row:  # TP=2 against TP=1: within the reference's bf16 noise
                diff = (a - b).abs()
                row["twin_within_noise"] = float(diff.max()) <= row["noise_max"] and float(diff.mean()) <= row["noise_mean"]
        elif twin in by_name:
            row["twin"] = twin
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(table(rows))
    return rows


def twin_of(row: dict, names: set[str]) -> str:
    """The run whose logprobs this one must equal bit for bit: a native run's lazyxform twin, a
    vLLM-reader or multi-thread-loader run's lazyxform-reader twin; a `vllm serve` run's in-process run
    of the path the plugin chose; a TP=2 run is compared with its TP=1 run (not bit for bit); a dense
    twin with nothing."""
    if row["tag"] == DENSE:
        return ""
    if row["tag"] == "tp2":
        return row["name"].replace("-tp2", "", 1)
    if row["tag"] == SERVED:  # the path the server's log names; none found, nothing to compare with
        quantization = row.get("quantization") or ""
        route = "all" if quantization == "lazyxform" else "off" if quantization.startswith("modelopt") else ""
        return next((n for n in (f"{row['fixture']}-{route}", f"{row['fixture']}-{route}-triton-moe") if n in names), "") if route else ""
    if row["route"] == "off":
        return row["name"].replace("-off", "-all", 1)
    for reader in ("vllm-reader", "multithread-load"):  # another reader, compared with lazyxform's
        if row["tag"].startswith(reader):
            return row["name"].replace(f"-{reader}", "", 1)
    return ""


def error_line(log: str, timed_out: bool) -> str:
    """A failed run's error, or, timed out, the innermost frames of its main thread (faulthandler)."""
    lines = log.splitlines()
    if timed_out:  # the dumped thread whose stack holds the worker, innermost frames first
        main = next((b for b in log.split("(most recent call first):") if "in worker" in b), "")
        frames = [line.strip().removeprefix("File ") for line in main.splitlines() if line.strip().startswith("File ")]
        return "stack: " + " < ".join(frames[:5])[:700]
    errors = [line for line in lines if re.search(r"Error|error", line)]
    return (errors[-1] if errors else lines[-1] if lines else "")[-600:]


def short_kernels(kernels: dict[str, list[str]]) -> str:
    """One cell: each layer kind's distinct choices, without the class names of layers the engine leaves unquantized."""
    kinds: dict[str, set[str]] = {}
    for layer, descriptions in kernels.items():
        kind = layer.rsplit(".", 1)[-1]
        for d in descriptions:
            if "Unquantized" not in d:
                kinds.setdefault(kind, set()).add(d)
    return "; ".join(f"{k}: {' / '.join(sorted(v))}" for k, v in sorted(kinds.items()))


def table(rows: list[dict]) -> str:
    head = (
        "| run | quant method | KV cache | max / mean \\|dlogprob\\| | bf16 noise max / mean | bound | within | "
        "CPU-policy reference (x noise), where H200 differs | identical to | kernels |\n"
    )
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        if "max" not in r:
            failed = f"failed{' (timed out)' if r['timed_out'] else ''} after {r['wall_s']} s: {r.get('error', '')}"
            lines.append(f"| {r['name']} | {failed.replace('|', '/')} | | | | | | | | |")
            continue
        ident = "n.a."
        if "identical" in r:
            ident = f"{r['twin']}: " + ("yes" if r["identical"] else f"no (max {r['twin_max_diff']:.3g})")
            ident += ", same greedy tokens" if r["twin_same_tokens"] else ", OTHER greedy tokens"
            if "twin_within_noise" in r:
                ident += ", within 1x noise" if r["twin_within_noise"] else ", NOT within 1x noise"
        cpu = r.get("cpu_case")
        cpu_cell = f"{cpu['max']:.4f} / {cpu['mean']:.5f} ({cpu['max'] / cpu['noise_max']:.2f}x / {cpu['mean'] / cpu['noise_mean']:.2f}x)" if cpu else ""
        lines.append(
            f"| {r['name']} | {r['quantization']} | {r['kv_cache_dtype']} | {r['max']:.4f} / {r['mean']:.5f} | "
            f"{r['noise_max']:.4f} / {r['noise_mean']:.5f} | {r['bound']}x | {'yes' if r['within'] else 'NO'} | {cpu_cell} | {ident} | "
            f"{short_kernels(r['kernels'])} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="on the GPU: every run, one engine per process")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--fixtures", type=Path, default=FIXTURES)
    s.add_argument("--only", nargs="*", help="fixture names (default: all)")
    s.add_argument("--jobs", type=int, default=6, help="engines at once")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    s.add_argument("--probe-timeout", type=float, default=100.0, help="seconds per default-MoE-backend probe (0: no probes)")
    s.add_argument("--tp2", nargs="*", default=[], help="fixtures also served at tensor parallel size 2 (two GPUs)")
    c = sub.add_parser("compare", help="anywhere: deviation from the reference, bounds, bit-for-bit twins")
    c.add_argument("out", type=Path)
    c.add_argument("--fixtures", type=Path, default=FIXTURES)
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("request", type=Path)
    w.add_argument("result", type=Path)
    args = parser.parse_args()
    if args.command == "serve":
        names = args.only or sorted(p.name for p in args.fixtures.iterdir() if (p / "config.json").exists())
        serve(args.out, args.fixtures.resolve(), names, args.jobs, args.timeout, args.probe_timeout, args.tp2)
    elif args.command == "compare":
        print(table(compare(args.out, args.fixtures.resolve())))
    else:
        worker(args.request, args.result)


if __name__ == "__main__":
    main()
