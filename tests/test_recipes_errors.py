"""Issue-3 recipes on bad input: typed errors naming the tensor, what was expected and what was found;
and the dequantize fallback policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import copy_fixture, edit_json, rewrite_tensors
from reference import FIXTURES

import lazyxform


def poisoned(tmp_path: Path, fixture: str, name: str, edit) -> Path:
    ckpt = copy_fixture(fixture, tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({name: edit(t[name])}))
    return ckpt


def test_int4_group_scale_of_the_wrong_shape(tmp_path):
    ckpt = poisoned(tmp_path, "int4_awq", "model.layers.0.mlp.up_proj.weight_scale", lambda s: s[:, :1].contiguous())
    with pytest.raises(lazyxform.TensorMismatchError, match=r"up_proj\.weight_scale \(float32 \[512, 1\]\) in model\.safetensors: expected float32 \[512, 2\]"):
        lazyxform.open(ckpt, device="cpu")


def test_int4_weight_that_is_not_nibble_packed(tmp_path):
    ckpt = poisoned(tmp_path, "int4_awq", "model.layers.0.mlp.up_proj.weight", lambda w: w.to(torch.int8))
    with pytest.raises(lazyxform.TensorMismatchError, match=r"up_proj\.weight \(int8 \[256, 256\]\) .*expected uint8 \[256, 256\]"):
        lazyxform.open(ckpt, device="cpu")


def test_int4_with_zero_points_is_refused(tmp_path):
    ckpt = copy_fixture("int4_awq", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(has_zero_point=True))
    with pytest.raises(lazyxform.UnsupportedAlgoError, match="W4A16_AWQ with has_zero_point: true"):
        lazyxform.open(ckpt, device="cpu")


def test_nvfp4_block_size_that_is_not_a_multiple_of_16(tmp_path):
    ckpt = copy_fixture("nvfp4", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(group_size=8))
    with pytest.raises(lazyxform.UnsupportedAlgoError, match="NVFP4 with group_size 8; only multiples of 16"):
        lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize("suffix", ["weight_scale_2", "input_scale"])
def test_fused_nvfp4_global_scales_must_be_identical(tmp_path, suffix):
    ckpt = poisoned(tmp_path, "nvfp4", f"model.layers.0.self_attn.v_proj.{suffix}", lambda s: s * 1.5)
    ck = lazyxform.open(ckpt, device="cpu")
    with pytest.raises(lazyxform.InconsistentScalesError, match=rf"{suffix} of siblings fused into one GEMM: .*q_proj\.{suffix} and .*v_proj\.{suffix} differ"):
        list(ck)


def set_at(index: tuple[int, int], value: float):
    def edit(s: torch.Tensor) -> torch.Tensor:
        s = s.clone()
        s[index] = value
        return s

    return edit


def test_nan_fp8_block_scale(tmp_path):
    ck = lazyxform.open(poisoned(tmp_path, "w4a16_nvfp4", "model.layers.1.mlp.gate_proj.weight_scale", set_at((0, 3), float("nan"))), device="cpu")
    with pytest.raises(lazyxform.BadScaleError, match=r"gate_proj\.weight_scale: 1 of 8192 .* index \[0, 3\]"):
        list(ck)


def test_e8m0_nan_scale(tmp_path):
    ck = lazyxform.open(poisoned(tmp_path, "mxfp4", "model.layers.0.self_attn.o_proj.weight_scale", set_at((2, 5), 255)), device="cpu")
    with pytest.raises(lazyxform.BadScaleError, match=r"o_proj\.weight_scale: 1 of 2048 E8M0 scale values are 255 \(NaN\) \(first at index \[2, 5\]\)"):
        list(ck)


def test_e8m0_zero_is_a_valid_scale(tmp_path):
    ckpt = poisoned(tmp_path, "mxfp8", "model.layers.0.self_attn.o_proj.weight_scale", torch.zeros_like)
    out = dict(lazyxform.open(ckpt, device="cpu"))
    assert out["model.layers.0.self_attn.o_proj.weight_scale"].eq(0).all()


def test_svd_low_rank_factor_of_the_wrong_shape(tmp_path):
    ckpt = poisoned(tmp_path, "nvfp4_svdquant", "model.layers.0.mlp.up_proj.weight_quantizer._svdquant_lora_b", lambda b: b[:100].contiguous())
    with pytest.raises(lazyxform.TensorMismatchError, match=r"up_proj\.weight_quantizer\._svdquant_lora_b \(bfloat16 \[100, 32\]\) .*expected bfloat16 or float16 or float32 \[512, 32\]"):
        lazyxform.open(ckpt, device="cpu")


def test_dequantize_is_the_default_fallback_and_names_the_modules():
    with pytest.warns(lazyxform.LazyxformWarning, match=r"NVFP4_SVD has no compressed-tensors equivalent: 14 modules are dequantized to bfloat16 .*: model\.layers\.0\.mlp\.down_proj, .*model\.layers\.1\.self_attn\.v_proj$"):
        ck = lazyxform.open(FIXTURES / "nvfp4_svdquant", device="cpu")
    qc = ck.quantization_config
    assert qc["config_groups"] == {} and qc["format"] == "dense"
    assert sorted(qc["ignore"]) == sorted(["lm_head", "model.embed_tokens"] + [m.name for m in ck.plan.modules])
    assert all(m.scheme == "ignore" and m.outputs == ["weight"] for m in ck.plan.modules)
    assert ck.plan.warnings and ck.plan.runtime_pre_quant_scale == []
    out = dict(ck)
    assert all(out[f"{m.name}.weight"].dtype == torch.bfloat16 for m in ck.plan.modules)


def test_vllm_accepts_a_fully_dequantized_config():
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    with pytest.warns(lazyxform.LazyxformWarning):
        qc = lazyxform.open(FIXTURES / "nvfp4_svdquant", device="cpu").quantization_config
    assert CompressedTensorsConfig.from_config(qc).ignore == qc["ignore"]


def test_fallback_error_refuses_and_names_the_modules():
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=r"NVFP4_SVD has no compressed-tensors equivalent and fallback='error' forbids dequantizing 14 modules: model\.layers\.0\.mlp\.down_proj"):
        lazyxform.open(FIXTURES / "nvfp4_svdquant", device="cpu", fallback="error")


def test_fallback_error_changes_nothing_when_every_format_has_a_target():
    assert dict(lazyxform.open(FIXTURES / "nvfp4", device="cpu", fallback="error")).keys() == dict(lazyxform.open(FIXTURES / "nvfp4", device="cpu")).keys()


def test_unknown_fallback_value():
    with pytest.raises(ValueError, match=r"fallback must be one of \('dequantize', 'error'\), got 'ignore'"):
        lazyxform.open(FIXTURES / "nvfp4", device="cpu", fallback="ignore")  # type: ignore[arg-type]
