"""Streaming a checkpoint far larger than its memory bound stays within that bound (checkpoint.py
iteration, stream.py, reader.py).

Two bounds: iterating on the CPU reads one tensor group at a time, so resident memory above the
baseline stays within a small multiple of the largest group; the pipelined reader of GPU loads
(reader.py, run here on the CPU) adds at most its `staging_bytes`. Measured as resident set size
(torch's CPU allocations are invisible to tracemalloc) in a fresh process whose peak is reset
just before streaming."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lazyxform
from lazyxform.reader import Reader

MODULES, ROWS, COLS, PER_SHARD = 32, 4096, 8192, 4  # 32 fp8 weights of 32 MiB: 1 GiB in 8 shards
MiB = 1 << 20


def write_large_checkpoint(d: Path) -> None:
    """An FP8 ModelOpt export of MODULES down_proj layers, sharded with an index."""
    weight_map = {}
    for first in range(0, MODULES, PER_SHARD):
        shard = f"model-{first // PER_SHARD + 1:05d}-of-{MODULES // PER_SHARD:05d}.safetensors"
        part = {}
        for i in range(first, first + PER_SHARD):
            module = f"model.layers.{i}.mlp.down_proj"
            part[f"{module}.weight"] = torch.full((ROWS, COLS), i + 1, dtype=torch.uint8).view(torch.float8_e4m3fn)
            part[f"{module}.weight_scale"] = torch.tensor(0.01)
            part[f"{module}.input_scale"] = torch.tensor(0.02)
        save_file(part, str(d / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    (d / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8", "exclude_modules": []}}))


def kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def measure(path: str, staging_bytes: int) -> dict[str, int]:
    """In this process: resident bytes before streaming, the peak while streaming, bytes streamed.
    `staging_bytes` 0: plain iteration; else the pipelined reader with that staging bound."""
    ck = lazyxform.open(path, device="cpu")
    stream = ck.wrap(Reader(ck.read_order(), "cpu", staging_bytes)) if staging_bytes else iter(ck)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline, reset_peak = kib("VmRSS"), kib("VmHWM")
    streamed = 0
    for _name, tensor in stream:
        streamed += tensor.numel() * tensor.element_size()
        del tensor
    return {"baseline": baseline, "reset_peak": reset_peak, "peak": kib("VmHWM"), "streamed": streamed}


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("large")
    write_large_checkpoint(d)
    return d


@pytest.mark.parametrize(
    "staging_bytes, groups_allowed",
    [
        (0, 2),  # one group read at a time, plus allocator slack
        (64 * MiB, 3),  # staging, a tensor straddling two staging chunks, the one after it, slack
    ],
    ids=["iteration", "pipelined reader"],
)
def test_streaming_peak_memory_stays_within_the_bound(large_checkpoint, staging_bytes, groups_allowed):
    plan = lazyxform.open(large_checkpoint, device="cpu").plan
    units = [list(g.inputs) for g in plan.groups] + [[n] for n in plan.passthrough]
    largest = max(sum(plan.tensors[n].nbytes for n in unit) for unit in units)
    run = subprocess.run([sys.executable, __file__, str(large_checkpoint), str(staging_bytes)], capture_output=True, text=True, check=True)
    m = json.loads(run.stdout)
    assert m["reset_peak"] - m["baseline"] < 4 * MiB  # the peak was really reset
    bound = staging_bytes + groups_allowed * largest
    assert m["streamed"] >= 6 * bound  # the checkpoint dwarfs the bound
    above = m["peak"] - m["baseline"]
    assert above <= bound, f"peak {above / MiB:.0f} MiB above baseline; bound {bound / MiB:.0f} MiB (largest group {largest / MiB:.0f} MiB)"


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
