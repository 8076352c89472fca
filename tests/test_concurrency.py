"""Streams fed by several threads, in any order, give exactly the sequential output; a stream
abandoned half way lets go of every buffer and file it held. Exercises checkpoint.py (one
Checkpoint shared by threads), stream.py (wrap) and reader.py (ShardReader, Reader)."""

from __future__ import annotations

import gc
import os
import queue
import random
import threading
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import copy_fixture, shard_checkpoint
from reference import FIXTURES, load_tensors
from safetensors import safe_open

import lazyxform
from lazyxform.reader import Reader, ShardReader

# Norm and row folds, fused global scales, many experts, the dequantize fallback.
FIXTURES_UNDER_TEST = ["int8_sq", "nvfp4_awq_lite", "qwen3moe_fp8", "nvfp4_svdquant"]


def open_quietly(path: Path) -> lazyxform.Checkpoint:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # NVFP4_SVD is dequantized
        return lazyxform.open(path, device="cpu")


def assert_same_output(got: list[tuple[str, torch.Tensor]], want: dict[str, torch.Tensor]) -> None:
    assert len(got) == len(want) and dict(got).keys() == want.keys()
    for name, tensor in got:
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name


def threaded_pairs(shards: list[Path], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One producer thread per shard, each reading its tensors in its own random order and pausing
    at random: the consumer sees an interleaving that differs run to run."""
    q: queue.Queue = queue.Queue()
    done = object()

    def produce(shard: Path, rng: random.Random) -> None:
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
            rng.shuffle(names)
            for name in names:
                q.put((name, f.get_tensor(name)))
                if rng.random() < 0.3:
                    threading.Event().wait(rng.random() / 1000)
        q.put(done)

    threads = [threading.Thread(target=produce, args=(s, random.Random(seed * 100 + i))) for i, s in enumerate(shards)]
    for t in threads:
        t.start()
    finished = 0
    while finished < len(threads):
        item = q.get()
        if item is done:
            finished += 1
        else:
            yield item
    for t in threads:
        t.join()


@pytest.mark.parametrize("fixture", FIXTURES_UNDER_TEST)
def test_wrap_fed_by_several_threads_equals_the_sequential_run(tmp_path, fixture):
    ckpt = copy_fixture(fixture, tmp_path)
    shard_checkpoint(ckpt, 3)
    ck = open_quietly(ckpt)
    sequential = dict(ck)
    shards = sorted(ckpt.glob("*.safetensors"))
    for seed in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lazyxform.LazyxformWarning)
            assert_same_output(list(ck.wrap(threaded_pairs(shards, seed))), sequential)


@pytest.mark.parametrize("fixture", FIXTURES_UNDER_TEST)
def test_one_checkpoint_streamed_by_many_threads_at_once(fixture):
    """Iterations, wraps of shuffled pairs and pipelined reads (with a staging bound far below the
    checkpoint's size) of one Checkpoint, running side by side, share nothing mutable."""
    ck = open_quietly(FIXTURES / fixture)
    sequential = dict(ck)
    pairs = list(load_tensors(FIXTURES / fixture).items())
    start = threading.Barrier(6)
    results: dict[int, list] = {}

    def stream(i: int) -> None:
        order = pairs[:]
        random.Random(i).shuffle(order)
        start.wait()
        streams = [iter(ck), ck.wrap(order), ck.wrap(Reader(ck.read_order(), "cpu", staging_bytes=1 << 18))]
        results[i] = list(streams[i % 3])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    with warnings.catch_warnings():  # not thread-safe: set once, around all threads
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == list(range(6))
    for got in results.values():
        assert_same_output(got, sequential)


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def tracked(live: weakref.WeakSet, tensor: torch.Tensor) -> torch.Tensor:
    live.add(tensor)
    return tensor


def test_an_abandoned_iteration_releases_its_buffers_and_files(monkeypatch):
    live: weakref.WeakSet = weakref.WeakSet()
    read = ShardReader.read
    monkeypatch.setattr(ShardReader, "read", lambda self, info: tracked(live, read(self, info)))
    ck = lazyxform.open(FIXTURES / "qwen3moe_fp8", device="cpu")
    files_before = open_files()
    it = iter(ck)
    for _ in range(len(ck.plan.groups) // 2):
        next(it)
    assert live and open_files() == files_before + 1  # mid-stream: a group's inputs and the shard
    del it
    gc.collect()
    assert not live and open_files() == files_before


def reading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lazyxform-read")]


def test_an_abandoned_pipelined_read_stops_its_threads_and_frees_its_staging():
    ck = lazyxform.open(FIXTURES / "qwen3moe_fp8", device="cpu")
    files_before = open_files()
    reader = Reader(ck.read_order(), "cpu", staging_bytes=1 << 20)
    stream = ck.wrap(reader)
    for _ in range(len(ck.plan.groups) // 2):
        next(stream)
    slots = weakref.WeakSet(t for t in reader._staging if t is not None)
    assert slots and reading_threads() and open_files() == files_before + 1
    del stream, reader
    gc.collect()
    assert not slots and not reading_threads() and open_files() == files_before


def test_an_abandoned_wrap_releases_the_inputs_it_was_holding():
    ck = lazyxform.open(FIXTURES / "nvfp4", device="cpu")
    pairs = list(load_tensors(FIXTURES / "nvfp4").items())
    random.Random(0).shuffle(pairs)
    live: weakref.WeakSet = weakref.WeakSet()

    stream = ck.wrap((name, tracked(live, tensor.clone())) for name, tensor in pairs)
    for _ in range(len(pairs) // 2):
        next(stream)
    gc.collect()
    assert live  # incomplete groups hold their inputs while the stream is alive
    del stream
    gc.collect()
    assert not live
