"""The pipelined reader (the GPU load path) run on the CPU: the same tensors as reading each one
with ShardReader, in file order, whatever the staging size, chunk size and thread count."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import copy_fixture, same_bits, shard_checkpoint
from hypothesis import given
from hypothesis import strategies as st
from reference import FIXTURES

import lazyxform
from lazyxform.errors import CorruptSafetensorsError
from lazyxform.reader import Reader, ShardReader, plan_chunks
from lazyxform.shards import TensorInfo


def read_each(order: list[TensorInfo]) -> list[tuple[str, torch.Tensor]]:
    """ShardReader, in file order."""
    reader = ShardReader()
    try:
        return [(i.name, reader.read(i)) for i in sorted(order, key=lambda i: (str(i.file), i.start))]
    finally:
        reader.close()


def assert_same(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        assert same_bits(a, b), name


@pytest.mark.parametrize(
    ("fixture", "staging", "chunk", "threads"),
    [
        ("int4_awq", 1 << 20, 256 << 10, 4),  # chunks hold many tensors
        ("nvfp4", 8192, 4096, 2),  # large tensors span many chunks
        ("qwen3moe_fp8", 3000, 1001, 3),  # odd sizes: pieces end anywhere
        ("fp8", 3 * 4096 + 5, None, 1),  # default chunk capped at half the staging: two slots
    ],
)
def test_reader_yields_what_shard_reader_reads(fixture, staging, chunk, threads):
    order = lazyxform.open(FIXTURES / fixture, device="cpu").read_order()
    reader = Reader(order, "cpu", staging_bytes=staging, chunk_bytes=chunk, threads=threads)
    assert reader.slots * reader.chunk_bytes <= staging
    assert_same(list(reader), read_each(order))
    assert sum(t.nbytes for t in reader._staging if t is not None) <= staging  # host memory stays bounded


def test_reader_over_shards(tmp_path):
    ckpt = copy_fixture("int4_awq", tmp_path)
    shard_checkpoint(ckpt, 3)
    order = lazyxform.open(ckpt, device="cpu").read_order()
    assert len({i.file for i in order}) == 3
    assert_same(list(Reader(order, "cpu", staging_bytes=64 << 10, chunk_bytes=16 << 10)), read_each(order))


@given(sizes=st.lists(st.integers(0, 50), max_size=12), chunk=st.integers(1, 40), files=st.integers(1, 3))
def test_chunks_cover_every_byte_once_on_a_grid(sizes, chunk, files):
    infos, at = [], {}
    for i, n in enumerate(sizes):  # tensors dealt over `files` shards, back to back in each
        path = FIXTURES / f"shard{i % files}"
        infos.append(TensorInfo(f"t{i}", torch.uint8, (n,), path, at.get(path, 8), at.get(path, 8) + n))
        at[path] = infos[-1].end
    infos.sort(key=lambda i: (str(i.file), i.start))
    covered = {i: 0 for i in range(len(infos))}
    for c in plan_chunks(infos, chunk):
        assert c.start // chunk == (c.end - 1) // chunk or c.start == c.end  # inside one grid cell
        for p in c.pieces:
            info = infos[p.index]
            assert info.file == c.file and p.offset == covered[p.index]  # in order
            assert c.start <= p.file_offset == info.start + p.offset and p.file_offset + p.nbytes <= c.end
            covered[p.index] += p.nbytes
    assert covered == {i: info.nbytes for i, info in enumerate(infos)}


def test_truncated_shard_raises(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    order = lazyxform.open(ckpt, device="cpu").read_order()
    shard = ckpt / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CorruptSafetensorsError, match="inside a tensor"):
        list(Reader(order, "cpu", staging_bytes=1 << 16))


def test_stopping_early_closes_the_files():
    order = lazyxform.open(FIXTURES / "nvfp4", device="cpu").read_order()
    before = set(os.listdir("/proc/self/fd"))
    it = iter(Reader(order, "cpu", staging_bytes=4096, threads=2))
    next(it)
    it.close()
    assert set(os.listdir("/proc/self/fd")) <= before
