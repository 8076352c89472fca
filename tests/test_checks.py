"""lazyxform/checks.py through the stream: a forbidden scale value (NaN, Inf, 0, < 0, or what the
model dtype cannot hold) stops its group with an error naming it, whether checks settle at once or
a batch later (the GPU path's deferred verdicts, run on the CPU). Every scale of every fixture:
test_hardening.py."""

from __future__ import annotations

import pytest
from helpers import copy_fixture, edit_json, rewrite_tensors
from reference import load_tensors

import lazyxform
from lazyxform.stream import rewrite


def poison_scale(tmp_path, fixture: str, name: str, index: int | tuple[int, ...], value: float):
    ckpt = copy_fixture(fixture, tmp_path)

    def edit(t):
        s = t[name].clone()
        s[index] = value
        t[name] = s

    rewrite_tensors(ckpt, edit)
    return lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
def test_forbidden_scale_values_fail_when_streamed(tmp_path, value):
    ck = poison_scale(tmp_path, "int8_default", "model.layers.1.mlp.down_proj.weight_scale", 7, value)
    with pytest.raises(lazyxform.BadScaleError, match=r"down_proj\.weight_scale: 1 of 256 .* index \[7\]"):
        list(ck)


@pytest.mark.parametrize("batch_bytes", [1, 100_000, 1 << 40])
def test_a_bad_scale_raises_the_same_error_in_batches(tmp_path, batch_bytes):
    ck = poison_scale(tmp_path, "int8_default", "model.layers.1.mlp.down_proj.weight_scale", 7, float("nan"))
    with pytest.raises(lazyxform.BadScaleError, match=r"down_proj\.weight_scale: 1 of 256 .* index \[7\]"):
        list(rewrite(ck.plan, load_tensors(ck.path).items(), ck.device, batch_bytes=batch_bytes))


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


def test_differing_fused_scales_raise_in_batches(tmp_path):
    ck = poison_scale(tmp_path, "nvfp4", "model.layers.0.self_attn.v_proj.weight_scale_2", (), 1.0)
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"q_proj\.weight_scale_2 and .*v_proj\.weight_scale_2 differ"):
        list(rewrite(ck.plan, load_tensors(ck.path).items(), ck.device, batch_bytes=100_000))


def test_a_deferred_warning_is_still_given(tmp_path):
    ck = poison_scale(tmp_path, "fp8", "model.layers.0.self_attn.k_proj.input_scale", (), 1.0)
    with pytest.warns(lazyxform.LazyxformWarning, match=r"fused .*q_proj\.input_scale.*k_proj\.input_scale.*using their max"):
        list(rewrite(ck.plan, load_tensors(ck.path).items(), ck.device, batch_bytes=100_000))
