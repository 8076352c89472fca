"""lazyxform/recipes/fp4.py: the NVFP4 family (NVFP4, NVFP4_AWQ, W4A16_NVFP4, W4A8_NVFP4_FP8) and
NVFP4_SVD (dequantized: the fallback policy is tests/test_fallback.py). Header and value checks,
fused global scales, the SVD low-rank branch. Every module of every fixture:
tests/test_exactness.py; the E2M1 and reciprocal transforms: tests/ops/test_fp4.py."""

from __future__ import annotations

import pytest
import torch
from algos import ALGOS, FIXTURE_TABLE, fixtures
from helpers import copy_fixture, edit_json, poisoned, set_at
from reference import FIXTURES, load_tensors, modelopt_weight, quantized_modules

import lazyxform


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


# What vLLM runs as one GEMM over one input (Llama, Qwen3-MoE, DeepSeek's MLA and shared experts).
FUSED = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
)


# Phi-3's fused modules are single checkpoint modules: nothing to share.
@pytest.mark.parametrize("fixture", [f for f in fixtures(family="fp4", dense=False) if FIXTURE_TABLE[f].model_type != "phi3"])
def test_fused_global_scales_are_shared_as_modelopt_exports_them(fixture):
    """One weight (and, with FP4 activations, input) global scale per fused GEMM."""
    out = dict(lazyxform.open(FIXTURES / fixture, device="cpu"))
    suffixes = [s for s in ("weight_global_scale", "input_global_scale") if s in FIXTURE_TABLE[fixture].target.outputs]
    assert "weight_global_scale" in suffixes
    checked = 0
    for layer in ("model.layers.0", "model.layers.1"):
        for family in FUSED:
            if f"{layer}.{family[0]}.weight_packed" not in out:  # nvfp4_mlp_only: attention stays dense; the other architecture's
                continue
            for suffix in suffixes:
                values = [out[f"{layer}.{m}.{suffix}"] for m in family]
                assert all(torch.equal(v, values[0]) for v in values), (layer, family, suffix)
                checked += 1
    assert checked >= 2 * len(suffixes)


def test_nan_fp8_block_scale(tmp_path):
    ck = lazyxform.open(poisoned(tmp_path, "w4a16_nvfp4", "model.layers.1.mlp.gate_proj.weight_scale", set_at((0, 3), float("nan"))), device="cpu")
    with pytest.raises(lazyxform.BadScaleError, match=r"gate_proj\.weight_scale: 1 of 8192 .* index \[0, 3\]"):
        list(ck)


def test_svd_low_rank_factor_of_the_wrong_shape(tmp_path):
    ckpt = poisoned(tmp_path, "nvfp4_svdquant", "model.layers.0.mlp.up_proj.weight_quantizer._svdquant_lora_b", lambda b: b[:100].contiguous())
    with pytest.raises(lazyxform.TensorMismatchError, match=r"up_proj\.weight_quantizer\._svdquant_lora_b \(bfloat16 \[100, 32\]\) .*expected bfloat16 or float16 or float32 \[512, 32\]"):
        lazyxform.open(ckpt, device="cpu")


def test_svdquant_effective_map_includes_low_rank_branch_and_pre_quant_scale():
    """y = (x * pqs) @ (W_res + B @ A)^T against x @ W^T with the dequantized W."""
    path = FIXTURES / "nvfp4_svdquant"
    with pytest.warns(lazyxform.LazyxformWarning):
        out = dict(lazyxform.open(path, device="cpu"))
    orig = load_tensors(path)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for module in quantized_modules(orig):
        w_eff = modelopt_weight("NVFP4_SVD", orig, module)
        pqs = orig[f"{module}.pre_quant_scale"].double()
        x_in = x[:, : w_eff.shape[1]]
        want = (x_in * pqs) @ w_eff.T
        got = x_in @ out[f"{module}.weight"].double().T
        bound = ALGOS["NVFP4_SVD"].bound * (x_in * pqs).abs() @ w_eff.abs().T + 1e-12
        assert ((got - want).abs() <= bound).all(), module
        no_lora = (x_in * pqs) @ modelopt_weight("NVFP4", orig, module).T
        assert ((no_lora - want).abs() > bound).any(), f"{module}: the check cannot tell a missing low-rank branch"


def test_w4a8_nvfp4_fp8_without_group_size_takes_modelopts_32(tmp_path):
    """W4A8_NVFP4_FP8's block is 32 columns when the config does not say (each split in two
    16-column NVFP4 blocks): the same plan and bits."""
    ckpt = copy_fixture("w4a8_nvfp4_fp8", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].pop("group_size"))
    said, unsaid = lazyxform.open(FIXTURES / "w4a8_nvfp4_fp8", device="cpu"), lazyxform.open(ckpt, device="cpu")
    assert unsaid.quantization_config == said.quantization_config
    streamed, expected = dict(unsaid), dict(said)
    assert streamed.keys() == expected.keys() and all(torch.equal(streamed[k], expected[k]) for k in expected)


# compressed-tensors' own ModelOpt NVFP4 converter (compressed_tensors.entrypoints.convert, the
# offline peer path): written independently of lazyxform, it renames and inverts the same tensors.
# NVFP4 algos only: it knows no AWQ pre_quant_scale, W4A16 or W4A8 variants.
CONVERTED = [f for f in fixtures(family="fp4", dense=False) if FIXTURE_TABLE[f].algo == "NVFP4" and FIXTURE_TABLE[f].kv is None]


@pytest.mark.parametrize("fixture", CONVERTED)
def test_nvfp4_stream_is_bit_identical_to_compressed_tensors_own_converter(tmp_path, fixture):
    from compressed_tensors.entrypoints import convert
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter

    src = FIXTURES / fixture
    modules = quantized_modules(load_tensors(src))
    convert.convert_checkpoint(src, tmp_path / "ct", ModelOptNvfp4Converter(targets=modules))
    theirs = load_tensors(tmp_path / "ct")
    ours = {name: tensor.cpu() for name, tensor in lazyxform.open(src, device="cpu")}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        # Shapes agree but for a global scale: the converter keeps ModelOpt's 0-d tensor, lazyxform
        # writes the [1] that compressed-tensors' own NVFP4 compressor writes; engines load either.
        mine = ours[name].reshape(tensor.shape) if tensor.dim() == 0 else ours[name]
        assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), name
