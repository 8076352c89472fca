"""The GPU load path's logic, run on the CPU so that CI checks it: groups run in batches with their
value checks settled one batch late (stream.py, checks.py) give the same bits and the same errors
as running each group at once; the INT4 Triton kernel, interpreted, gives the torch ops' bits."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import copy_fixture, edit_json, rewrite_tensors, same_bits
from reference import FIXTURES, load_tensors

import lazyxform
from lazyxform.stream import rewrite

FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")  # NVFP4_SVD is dequantized
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
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
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_rules_run_together_give_each_rules_own_bits(fixture):
    """A batch runs rules that share a `many` (INT4 repacks, scale conversions) in a few launches;
    the result must be what each rule's own function gives."""
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    tensors = load_tensors(FIXTURES / fixture)
    one_by_one = {n: t for g in ck.plan.groups for n, t in g.run({i: tensors[i] for i in g.inputs}).items()}
    together = [p for p in rewrite(ck.plan, tensors.items(), ck.device, batch_bytes=1 << 40) if p[0] in one_by_one]
    assert any(r.many for g in ck.plan.groups for r in g.rules) or fixture.startswith(("fp8", "mx", "w4a8_mx", "nvfp4_svd"))
    assert sorted(n for n, _ in together) == sorted(one_by_one)
    for name, tensor in together:
        assert same_bits(tensor, one_by_one[name]), name


def test_int4_repacks_run_together_for_mixed_widths_and_experts():
    from lazyxform.ops.int4 import int4_rows_to_ct_packed_many, int4_rows_to_ct_packed_torch

    g = torch.Generator().manual_seed(1)
    shapes = [(4, 16), (3, 2, 16), (8, 40), (1, 16), (5, 40)]
    xs = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    for x, got in zip(xs, int4_rows_to_ct_packed_many(xs), strict=True):
        assert torch.equal(got, int4_rows_to_ct_packed_torch(x)), x.shape


def test_a_scale_the_model_dtype_cannot_hold_is_refused(tmp_path):
    """fp32 70000 is a valid scale, but becomes inf in a float16 model's weight_scale."""
    ckpt = copy_fixture("int4_awq", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.update(torch_dtype="float16", dtype="float16"))

    def edit(t):
        s = t["model.layers.0.self_attn.q_proj.weight_scale"].clone()
        s[3, 0] = 70000.0
        t["model.layers.0.self_attn.q_proj.weight_scale"] = s

    rewrite_tensors(ckpt, edit)
    ck = lazyxform.open(ckpt, device="cpu")
    for batch_bytes in (0, 1 << 40):
        with pytest.raises(lazyxform.BadScaleError, match=r"q_proj\.weight_scale: 1 of .* index \[3, 0\]: inf"):
            list(rewrite(ck.plan, load_tensors(ckpt).items(), ck.device, batch_bytes=batch_bytes))


def poison_scale(tmp_path, fixture: str, name: str, index: int | tuple[int, ...], value: float):
    ckpt = copy_fixture(fixture, tmp_path)

    def edit(t):
        s = t[name].clone()
        s[index] = value
        t[name] = s

    rewrite_tensors(ckpt, edit)
    return lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize("batch_bytes", [1, 100_000, 1 << 40])
def test_a_bad_scale_raises_the_same_error_in_batches(tmp_path, batch_bytes):
    ck = poison_scale(tmp_path, "int8_default", "model.layers.1.mlp.down_proj.weight_scale", 7, float("nan"))
    with pytest.raises(lazyxform.BadScaleError, match=r"down_proj\.weight_scale: 1 of 256 .* index \[7\]"):
        list(rewrite(ck.plan, load_tensors(ck.path).items(), ck.device, batch_bytes=batch_bytes))


def test_differing_fused_scales_raise_in_batches(tmp_path):
    ck = poison_scale(tmp_path, "nvfp4", "model.layers.0.self_attn.v_proj.weight_scale_2", (), 1.0)
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"q_proj\.weight_scale_2 and .*v_proj\.weight_scale_2 differ"):
        list(rewrite(ck.plan, load_tensors(ck.path).items(), ck.device, batch_bytes=100_000))


def test_a_deferred_warning_is_still_given(tmp_path):
    ck = poison_scale(tmp_path, "fp8", "model.layers.0.self_attn.k_proj.input_scale", (), 1.0)
    with pytest.warns(lazyxform.LazyxformWarning, match=r"fused .*q_proj\.input_scale.*k_proj\.input_scale.*using their max"):
        list(rewrite(ck.plan, load_tensors(ck.path).items(), ck.device, batch_bytes=100_000))


INTERPRETED = textwrap.dedent(
    """
    import torch
    from lazyxform.ops.int4 import int4_rows_to_ct_packed_torch
    from lazyxform.ops.int4_triton import int4_rows_to_ct_packed_triton
    g = torch.Generator().manual_seed(0)
    for shape in [(6, 40), (3, 5, 16), (16, 256), (2, 7, 8), (0, 8), (9, 136)]:
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        a, b = int4_rows_to_ct_packed_torch(x), int4_rows_to_ct_packed_triton(x)
        assert a.shape == b.shape and torch.equal(a, b), shape
    x = torch.randint(0, 256, (8 * 64 + 1,), dtype=torch.uint8, generator=g)[1:].reshape(8, 64)  # not 8-byte aligned
    assert torch.equal(int4_rows_to_ct_packed_torch(x), int4_rows_to_ct_packed_triton(x))
    print("same bits")
    """
)


def test_int4_triton_kernel_interpreted_matches_torch_ops():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "same bits" in run.stdout, run.stderr[-2000:]
