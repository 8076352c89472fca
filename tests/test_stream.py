"""lazyxform/stream.py: `rewrite` / `wrap` in any order == iterating `open`; iteration holds one
group of inputs; incomplete or contradicting streams are refused; groups run in batches (the GPU
load path's logic, run on the CPU so that CI checks it) give the bits of running each group, and
each rule, on its own. Deferred value checks in batches: tests/test_checks.py."""

from __future__ import annotations

import random
import weakref

import pytest
import torch
from algos import FIXTURE_TABLE, SERVED
from helpers import same_bits
from reference import FIXTURES, load_tensors

import lazyxform
from lazyxform.reader import ShardReader
from lazyxform.stream import rewrite

ALL = SERVED


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")  # NVFP4_SVD is dequantized
@pytest.mark.parametrize("fixture", ALL)
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


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")
@pytest.mark.parametrize("fixture", ALL)
def test_batched_rewrite_equals_one_group_at_a_time(fixture):
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    pairs = list(load_tensors(FIXTURES / fixture).items())
    random.Random(fixture).shuffle(pairs)
    eager = dict(rewrite(ck.plan, pairs, ck.device, batch_bytes=0))
    batched = list(rewrite(ck.plan, pairs, ck.device, batch_bytes=100_000))
    assert len(batched) == len(eager) == len(dict(batched))
    for name, tensor in batched:
        assert same_bits(tensor, eager[name]), name


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")
@pytest.mark.parametrize("fixture", ALL)
def test_rules_run_together_give_each_rules_own_bits(fixture):
    """A batch runs rules that share a `many` (INT4 repacks, scale conversions) in a few launches;
    the result must be what each rule's own function gives. Which fixtures have such rules: the
    `batched` column of tests/algos.py (and every MoE fixture)."""
    row = FIXTURE_TABLE[fixture]
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    tensors = load_tensors(FIXTURES / fixture)
    one_by_one = {n: t for g in ck.plan.groups for n, t in g.run({i: tensors[i] for i in g.inputs}).items()}
    together = [p for p in rewrite(ck.plan, tensors.items(), ck.device, batch_bytes=1 << 40) if p[0] in one_by_one]
    if row.target.batched or row.moe:
        assert any(r.many for g in ck.plan.groups for r in g.rules), "this fixture's rules are batched: the check must see them"
    assert sorted(n for n, _ in together) == sorted(one_by_one)
    for name, tensor in together:
        assert same_bits(tensor, one_by_one[name]), name
