"""benchmarks/make_checkpoint.py writes what ModelOpt writes: at the bundled fixtures' tiny shape,
the same config files byte for byte and the same safetensors headers (names, dtypes, shapes,
offsets); sharded like save_pretrained; and lazyxform streams it."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from reference import FIXTURES

import lazyxform
from lazyxform.reader import Reader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import make_checkpoint  # noqa: E402


def raw_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


@pytest.mark.parametrize("fmt", make_checkpoint.FORMATS)
def test_synthetic_checkpoint_has_modelopts_format(tmp_path, fmt):
    make_checkpoint.write_checkpoint(fmt, tmp_path, make_checkpoint.FIXTURE, device="cpu")
    real = FIXTURES / fmt
    for name in ("config.json", "hf_quant_config.json", "generation_config.json"):
        assert (tmp_path / name).read_text() == (real / name).read_text(), name
    assert raw_header(tmp_path / "model.safetensors") == raw_header(real / "model.safetensors")


@pytest.mark.parametrize("fmt", make_checkpoint.FORMATS)
def test_sharded_like_save_pretrained_and_streams(tmp_path, fmt):
    dims = replace(make_checkpoint.FIXTURE, layers=3)
    total = make_checkpoint.write_checkpoint(fmt, tmp_path, dims, shard_bytes=700_000, device="cpu")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)] and len(shards) > 2
    assert index["metadata"]["total_size"] == total and set(index["weight_map"].values()) == set(shards)
    ck = lazyxform.open(tmp_path, device="cpu")
    out = dict(ck)  # valid values: every scale check passes
    assert len(out) == len(ck.plan.passthrough) + sum(len(g.outputs) for g in ck.plan.groups)
    assert len(ck.plan.modules) == 7 * dims.layers
    order = ck.read_order()
    assert sorted(n for n, _ in Reader(order, "cpu", staging_bytes=1 << 18)) == sorted(i.name for i in order)
