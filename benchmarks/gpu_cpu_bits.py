"""GPU output == CPU output, bit for bit, for every lazyxform transform.

    python benchmarks/gpu_cpu_bits.py

Cases: the pure ops (INT4 row->column repack incl. a full-size 14336x4096 weight and a stacked MoE
one, the W8A16 int32 pack, FP4 global-scale reciprocals over edge values, block-scale splitting,
E2M1 decoding) and every bundled ModelOpt fixture streamed with device="cpu" and device="cuda".
Prints one row per case; exits 1 on any difference, 2 when no CUDA device is present (after
computing every CPU result, so the CPU half is exercised anywhere).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import lazyxform
from lazyxform.ops.fp4 import e2m1_to_float, reciprocal_global_scale, split_block_scales
from lazyxform.ops.int4 import int4_rows_to_ct_packed
from lazyxform.ops.pack import pack_int32_cols

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "modelopt"
Result = dict[str, torch.Tensor]


def op_cases() -> dict[str, Callable[[torch.device], Result]]:
    """Each case maps a device to named outputs computed there from the same CPU-made inputs."""
    g = torch.Generator().manual_seed(0)
    full_int4 = torch.randint(0, 256, (14336 // 2, 4096), dtype=torch.uint8, generator=g)
    moe_int4 = torch.randint(0, 256, (8, 1024 // 2, 512), dtype=torch.uint8, generator=g)
    int8 = torch.randint(-128, 128, (4096, 4096), dtype=torch.int8, generator=g)
    fp8_scales = (torch.rand(14336, 256, generator=g) * 448).to(torch.float8_e4m3fn)
    fp4 = torch.randint(0, 256, (4096, 2048), dtype=torch.uint8, generator=g)
    # Scales ModelOpt writes (amax/448, amax/(6*448)) plus fp32 edge values: subnormal, tiny, huge.
    special = torch.tensor([2.0**-149, 2.0**-126, 1e-30, 1.0, 3.0, 1e30, 3.4e38])
    scalars = torch.cat([torch.rand(4096, generator=g) * 1e-3 + 1e-7, special])

    def on(f: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[torch.device], Result]:
        return lambda dev: {"out": f(*(x.to(dev) for x in inputs))}

    def reciprocals(dev: torch.device) -> Result:
        return {"out": torch.cat([reciprocal_global_scale(s) for s in scalars.to(dev)])}

    return {
        "int4 repack 14336x4096": on(int4_rows_to_ct_packed, full_int4),
        "int4 repack MoE 8x1024x512": on(int4_rows_to_ct_packed, moe_int4),
        "W8A16 pack 4096x4096": on(lambda q: pack_int32_cols(q, 8), int8),
        f"fp4 global-scale reciprocals x{len(scalars)}": reciprocals,
        "fp8 block scales 32->16": on(lambda s: split_block_scales(s, 2), fp8_scales),
        "e2m1 decode 4096x4096": on(e2m1_to_float, fp4),
    }


def fixture_cases() -> dict[str, Callable[[torch.device], Result]]:
    def stream(path: Path) -> Callable[[torch.device], Result]:
        def run(dev: torch.device) -> Result:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # NVFP4_SVD is dequantized
                return {name: t for name, t in lazyxform.open(path, device=dev)}

        return run

    return {f"fixture {p.name}": stream(p) for p in sorted(FIXTURES.iterdir()) if (p / "config.json").is_file() and servable(p)}


def servable(path: Path) -> bool:
    """False, said, for a fixture lazyxform refuses by design (e.g. an NVFP4_AFFINE KV cache)."""
    try:
        lazyxform.open(path, device="cpu")
    except lazyxform.LazyxformError as e:
        print(f"fixture {path.name}: refused, as planned ({type(e).__name__}: {str(e)[:120]})")
        return False
    return True


def timed(run: Callable[[torch.device], Result], dev: torch.device) -> tuple[Result, float]:
    start = time.perf_counter()
    out = run(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {k: v.cpu() for k, v in out.items()}, time.perf_counter() - start


def differences(cpu: Result, gpu: Result) -> list[str]:
    """Names whose dtype, shape or bytes differ (bytes, so NaNs and -0.0 count too)."""
    if cpu.keys() != gpu.keys():
        return [f"names differ: {sorted(cpu.keys() ^ gpu.keys())[:3]}"]
    bad = []
    for name, a in cpu.items():
        b = gpu[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            bad.append(name)
    return bad


def main() -> int:
    cases = {**op_cases(), **fixture_cases()}
    cpu = {name: timed(run, torch.device("cpu")) for name, run in cases.items()}
    if not torch.cuda.is_available():
        print(f"computed {len(cpu)} CPU results; no CUDA device, so nothing was compared")
        return 2
    print(f"{'case':<44} {'tensors':>7} {'MB':>8} {'cpu ms':>8} {'cuda ms':>8}  result")
    failed = 0
    for name, run in cases.items():
        timed(run, torch.device("cuda"))  # warm-up: kernel loading and allocator growth are not the point
        gpu, gpu_s = timed(run, torch.device("cuda"))
        (cpu_out, cpu_s) = cpu[name]
        bad = differences(cpu_out, gpu)
        failed += bool(bad)
        mb = sum(t.numel() * t.element_size() for t in cpu_out.values()) / 2**20
        verdict = "identical" if not bad else f"DIFFERENT: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
        print(f"{name:<44} {len(cpu_out):>7} {mb:>8.1f} {cpu_s * 1e3:>8.1f} {gpu_s * 1e3:>8.1f}  {verdict}")
    print(f"{len(cases) - failed} of {len(cases)} cases bit-identical on {torch.cuda.get_device_name()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
