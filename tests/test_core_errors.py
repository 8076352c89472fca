"""Bad input gets a typed error naming the file, the tensor, what was expected and what was found."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_fixture, edit_json, rewrite_tensors, tensors_of

import lazyxform


def test_unknown_quant_algo(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="FP3_MAGIC"))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_algo="FP3_MAGIC"))
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=r"'FP3_MAGIC' is not supported \(supported: .*FP8"):
        lazyxform.open(ckpt, device="cpu")


def test_missing_scale_tensor(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.input_scale"))
    with pytest.raises(lazyxform.MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj has no 'input_scale'"):
        lazyxform.open(ckpt, device="cpu")


def test_scale_of_the_wrong_shape(tmp_path):
    ckpt = copy_fixture("int8_default", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(255)}))
    with pytest.raises(lazyxform.TensorMismatchError) as err:
        lazyxform.open(ckpt, device="cpu")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj.weight_scale (float32 [255]) in model.safetensors: expected float32 [256]" in msg


def test_scale_of_the_wrong_dtype(tmp_path):
    ckpt = copy_fixture("fp8_pc_pt", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": t["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16)}))
    with pytest.raises(lazyxform.TensorMismatchError, match=r"down_proj\.weight \(bfloat16 \[256, 512\]\) .*expected float8_e4m3fn"):
        lazyxform.open(ckpt, device="cpu")


def test_truncated_safetensors(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(lazyxform.CorruptSafetensorsError, match=r"model\.safetensors: tensor '.*' ends at byte \d+ of the data section, which has only \d+ bytes \(truncated"):
        lazyxform.open(ckpt, device="cpu")


def test_directory_that_is_not_a_modelopt_checkpoint(tmp_path):
    with pytest.raises(lazyxform.NotAModelOptCheckpoint, match="no hf_quant_config.json"):
        lazyxform.open(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "awq"}}')
    with pytest.raises(lazyxform.NotAModelOptCheckpoint, match="quant_method 'modelopt'"):
        lazyxform.open(tmp_path, device="cpu")
    assert not lazyxform.is_modelopt_checkpoint(tmp_path)


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
def test_forbidden_scale_values_fail_when_streamed(tmp_path, value):
    ckpt = copy_fixture("int8_default", tmp_path)

    def poison(t):
        s = t["model.layers.1.mlp.down_proj.weight_scale"].clone()
        s[7] = value
        t["model.layers.1.mlp.down_proj.weight_scale"] = s

    rewrite_tensors(ckpt, poison)
    ck = lazyxform.open(ckpt, device="cpu")
    with pytest.raises(lazyxform.BadScaleError, match=r"down_proj\.weight_scale: 1 of 256 .* index \[7\]"):
        list(ck)


def test_fused_siblings_with_different_pre_quant_scales_cannot_fold(tmp_path):
    ckpt = copy_fixture("int8_sq", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.pre_quant_scale": t["model.layers.0.self_attn.k_proj.pre_quant_scale"] * 2}))
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"input_layernorm.*q_proj\.pre_quant_scale and .*k_proj\.pre_quant_scale differ"):
        list(lazyxform.open(ckpt, device="cpu"))


def test_fused_set_with_a_member_missing(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.0.self_attn.v_proj.")])
    with pytest.raises(lazyxform.MissingTensorError, match=r"fused set .*v_proj'\] missing"):
        lazyxform.open(ckpt, device="cpu")


def test_differing_fused_activation_scales_merge_to_max_with_a_warning(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.input_scale": t["model.layers.0.self_attn.k_proj.input_scale"] * 2}))
    with pytest.warns(lazyxform.LazyxformWarning, match=r"fused .*q_proj\.input_scale.*k_proj\.input_scale.*using their max"):
        out = dict(lazyxform.open(ckpt, device="cpu"))
    # Every member carries the largest of the exported scales, not the smallest or its own.
    exported = tensors_of("fp8")
    scales = {m: exported[f"model.layers.0.self_attn.{m}.input_scale"].item() for m in ("q_proj", "k_proj", "v_proj")}
    scales["k_proj"] *= 2
    assert len(set(scales.values())) > 1
    for member in scales:
        assert out[f"model.layers.0.self_attn.{member}.input_scale"].item() == max(scales.values()), member
