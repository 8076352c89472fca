"""Load-time benchmarks on one GPU, all in one run, every ratio against a baseline of the same run.

    python benchmarks/bench_load.py --data benchmarks/data --out OUT_DIR

1. ceilings: pinned and pageable host->device copies, device-to-device copy (read + write);
2. kernels: each distinct transform of each format's plan on its largest full-size tensors,
   GB/s (read + write) against the copy ceiling; the INT4 repack as Triton and as eager torch ops;
3. loads of full-size Llama-3-8B-shaped checkpoints (made by make_checkpoint.py unless present)
   from the page cache: the bare vLLM-style iterator (safe_open per shard, get_tensor, copy to
   cuda); the same wrapped by lazyxform (`ck.wrap`); lazyxform's reader alone; `iter(lazyxform.open)`
   (reader + transforms); safetensors `load_file(device="cuda")`;
4. the reader's settings (threads, chunk, staging) and the host-side read ceiling;
5. bits: GPU iteration == CPU iteration, every tensor of a one-layer checkpoint per format;
6. load profiles (`lazyxform profile` and the wrap path through `maybe_profile`).
Prints the tables last and writes results.json (raw times) into OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from time import perf_counter

import torch
from make_checkpoint import FORMATS, LLAMA3_8B, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

import lazyxform
from lazyxform import profile
from lazyxform.checks import collect
from lazyxform.ops.int4 import int4_rows_to_ct_packed_torch
from lazyxform.ops.int4_triton import int4_rows_to_ct_packed_triton
from lazyxform.ops.pack import shape_tensor
from lazyxform.reader import DEFAULT_CHUNK_BYTES, DEFAULT_STAGING_BYTES, DEFAULT_THREADS, Reader, ShardReader

CUDA = torch.device("cuda")
Pair = tuple[str, torch.Tensor]
RESULTS: dict = {}
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def sync_time(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = perf_counter()
    fn()
    torch.cuda.synchronize()
    return perf_counter() - start


def event_time(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call, device time of `iters` back-to-back calls (after a warm-up). The GPU is
    held busy while the calls are queued, so a slow launch cannot stretch the device time."""
    fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time, longer than queueing the calls
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1000 / iters)
    return statistics.median(samples)


def drain(pairs: Iterable[Pair]) -> int:
    n = 0
    for _name, t in pairs:
        n += t.nbytes
    return n


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one part; a failure is reported and the run goes on."""
    say(f"\n== {name}")
    start = perf_counter()
    try:
        fn()
    except Exception:
        say(f"FAILED: {traceback.format_exc()}")
        RESULTS.setdefault("failures", []).append(name)
    say(f"({perf_counter() - start:.1f} s)")


# ---- 1. ceilings -------------------------------------------------------------------------------


def ceilings() -> None:
    n = 1 << 30
    pinned = torch.randint(0, 256, (n,), dtype=torch.uint8).pin_memory()
    pageable = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dev = torch.empty(n, dtype=torch.uint8, device=CUDA)
    other = torch.empty_like(dev)
    c = {
        "pinned_h2d": n / event_time(lambda: dev.copy_(pinned, non_blocking=True), 3),
        "pageable_h2d": n / statistics.median(sync_time(lambda: dev.copy_(pageable)) for _ in range(3)),
        "d2d_read_write": 2 * n / event_time(lambda: other.copy_(dev), 10),
    }
    RESULTS["ceilings"] = c
    for k, v in c.items():
        say(f"{k:<16} {v / 1e9:8.1f} GB/s")


# ---- 2. kernels --------------------------------------------------------------------------------


def rotating(tensors: dict[str, torch.Tensor], at_least: int = 256 << 20) -> list[dict[str, torch.Tensor]]:
    """Copies of the inputs, enough that cycling through them does not run from L2 (50 MB)."""
    size = max(1, sum(t.nbytes for t in tensors.values()))
    return [{k: v.clone() for k, v in tensors.items()} for _ in range(min(64, max(2, at_least // size)))]


def kernel_rate(fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], inputs: dict[str, torch.Tensor]) -> dict:
    """Device time per call (back to back), host time per call (launch cost), bytes read + written."""
    sets = rotating(inputs)
    outputs = fn(sets[0])
    out_bytes = sum(t.nbytes for t in outputs.values())
    views = {t.data_ptr() for t in outputs.values()} <= {t.data_ptr() for t in sets[0].values()}
    i = [0]

    def once() -> None:
        i[0] += 1
        with collect():  # in a load, checks are computed and read back per batch, not per call
            fn(sets[i[0] % len(sets)])

    device_s = event_time(once, 50)
    torch.cuda.synchronize()
    start = perf_counter()
    for _ in range(100):
        once()
    host_s = (perf_counter() - start) / 100
    torch.cuda.synchronize()
    return {"device_s": device_s, "host_s": host_s, "bytes": sum(t.nbytes for t in inputs.values()) + out_bytes, "no_device_work": views}


def kernels(data: Path) -> None:
    copy = RESULTS["ceilings"]["d2d_read_write"]
    rows = []
    x = torch.randint(0, 256, (LLAMA3_8B.intermediate // 2, LLAMA3_8B.hidden), dtype=torch.uint8, device=CUDA)
    same = torch.empty(x.numel() // 4, dtype=torch.int32, device=CUDA)
    variants = [
        ("device copy, same bytes as the int4 repack", lambda w: same.copy_(w.view(torch.int32).reshape(-1))),
        ("int4 repack 14336x4096, eager torch ops", int4_rows_to_ct_packed_torch),
    ]
    for br, bw, warps in [(8, 128, 4), (16, 128, 8), (16, 64, 4), (32, 64, 4), (16, 64, 8)]:
        variants.append((f"int4 repack 14336x4096, Triton rows={br} words={bw} warps={warps}", partial(int4_rows_to_ct_packed_triton, block_rows=br, block_words=bw, num_warps=warps)))
    variants.append(("int4 repack 14336x4096, Triton (default)", int4_rows_to_ct_packed_triton))
    want = int4_rows_to_ct_packed_torch(x.cpu())
    for label, f in variants:
        assert label.startswith("device copy") or torch.equal(f(x).cpu(), want), label
        rows.append((label, kernel_rate(lambda s, f=f: {"out": f(s["w"])}, {"w": x})))
    for fmt in FORMATS:
        ck = lazyxform.open(data / fmt, device=CUDA)
        largest: dict[str, object] = {}
        for g in ck.plan.groups:
            stage = profile.rule_stage(r.label for r in g.rules)
            size = sum(ck.plan.tensors[n].nbytes for n in g.inputs)
            if stage not in largest or size > largest[stage][0]:  # type: ignore[index]
                largest[stage] = (size, g)
        reader = ShardReader()
        for stage, (_, g) in largest.items():  # type: ignore[misc]
            inputs = {n: reader.read(ck.plan.tensors[n]).to(CUDA) for n in g.inputs}
            shapes = ", ".join(f"{list(v.shape)}" for v in inputs.values())
            rows.append((f"{fmt} {stage.removeprefix('transform: ')} {shapes}", kernel_rate(g.run, inputs)))
        reader.close()
    RESULTS["kernels"] = [{"kernel": k, **r, "gbps": r["bytes"] / r["device_s"] / 1e9, "of_copy": r["bytes"] / r["device_s"] / copy} for k, r in rows]
    say(f"{'kernel (inputs)':<100} {'MB r+w':>8} {'dev us':>8} {'host us':>8} {'GB/s':>8} {'/copy':>6}")
    for k, r in rows:
        b, t = r["bytes"], r["device_s"]
        rate = f"{b / t / 1e9:8.1f} {b / t / copy:6.2f}" if not r["no_device_work"] else f"{'views':>8} {'-':>6}"
        say(f"{k[:100]:<100} {b / 1e6:8.1f} {t * 1e6:8.1f} {r['host_s'] * 1e6:8.1f} {rate}")


def host_cost(fn: Callable[[], object], n: int = 300) -> float:
    """Host seconds per call (launch cost), calls queued back to back."""
    fn()
    torch.cuda.synchronize()
    start = perf_counter()
    for _ in range(n):
        fn()
    spent = (perf_counter() - start) / n
    torch.cuda.synchronize()
    return spent


def host_costs(data: Path) -> None:
    """What one call costs the host: the budget of the wrap overhead is spent here."""
    x = torch.randint(0, 256, (LLAMA3_8B.intermediate // 2, LLAMA3_8B.hidden), dtype=torch.uint8, device=CUDA)
    small = torch.ones(16, device=CUDA)
    side = torch.cuda.Stream()
    costs = {
        "torch.empty 1 MiB on cuda": lambda: torch.empty(1 << 20, dtype=torch.uint8, device=CUDA),
        "tiny torch op (add_)": lambda: small.add_(1),
        "tensor.view(int64)": lambda: x.view(torch.int64),
        "tensor.to(cuda) of a cuda tensor": lambda: x.to(CUDA, non_blocking=True),
        "shape_tensor (torch.tensor + .to)": lambda: shape_tensor((14336, 4096), CUDA),
        "cuda event record": lambda: torch.cuda.current_stream().record_event(),
        "stream.wait_stream": lambda: side.wait_stream(torch.cuda.current_stream()),
        "tensor.record_stream": lambda: small.record_stream(side),
        "int4 repack, Triton, whole call": lambda: int4_rows_to_ct_packed_triton(x),
    }
    for fmt in FORMATS:
        ck = lazyxform.open(data / fmt, device=CUDA)
        reader = ShardReader()
        seen = set()
        for g in ck.plan.groups:
            stage = profile.rule_stage(r.label for r in g.rules)
            if stage not in seen:
                seen.add(stage)
                inputs = {n: reader.read(ck.plan.tensors[n]).to(CUDA) for n in g.inputs}

                def run(g=g, inputs=inputs) -> None:
                    with collect():
                        g.run(inputs)

                costs[f"{fmt} rule {stage.removeprefix('transform: ')[:70]}"] = run
        reader.close()
    RESULTS["host_costs_us"] = {k: host_cost(f) * 1e6 for k, f in costs.items()}
    for k, us in RESULTS["host_costs_us"].items():
        say(f"{k:<100} {us:8.1f} us")


def first_load_seconds(path: str) -> float:
    """Worker (a fresh process): seconds of `iter(lazyxform.open(path))` on the GPU, its first load."""
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    ck = lazyxform.open(path, device="cuda")
    start = perf_counter()
    drain(ck)
    torch.cuda.synchronize()
    return perf_counter() - start


def worker(*args: str) -> list[str]:
    """`bench_load.py worker ...` in a fresh process: its printed words."""
    run = subprocess.run([sys.executable, __file__, "worker", *args], capture_output=True, text=True, check=True)
    return run.stdout.split()


def cold_opens(data: Path) -> None:
    """`iter(lazyxform.open(...))` as the first load of a fresh process: pinning the staging
    buffer is paid here (Triton's compiled kernel comes from its disk cache, as on any later start)."""
    out = {}
    for fmt in FORMATS:
        out[fmt] = float(worker("first-load", str(data / fmt))[-1])
        say(f"{fmt}: first load of a fresh process {out[fmt]:.3f} s")
    RESULTS["cold_open_s"] = out


def pin_seconds(n: int, parts: int, how: str) -> tuple[float, float]:
    """Worker (a fresh process, whose caching host allocator is empty): seconds to pin `n` bytes in
    `parts` buffers `how`, and to unpin them (0 for cudaHostAlloc, freed by the allocator)."""
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    start = perf_counter()
    if how == "cudaHostAlloc":
        pinned = [torch.empty(n // parts, dtype=torch.uint8, pin_memory=True) for _ in range(parts)]
        alloc = perf_counter() - start
        del pinned  # back to the caching host allocator, still pinned: nothing to time
        return alloc, 0.0
    buf = torch.empty(n, dtype=torch.uint8)
    if how == "touch+register":
        buf.fill_(0)
    assert torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), n, 0) == 0
    alloc = perf_counter() - start
    start = perf_counter()
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    return alloc, perf_counter() - start


def pin_costs() -> None:
    """Pinning staging memory in a fresh process (the caching host allocator is empty there)."""
    out = {}
    for n, parts, how in [(512 << 20, 16, "cudaHostAlloc"), (512 << 20, 1, "cudaHostAlloc"), (256 << 20, 8, "cudaHostAlloc"), (512 << 20, 1, "register"), (512 << 20, 1, "touch+register")]:
        alloc, free = map(float, worker("pin", str(n), str(parts), how)[-2:])
        out[f"{n >> 20} MiB as {parts} x {how}"] = {"alloc_s": alloc, "free_s": free}
        say(f"{n >> 20:>5} MiB as {parts:>2} x {how:<15}: {alloc * 1e3:7.1f} ms ({n / alloc / 1e9:5.1f} GB/s), unpin {free * 1e3:6.1f} ms")
    RESULTS["pin_costs"] = out


# ---- 3. loads ----------------------------------------------------------------------------------


def shard_files(path: Path) -> list[str]:
    return sorted(str(p) for p in path.glob("*.safetensors"))


def bare(files: list[str]) -> Iterator[Pair]:
    """vLLM's default safetensors_weights_iterator, plus the copy to the GPU its weight loaders do."""
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118
                yield name, sf.get_tensor(name).to(CUDA)


def load_runs(path: Path, reps: int) -> dict:
    files = shard_files(path)
    ck = lazyxform.open(path, device=CUDA)
    order = ck.read_order()
    runs: dict[str, list[float]] = {k: [] for k in ("bare", "wrapped", "reader", "open", "load_file")}
    drain(bare(files))  # page cache and Triton warm-up
    drain(ck.wrap(bare(files)))
    for _ in range(reps):  # alternated, so that drift hits both alike
        runs["bare"].append(sync_time(lambda: drain(bare(files))))
        runs["wrapped"].append(sync_time(lambda: drain(ck.wrap(bare(files)))))
    # The wrap's own cost without the noise of reading files: the same tensors, already on the GPU.
    loaded = list(bare(files))
    runs["replay_bare"] = [sync_time(lambda: drain(iter(loaded))) for _ in range(reps)]
    runs["replay_wrapped"] = [sync_time(lambda: drain(ck.wrap(iter(loaded)))) for _ in range(reps)]
    loaded.clear()
    for _ in range(reps):
        runs["reader"].append(sync_time(lambda: drain(Reader(order, CUDA))))
        runs["open"].append(sync_time(lambda: drain(ck)))
    for _ in range(2):
        runs["load_file"].append(sync_time(lambda: [load_file(f, device="cuda") for f in files]))
    size = sum(i.nbytes for i in order)
    return {"bytes": size, "runs": runs, "median": {k: statistics.median(v) for k, v in runs.items()}}


def loads(data: Path, reps: int) -> None:
    RESULTS["loads"] = {}
    for fmt in FORMATS:
        r = RESULTS["loads"][fmt] = load_runs(data / fmt, reps)
        say(f"{fmt}: {r['bytes'] / 1e9:.2f} GB; " + "; ".join(f"{k} {', '.join(f'{t:.3f}' for t in v)} s" for k, v in r["runs"].items()))


# ---- 4. reader settings ------------------------------------------------------------------------


def host_read_rate(files: list[str], threads: int, chunk: int) -> float:
    """Page cache -> pinned memory with `threads` preadv workers, no device copy: the host ceiling."""
    jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), chunk)]
    bufs = [memoryview(torch.empty(chunk, dtype=torch.uint8, pin_memory=True).numpy()) for _ in range(threads)]

    def work(w: int) -> None:
        fds: dict[str, int] = {}
        for f, off in jobs[w::threads]:
            fd = fds.get(f) or fds.setdefault(f, os.open(f, os.O_RDONLY))
            os.preadv(fd, [bufs[w]], off)
        for fd in fds.values():
            os.close(fd)

    total = sum(os.path.getsize(f) for f in files)
    start = perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return total / (perf_counter() - start)


def reader_settings(data: Path) -> None:
    path = data / "int4_awq"
    files = shard_files(path)
    ck = lazyxform.open(path, device=CUDA)
    order = ck.read_order()
    size = sum(i.nbytes for i in order)
    host = {t: host_read_rate(files, t, 32 << 20) / 1e9 for t in (1, 8, 16, 24, 32)}
    say("host read ceiling (page cache -> pinned, 32 MiB preadv): " + ", ".join(f"{t} threads {g:.1f} GB/s" for t, g in host.items()))
    grid = [(16, 16, 256), (16, 8, 256), (12, 16, 256), (24, 16, 384), (16, 32, 256), (16, 16, 512), (16, 32, 512), (8, 16, 256)]
    sweep = []
    for threads, chunk_mb, staging_mb in grid:
        reader = Reader(order, CUDA, staging_mb << 20, chunk_mb << 20, threads)
        times = [sync_time(lambda: drain(reader)) for _ in range(3)]  # noqa: B023 (called at once)
        sweep.append({"threads": threads, "chunk_mb": chunk_mb, "staging_mb": staging_mb, "first_s": times[0], "gbps": size / min(times[1:]) / 1e9})
        say(f"reader threads={threads:<3} chunk={chunk_mb:>3} MiB staging={staging_mb:>5} MiB: first {size / times[0] / 1e9:5.1f} GB/s, then {sweep[-1]['gbps']:5.1f} GB/s")
    RESULTS["reader_settings"] = {"host_read_gbps": host, "sweep": sweep}


# ---- 5. bits -----------------------------------------------------------------------------------


def bits(data: Path) -> None:
    """GPU iteration == CPU iteration, byte for byte, for every tensor of one full-width layer."""
    for fmt in FORMATS:
        small = data / f"{fmt}-1layer"
        if not small.exists():
            write_checkpoint(fmt, small, replace(LLAMA3_8B, layers=1, vocab=1024))
        gpu = {n: t.cpu() for n, t in lazyxform.open(small, device=CUDA)}
        cpu = dict(lazyxform.open(small, device="cpu"))
        wrapped = {n: t.cpu() for n, t in lazyxform.open(small, device=CUDA).wrap(bare(shard_files(small)))}
        bad = [n for n in cpu if n not in gpu or not _same_bytes(cpu[n], gpu[n]) or not _same_bytes(cpu[n], wrapped[n])]
        bad += sorted(gpu.keys() ^ cpu.keys())
        RESULTS.setdefault("bits", {})[fmt] = {"tensors": len(cpu), "different": bad}
        say(f"{fmt}: {len(cpu)} tensors, GPU open / GPU wrap vs CPU: {'identical' if not bad else f'DIFFERENT {bad[:5]}'}")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ---- 6. profiles -------------------------------------------------------------------------------


def profiles(data: Path, out: Path) -> None:
    path = data / "int4_awq"
    ck = lazyxform.open(path, device=CUDA)
    prof = profile.Profiler(CUDA, ck.nbytes, label=f"{path.name} open")
    drain(prof.iterate(ck))
    report = prof.finish()
    report.write(out / "profile_open", "profile")
    say(report.table())
    os.environ[profile.ENV] = str(out / "profile_wrap")
    drain(profile.maybe_profile(ck.wrap(bare(shard_files(path))), ck.device, ck.nbytes, ck.path.name))
    del os.environ[profile.ENV]
    say((next((out / "profile_wrap").glob("*.txt"))).read_text())


# ---- summary -----------------------------------------------------------------------------------


def summary() -> None:
    c = RESULTS.get("ceilings", {})
    say("\n== SUMMARY (medians; ratios against the bare iterator of the same run)")
    say(f"device {RESULTS['env']['device']}; ceilings: pinned H2D {c.get('pinned_h2d', 0) / 1e9:.1f} GB/s, pageable {c.get('pageable_h2d', 0) / 1e9:.1f} GB/s, device copy {c.get('d2d_read_write', 0) / 1e9:.0f} GB/s (r+w)")
    say(f"{'format':<9} {'GB':>5} {'bare GB/s':>9} {'wrap/bare':>9} {'(pairs min..max)':>16} {'wrap cost ms':>12} {'(% of bare)':>11} {'reader GB/s':>11} {'open GB/s':>9} {'(1st load)':>10} {'open/bare':>9} {'load_file GB/s':>14}")
    cold = RESULTS.get("cold_open_s", {})
    for fmt, r in RESULTS.get("loads", {}).items():
        m, gb, runs = r["median"], r["bytes"] / 1e9, r["runs"]
        pairs = [w / b for w, b in zip(runs["wrapped"], runs["bare"], strict=True)]
        cost = m["replay_wrapped"] - m["replay_bare"]
        say(
            f"{fmt:<9} {gb:5.2f} {gb / m['bare']:9.2f} {m['wrapped'] / m['bare']:9.3f} {f'{min(pairs):.3f}..{max(pairs):.3f}':>16} "
            f"{cost * 1e3:12.1f} {100 * cost / m['bare']:10.1f}% {gb / m['reader']:11.1f} {gb / m['open']:9.1f} {gb / cold.get(fmt, float('inf')):10.1f} {m['open'] / m['bare']:9.3f} {gb / m['load_file']:14.2f}"
        )
    sweep = RESULTS.get("reader_settings", {}).get("sweep", [])
    if sweep:
        best = max(sweep, key=lambda x: x["gbps"])
        say(f"best reader setting: {best}")
    for k in RESULTS.get("kernels", []):
        if "int4 repack" in k["kernel"]:
            say(f"{k['kernel']}: {k['gbps']:.0f} GB/s = {k['of_copy']:.2f} x device copy")
    if RESULTS.get("failures"):
        say(f"FAILED sections: {RESULTS['failures']}")


def main() -> None:
    if sys.argv[1:2] == ["worker"]:  # a fresh process of cold_opens or pin_costs
        kind, *rest = sys.argv[2:]
        print(first_load_seconds(*rest) if kind == "first-load" else " ".join(map(str, pin_seconds(int(rest[0]), int(rest[1]), rest[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--only", nargs="*", help="run only the sections whose names start so (e.g. kernels)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "reader_defaults": {"staging": DEFAULT_STAGING_BYTES, "chunk": DEFAULT_CHUNK_BYTES, "threads": DEFAULT_THREADS},
    }
    say(json.dumps(RESULTS["env"]))

    def generate() -> None:
        for fmt in FORMATS:
            if not (args.data / fmt / "config.json").exists():
                start = perf_counter()
                total = write_checkpoint(fmt, args.data / fmt)
                say(f"generated {fmt}: {total / 1e9:.2f} GB in {perf_counter() - start:.1f} s")

    sections = {
        "generate checkpoints": generate,
        "ceilings": ceilings,
        "kernels": lambda: kernels(args.data),
        "host cost per call": lambda: host_costs(args.data),
        "pinning staging memory, fresh process": pin_costs,
        "loads from the page cache": lambda: loads(args.data, args.reps),
        "first load in a fresh process": lambda: cold_opens(args.data),
        "reader settings": lambda: reader_settings(args.data),
        "bits": lambda: bits(args.data),
        "profiles": lambda: profiles(args.data, args.out),
    }
    for name, run in sections.items():
        if not args.only or any(name.startswith(o) for o in args.only):
            section(name, run)
    summary()
    (args.out / "results.json").write_text(json.dumps(RESULTS, indent=1))
    (args.out / "bench.txt").write_text("\n".join(LINES) + "\n")
    sys.exit(1 if RESULTS.get("failures") else 0)


if __name__ == "__main__":
    main()
