"""lazyxform/shards.py: safetensors headers and HF-style index files. Hostile files and indexes:
test_hardening.py and test_fuzz.py."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_fixture, shard_checkpoint

import lazyxform


def test_truncated_safetensors(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(lazyxform.CorruptSafetensorsError, match=r"model\.safetensors: tensor '.*' ends at byte \d+ of the data section, which has only \d+ bytes \(truncated"):
        lazyxform.open(ckpt, device="cpu")


def test_sharded_checkpoint_streams_like_the_single_file(tmp_path):
    ckpt = copy_fixture("int8_sq", tmp_path)
    single = dict(lazyxform.open(ckpt, device="cpu"))
    shard_checkpoint(ckpt, 3)
    ck = lazyxform.open(ckpt, device="cpu")
    assert len({i.file.name for i in ck.plan.tensors.values()}) == 3
    sharded = dict(ck)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
