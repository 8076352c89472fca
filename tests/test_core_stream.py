"""`wrap` in any order == iterating `open`; planning reads no tensor data; iteration holds one group."""

from __future__ import annotations

import random
import weakref

import pytest
import torch
from reference import FIXTURES, load_tensors

import lazyxform
from lazyxform.reader import ShardReader

CORE_FIXTURES = ["fp8", "fp8_kv_fp8", "fp8_pc_pt", "fp8_2d_blockwise_wo", "int8_default", "int8_sq", "int8_wo", "qwen3moe_fp8"]


@pytest.mark.parametrize("fixture", CORE_FIXTURES)
def test_wrap_over_a_shuffled_stream_equals_open(fixture):
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    pairs = list(load_tensors(FIXTURES / fixture).items())
    random.Random(fixture).shuffle(pairs)
    wrapped = list(ck.wrap(pairs))
    direct = list(ck)
    assert len(wrapped) == len(direct) == len(dict(direct))
    direct_by_name = dict(direct)
    for name, tensor in wrapped:
        assert tensor.dtype == direct_by_name[name].dtype and torch.equal(tensor, direct_by_name[name]), name


def test_open_builds_the_plan_from_headers_alone(monkeypatch):
    def refuse(self, info):
        raise AssertionError(f"read {info.name} while planning")

    monkeypatch.setattr(ShardReader, "read", refuse)
    ck = lazyxform.open(FIXTURES / "int8_sq", device="cpu")
    assert ck.plan.modules and ck.quantization_config["config_groups"]
    with pytest.raises(AssertionError, match="while planning"):
        next(iter(ck))


def test_iteration_holds_at_most_one_group_of_inputs(monkeypatch):
    live: weakref.WeakSet = weakref.WeakSet()
    original = ShardReader.read

    def tracked(self, info):
        t = original(self, info)
        live.add(t)
        return t

    monkeypatch.setattr(ShardReader, "read", tracked)
    ck = lazyxform.open(FIXTURES / "qwen3moe_fp8", device="cpu")
    largest_group = max(len(g.inputs) for g in ck.plan.groups)
    peak = 0
    for _name, tensor in ck:
        del tensor
        peak = max(peak, len(live))
    assert 1 <= peak <= largest_group


def test_an_incomplete_stream_names_what_is_missing():
    ck = lazyxform.open(FIXTURES / "fp8", device="cpu")
    pairs = [(k, v) for k, v in load_tensors(FIXTURES / "fp8").items() if k != "model.layers.1.self_attn.k_proj.input_scale"]
    with pytest.raises(lazyxform.MissingTensorError, match=r"model\.layers\.1\.self_attn\.k_proj\.input_scale"):
        list(ck.wrap(pairs))


def test_wrap_rejects_a_tensor_that_contradicts_the_header():
    ck = lazyxform.open(FIXTURES / "fp8_pc_pt", device="cpu")
    bad = [("model.layers.0.mlp.up_proj.weight_scale", torch.ones(3))]
    with pytest.raises(lazyxform.TensorMismatchError, match=r"float32 \[3\].*model\.safetensors"):
        list(ck.wrap(bad))


def test_sharded_checkpoint_streams_like_the_single_file(tmp_path):
    from helpers import copy_fixture, shard_checkpoint

    ckpt = copy_fixture("int8_sq", tmp_path)
    single = dict(lazyxform.open(ckpt, device="cpu"))
    shard_checkpoint(ckpt, 3)
    ck = lazyxform.open(ckpt, device="cpu")
    assert len({i.file.name for i in ck.plan.tensors.values()}) == 3
    sharded = dict(ck)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
