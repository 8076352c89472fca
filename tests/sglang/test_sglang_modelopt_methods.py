"""ModelOpt's FP8 recipe (per-tensor weights, static per-tensor input) and NVFP4 on a GPU: lazyxform
hands SGLang's own ModelOpt methods (ModelOptFp8LinearMethod, ModelOptFp8MoEMethod,
ModelOptFp4LinearMethod) instead of the compressed-tensors schemes, and streams those modules as
ModelOpt exported them (LazyxformConfig.modelopt_method). The plugin's GPU branches are taken on this
CPU (conftest's gpu_branch); real SGLang layers are built in this process (one-rank gloo group) with
the method lazyxform hands out, filled with the plugin's stream of the checkpoint through the
parameters' weight loaders as SGLang's loaders fill them, and processed after loading. Each equals, in
every parameter and attribute (dtype, shape, strides, bits), the same layer built by SGLang's native
ModelOpt path (ModelOptFp8Config / ModelOptFp4Config.from_config of the checkpoint's
hf_quant_config.json, as SGLang's get_quant_config builds it) and filled with the checkpoint's own
tensors read with safetensors: the layers then run SGLang's one GEMM on the same operands, the
native path's function bit for bit. Checked for the fp8 and nvfp4 fixtures' fused q/k/v and gate/up
and for qwen3moe_fp8's experts; on an H200 (benchmarks/gpu_sglang.py) the logprobs are compared.

FP8: process_weights_after_loading requantizes the members of a fused layer (and each expert's gate
and up) to their largest weight scale with SGLang's scaled_fp8_quant, whose static-scale kernel is
CUDA only (0.5.23: sglang.kernels.ops.quantization.per_tensor_quant_fp8, a JIT-compiled CUDA kernel;
on a CPU SGLang imports none, and scaled_fp8_quant raises NameError on sgl_per_tensor_quant_fp8).
Here that kernel is replaced by its definition (jit/csrc/gemm/per_tensor_quant_fp8.cuh: x * (1 /
scale) in float32, clipped to +-448, cast to e4m3), the same on both sides.

NVFP4: below SM 10.0 SGLang runs FP4 Marlin. Its processing computes the per-tensor scales Marlin
takes (alpha, input_scale_inv, the global scales: compared here), then repacks weight and block scales
for Marlin with CUDA kernels (prepare_nvfp4_layer_for_marlin), a function of the parameters compared;
here that repack is left out on both sides. Everything else runs as SGLang wrote it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import FIXTURES, load_tensors
from sglang.kernels.ops.quantization import fp8_kernel
from sglang.srt.layers.quantization import fp4_utils, modelopt_quant
from sglang.srt.layers.quantization.modelopt_quant import (
    ModelOptFp4Config,
    ModelOptFp4LinearMethod,
    ModelOptFp8Config,
    ModelOptFp8LinearMethod,
    ModelOptFp8MoEMethod,
)
from sglang_support import (
    MEMBERS,
    assert_same_layer,
    distinct_input_scales,
    fused_layers,
    fused_members,
    fused_moe,
    lazyxform_config,
    load,
    load_experts,
    member_key,
    plugin_stream,
)

import lazyxform

pytestmark = pytest.mark.usefixtures("one_rank_group", "gpu_branch")

FP8_MAX = 448.0
EXPERTS_LAYER = "model.layers.0.mlp.experts"  # qwen3moe_fp8: 4 routed experts, top 2


@pytest.fixture(autouse=True)
def static_fp8_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's CUDA kernel behind scaled_fp8_quant(x, scale), by its definition."""

    def per_tensor_quant_fp8(input: torch.Tensor, output_q: torch.Tensor, output_s: torch.Tensor, is_static: bool = False) -> None:
        assert is_static, "requantization passes its scale"
        output_q.copy_((input.float() * (1.0 / output_s.float())).clamp(-FP8_MAX, FP8_MAX).to(output_q.dtype))

    monkeypatch.setattr(fp8_kernel, "sgl_per_tensor_quant_fp8", per_tensor_quant_fp8, raising=False)


def native_config(path: Path, config: type[ModelOptFp8Config | ModelOptFp4Config]) -> Any:
    """SGLang's own config of the ModelOpt checkpoint: its hf_quant_config.json plus the model's
    packed_modules_mapping (none for Llama), as weight_utils.get_quant_config builds it."""
    return config.from_config({**json.loads((path / "hf_quant_config.json").read_text()), "packed_modules_mapping": {}})


# What the methods read of the config they were built with (the rest differs by construction).
FP8_CONFIG_FIELDS = ("is_checkpoint_fp8_serialized",)
FP4_CONFIG_FIELDS = ("is_checkpoint_nvfp4_serialized", "group_size", "is_awq", "use_per_token_activation")


@pytest.mark.parametrize("cutlass", [True, False], ids=["per-channel weight scale (CUTLASS)", "per-tensor weight scale"])
@pytest.mark.parametrize("distinct", [False, True], ids=["as exported", "input scales distinct per member"])
def test_fused_fp8_layers_equal_sglangs_modelopt_path(cutlass: bool, distinct: bool) -> None:
    """Layer 0's qkv_proj and gate_up_proj of the fp8 fixture. `cutlass`: ModelOptFp8LinearMethod's
    cutlass_fp8_supported (read when processing; True on an H200, False here), which broadcasts the
    weight scale per channel; set alike on both sides. `distinct`: the members' input scales made
    1, 2, 3 times the exported one (streamed as they are, as SGLang's native path loads them: it takes
    their max after loading)."""
    path = FIXTURES / "fp8"
    hf = json.loads((path / "config.json").read_text())
    ckpt = load_tensors(path)
    if distinct:
        ckpt = distinct_input_scales(ckpt)
    qkv_scales = {ckpt[member_key("self_attn.qkv_proj", m, "weight_scale")].item() for m in MEMBERS["self_attn.qkv_proj"]}
    assert len(qkv_scales) == 3  # three weight scales: the requantization to their max is exercised
    lazy, native = fused_layers(hf, lazyxform_config(path)), fused_layers(hf, native_config(path, ModelOptFp8Config))
    for fused, layer in lazy.items():
        assert type(layer.quant_method) is ModelOptFp8LinearMethod, fused
        assert "scheme" not in vars(layer), fused  # no compressed-tensors scheme was asked for
        assert type(native[fused].quant_method) is ModelOptFp8LinearMethod, fused
    load(lazy, fused_members(plugin_stream(path, ckpt)))
    load(native, fused_members(ckpt.items()))
    for fused in lazy:
        for layer in (lazy[fused], native[fused]):
            layer.quant_method.cutlass_fp8_supported = cutlass
            layer.quant_method.process_weights_after_loading(layer)
        assert_same_layer(lazy[fused], native[fused], fused, FP8_CONFIG_FIELDS)
        assert lazy[fused].weight_scale.shape == ((sum(lazy[fused].logical_widths), 1) if cutlass else ()), fused


@pytest.mark.parametrize("distinct", [False, True], ids=["as exported", "gate and up weight scales distinct"])
def test_fp8_experts_equal_sglangs_modelopt_path(distinct: bool) -> None:
    """qwen3moe_fp8's layer-0 experts. `distinct`: each expert's up_proj weight scale doubled, so that
    each expert's gate is requantized to its up's scale."""
    path = FIXTURES / "qwen3moe_fp8"
    hf: dict[str, Any] = json.loads((path / "config.json").read_text())
    experts, top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
    ckpt = load_tensors(path)
    if distinct:
        for e in range(experts):
            ckpt[f"{EXPERTS_LAYER}.{e}.up_proj.weight_scale"] = ckpt[f"{EXPERTS_LAYER}.{e}.up_proj.weight_scale"] * 2
    lazy = fused_moe(hf, lazyxform_config(path), EXPERTS_LAYER, experts, top_k)
    native = fused_moe(hf, native_config(path, ModelOptFp8Config), EXPERTS_LAYER, experts, top_k)
    assert type(lazy.quant_method) is ModelOptFp8MoEMethod and type(native.quant_method) is ModelOptFp8MoEMethod
    assert "scheme" not in vars(lazy)  # SGLang's expert weight loader would dispatch on it
    assert load_experts(lazy, plugin_stream(path, ckpt)) == load_experts(native, ckpt.items()) == experts * 3 * 3
    for layer in (lazy, native):
        layer.quant_method.process_weights_after_loading(layer)
    assert_same_layer(lazy, native, EXPERTS_LAYER, FP8_CONFIG_FIELDS)
    assert lazy.w13_weight_scale.shape == (experts,)  # one per expert: gate and up requantized to one scale


@pytest.fixture
def fp4_marlin(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """SGLang's FP4 GEMM backend as on an H200 (Marlin), its CUDA repack left out; the layers it was
    asked to repack."""
    repacked: list[torch.nn.Module] = []
    monkeypatch.setattr(fp4_utils, "FP4_GEMM_RUNNER_BACKEND", fp4_utils.Fp4GemmRunnerBackend.MARLIN)
    monkeypatch.setattr(modelopt_quant, "prepare_nvfp4_layer_for_marlin", repacked.append)
    return repacked


def test_fused_nvfp4_layers_equal_sglangs_modelopt_path(fp4_marlin: list[torch.nn.Module]) -> None:
    """Layer 0's qkv_proj and gate_up_proj of the nvfp4 fixture, streamed as exported: the same FP4
    bytes, block scales and per-tensor scales (0-d, and weight_scale_2 not inverted into
    compressed-tensors' global scale, whose reciprocal would not always give back the same float32).
    Members whose input scales differ are refused as the conversion refuses them (SGLang would take
    their max for the fused GEMM's FP4 activations; ModelOpt exports them equal)."""
    path = FIXTURES / "nvfp4"
    hf = json.loads((path / "config.json").read_text())
    ckpt = load_tensors(path)
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"input_scale of siblings fused into one GEMM"):
        plugin_stream(path, distinct_input_scales(ckpt))
    streamed = dict(fused_members(plugin_stream(path, ckpt)))
    assert streamed.keys() == fused_members(ckpt.items()).keys()  # ModelOpt's names, no compressed-tensors ones
    lazy, native = fused_layers(hf, lazyxform_config(path)), fused_layers(hf, native_config(path, ModelOptFp4Config))
    for fused, layer in lazy.items():
        assert type(layer.quant_method) is ModelOptFp4LinearMethod and type(native[fused].quant_method) is ModelOptFp4LinearMethod, fused
        assert "scheme" not in vars(layer), fused  # no compressed-tensors scheme was asked for
    load(lazy, streamed)
    load(native, fused_members(ckpt.items()))
    for fused in lazy:
        for layer in (lazy[fused], native[fused]):
            layer.quant_method.process_weights_after_loading(layer)
        assert_same_layer(lazy[fused], native[fused], fused, FP4_CONFIG_FIELDS)
        assert lazy[fused].weight_global_scale.dtype == torch.float32 and lazy[fused].alpha.shape == (), fused
    assert fp4_marlin == [layer for fused in lazy for layer in (lazy[fused], native[fused])]
