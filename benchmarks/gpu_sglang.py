"""Bundled ModelOpt fixtures through SGLang's engine on a GPU (`sglang.Engine`, no quantization
argument), one engine per process, checked against the dense reference the CPU tests use:

    python benchmarks/gpu_sglang.py serve --out DIR [--only int4_awq fp8 ...] [--device cuda] [--jobs N]
    python benchmarks/gpu_sglang.py compare DIR       # again, anywhere: reference, bounds, table

`serve` runs each fixture in its own process, --jobs at once (tests/sglang/engine_worker.py: the prompts and prompt
log-probabilities of tests/sglang), with route `all` (lazyxform serves it) and, for the fixtures
SGLang's own ModelOpt support loads, route `off` (SGLang's native path), whose logprobs must equal
lazyxform's bit for bit where both run. A run that fails or outlives --timeout is recorded with its
error and the next one runs. Each run's layers are described in the scheduler process (SGLang spawns
it and re-imports this file there: KERNELS_ENV) by their quant method, compressed-tensors scheme and
kernel attributes. Then `compare` computes tests/vllm/modelopt_reference.py's logprobs with the bound
policy of tests/sglang/test_sglang_fixtures.py (CASES) and writes DIR/runs.json and DIR/table.md.

Engine options avoid long JIT compiles on a fresh machine: the triton attention backend (the kit
carries no FlashAttention 3), the pytorch sampling backend, no CUDA graphs, a small static memory
fraction. Layers SGLang 0.5.17 cannot run on the GPU found (its compressed-tensors W4A4 NVFP4 scheme
needs compute capability 10.0, and it has no W4A16 NVFP4 scheme: NVFP4_AWQ, W4A16_NVFP4,
W4A8_NVFP4_FP8; plain NVFP4 gets SGLang's ModelOpt FP4 method) are reported as such instead of run.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import gpu_fixtures  # benchmarks/, beside this script: what the vLLM harness shares with this one
from gpu_fixtures import is_moe, run_processes

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "modelopt"
TESTS = [ROOT / "tests" / "sglang", ROOT / "tests" / "vllm", ROOT / "tests"]
KERNELS_ENV = "LAZYXFORM_BENCH_KERNELS"  # where the scheduler writes its layers' description
# Sent to a timed-out run's processes before they are killed: each writes its threads' stacks to the log.
STACKS_SIGNAL = signal.SIGUSR1
GPU_ENGINE = {
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "disable_cuda_graph": True,
    "mem_fraction_static": 0.2,
    "max_total_tokens": 4096,
    # SGLang kills a scheduler whose batch runs longer (default 300 s); a first forward that builds a
    # kernel with nvcc (0.5.17's Marlin MoE) takes longer.
    "watchdog_timeout": 1500,
}
# Where SGLang on a GPU below compute capability 10.0 computes another function than the CPU case's:
# its ModelOpt FP4 method (which lazyxform hands plain NVFP4 layers too) runs FP4 Marlin, weight-only.
# Such runs are compared with the weight-only reference, within 2x of its bf16 noise.
MARLIN_FP4_ALGOS = {"NVFP4"}
WEIGHT_ONLY_BOUND = 2.0
# NVFP4 algos that go through SGLang's compressed-tensors schemes.
CT_NVFP4_ALGOS = {"NVFP4_AWQ", "W4A16_NVFP4", "W4A8_NVFP4_FP8"}
# The GPU of runs recorded before runs.json recorded one: all were on an H200.
RECORDED_BEFORE = (9, 0)
# INT4 MoE on SGLang's Triton MoE runner (CompressedTensorsWNA16TritonMoE, Triton kernels), beside its
# default on SM 9.0, Marlin MoE (built with nvcc at first use in 0.5.17).
TRITON_MOE = {"moe_runner_backend": "triton"}


def probe_kernels(path: Path) -> None:
    """After SGLang's ModelRunner loads its model (scheduler process), write each layer type's
    method / scheme / kernel description (gpu_fixtures.layer_kernels) to path."""
    import functools

    from sglang.srt.model_executor.model_runner import ModelRunner

    load = ModelRunner.load_model

    @functools.wraps(load)
    def load_and_describe(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        (path.parent / f"{path.name}.gpu{self.gpu_id}.json").write_text(json.dumps(gpu_fixtures.layer_kernels(self.model), indent=1))
        return out

    ModelRunner.load_model = load_and_describe


if os.environ.get(KERNELS_ENV):  # this file re-imported as __mp_main__ in SGLang's spawned processes
    probe_kernels(Path(os.environ[KERNELS_ENV]))
    faulthandler.register(STACKS_SIGNAL, all_threads=True)  # a run that times out shows where it waits


def unsupported_on_this_gpu(algos: set[str]) -> str:
    """Why SGLang's compressed-tensors schemes cannot run these algos on this GPU, or ''."""
    import torch

    if not algos & CT_NVFP4_ALGOS or not torch.cuda.is_available():
        return ""
    from sglang.srt.layers.quantization.compressed_tensors import schemes

    need = schemes.CompressedTensorsW4A4Fp4.get_min_capability()
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor < need and not hasattr(schemes, "CompressedTensorsW4A16Fp4"):
        return f"needs compute capability {need} (this GPU: {major}{minor}): SGLang's W4A4 NVFP4 scheme; this SGLang has no W4A16 NVFP4 scheme"
    return ""


def plan(fixtures: Path, names: list[str]) -> list[dict[str, Any]]:
    """Runs: route `all` for each fixture, `off` where SGLang loads the checkpoint natively (GPU only),
    and INT4 MoE fixtures once more on SGLang's Triton MoE runner (TRITON_MOE), GPU only."""
    import sglang
    import torch

    import lazyxform
    from lazyxform_sglang.routing import native_algos

    runs = []
    capability = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    for name in names:
        algos = lazyxform.read_modelopt_algos(fixtures / name)
        native = torch.cuda.is_available() and bool(algos) and algos <= native_algos(sglang.__version__)
        runs.append({"fixture": name, "route": "all", "skip": unsupported_on_this_gpu(algos)})
        if native:
            runs.append({"fixture": name, "route": "off", "skip": ""})
        if torch.cuda.is_available() and algos == {"W4A16_AWQ"} and is_moe(fixtures / name):
            runs.append({"fixture": name, "route": "all", "tag": "triton-moe", "engine": TRITON_MOE, "skip": ""})
    for run in runs:
        run["name"] = "-".join(p for p in (run["fixture"], run["route"], run.get("tag")) if p)
        run["capability"] = capability
    return runs


def serve(out: Path, fixtures: Path, names: list[str], device: str, tp_size: int, timeout_s: float, jobs: int) -> list[dict]:
    """Every run, `jobs` engines at once (in the order of `names`: put a fixture whose kernels SGLang
    compiles at first use first, so the others run meanwhile)."""
    sys.path[:0] = [str(p) for p in TESTS]
    from helpers import servable_copies
    from sglang_support import prompt_ids

    out.mkdir(parents=True, exist_ok=True)
    copy = servable_copies(out / "fixtures", fixtures)
    engine = {**(GPU_ENGINE if device == "cuda" else {}), "tp_size": tp_size}
    done: list[dict[str, Any]] = []

    def finish(run: dict[str, Any], wall: float) -> None:
        run["wall_s"] = round(wall, 1)
        done.append(run)
        print(f"{run['name']}: rc {run['rc']} in {run['wall_s']} s {run.get('error', '')[:200]}", flush=True)
        (out / "runs.json").write_text(json.dumps(done, indent=2))

    def launch(run: dict[str, Any]) -> subprocess.Popen:
        model = copy(run["fixture"])
        request = out / f"{run['name']}.request.json"
        request.write_text(
            json.dumps({"model": str(model), "device": device, "ids": prompt_ids(model), "weights": [], "engine": {**engine, **run.get("engine", {})}})
        )
        return start(run["name"], run["route"], request, out)

    def finished(run: dict[str, Any], rc: int, wall: float, timed_out: bool) -> None:
        if timed_out:
            run.update(rc=None, error=f"timed out after {timeout_s} s (every process's thread stacks end its log)")
        else:
            run.update(outcome(out / f"{run['name']}.log", rc))
        finish(run, wall)

    runs = plan(fixtures, names)
    for run in runs:
        if run["skip"]:
            run.update(rc=None, error=f"not run: {run['skip']}")
            finish(run, 0.0)
    run_processes([r for r in runs if not r["skip"]], jobs, launch, lambda _: timeout_s, finished, STACKS_SIGNAL)
    return done


def start(name: str, route: str, request: Path, out: Path) -> subprocess.Popen:
    """engine_worker.py in a session of its own (a kill takes SGLang's scheduler along)."""
    env = {**os.environ, KERNELS_ENV: str(out / f"{name}.kernels"), "LAZYXFORM_SGLANG_ROUTE": route}
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in TESTS] + [env.get("PYTHONPATH", "")])
    with open(out / f"{name}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, __file__, "worker", str(request), str(out / f"{name}.pt")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def outcome(log: Path, rc: int) -> dict[str, Any]:
    if rc == 0:
        return {"rc": 0}
    return {"rc": rc, "error": gpu_fixtures.error_line(log.read_text(errors="replace"), timed_out=False)}


def run_worker(request: Path, result: Path) -> None:
    sys.path[:0] = [str(p) for p in TESTS]
    import engine_worker

    engine_worker.main(str(request), str(result))


# ---- compare: after serve, anywhere ----


def compare(out: Path, fixtures: Path) -> list[dict]:
    sys.path[:0] = [str(p) for p in TESTS]
    import torch
    from modelopt_reference import deviation
    from sglang_support import prompt_ids
    from test_sglang_fixtures import CASES, W4A4, Case

    import lazyxform

    # Fixtures this harness serves beyond the CPU engine tests' (those run one per architecture and
    # recipe that matters there): the reference options and bound of tests/vllm/test_vllm_fixtures.py.
    cases = {**CASES, "phi3_nvfp4": W4A4, "lm_head_nvfp4": W4A4, "phi3_fp8": Case(), "deepseek_v3_fp8": Case(), "lm_head_fp8": Case()}

    runs = json.loads((out / "runs.json").read_text())
    results = {r["name"]: torch.load(out / f"{r['name']}.pt", weights_only=False) for r in runs if r["rc"] == 0}
    for run in runs:
        got = results.get(run["name"])
        if got is None:
            continue
        path = fixtures / run["fixture"]
        run["kernels"] = {
            p.name: json.loads(p.read_text()) for p in sorted(out.glob(f"{run['name']}.kernels.gpu*.json"))
        }
        ids = prompt_ids(out / "fixtures" / run["fixture"])
        case = cases[run["fixture"]]
        options, bound = case.reference, case.bound
        gpu = run.get("capability", RECORDED_BEFORE)
        algos = lazyxform.read_modelopt_algos(path)
        if gpu is not None and tuple(gpu) < (10, 0) and algos and algos <= MARLIN_FP4_ALGOS:
            options, bound = {**case.reference, "quantize_activations": False}, WEIGHT_ONLY_BOUND
        run.update(deviation(path, ids, got["logprobs"], options, bound))
        twin = f"{run['fixture']}-all"
        if run["route"] == "off" and twin in results:
            a, b = results[twin]["logprobs"], got["logprobs"]
            run.update(twin=twin, identical=bool(torch.equal(a, b)), twin_max_diff=float((a - b).abs().max()))
    (out / "runs.json").write_text(json.dumps(runs, indent=2))
    (out / "table.md").write_text(table(runs))
    return runs


def short_kernels(kernels: dict[str, dict[str, list[str]]]) -> str:
    """One cell: rank 0's layer kinds and their distinct descriptions (kernels: each rank's description file)."""
    return gpu_fixtures.short_kernels(next(iter(kernels.values()), {}))


def table(runs: list[dict]) -> str:
    lines = [
        "| run | max / mean \\|dlogprob\\| | bf16 noise max / mean | bound | within | identical to lazyxform | layers: method > scheme > kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "max" not in r:
            lines.append(f"| {r['name']} | {r.get('error', 'no result').replace('|', '/')} | | | | | |")
            continue
        ident = ("yes" if r["identical"] else f"no (max {r['twin_max_diff']:.3g})") if "identical" in r else "n.a."
        lines.append(
            f"| {r['name']} | {r['max']:.4f} / {r['mean']:.5f} | {r['noise_max']:.4f} / {r['noise_mean']:.5f} | "
            f"{r['bound']}x | {'yes' if r['within'] else 'NO'} | {ident} | {short_kernels(r.get('kernels', {}))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="every run, one engine per process, then compare")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--fixtures", type=Path, default=FIXTURES)
    s.add_argument("--only", nargs="*", default=["int4_awq", "int8_sq", "fp8_pc_pt", "nvfp4", "fp8", "w4a16_nvfp4", "phi3_nvfp4", "lm_head_nvfp4"])
    s.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (SGLang's CPU engine)")
    s.add_argument("--tp-size", type=int, default=1)
    s.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    s.add_argument("--jobs", type=int, default=1, help="engines at once")
    c = sub.add_parser("compare", help="deviation from the reference, bounds, native twins, table")
    c.add_argument("out", type=Path)
    c.add_argument("--fixtures", type=Path, default=FIXTURES)
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("request", type=Path)
    w.add_argument("result", type=Path)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.out, args.fixtures.resolve(), args.only, args.device, args.tp_size, args.timeout, args.jobs)
        print(table(compare(args.out, args.fixtures.resolve())))
    elif args.command == "compare":
        print(table(compare(args.out, args.fixtures.resolve())))
    else:
        run_worker(args.request, args.result)


if __name__ == "__main__":
    main()
