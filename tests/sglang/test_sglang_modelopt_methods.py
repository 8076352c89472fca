"""ModelOpt's FP8 recipe (per-tensor weights, static per-tensor input) on a GPU: lazyxform hands SGLang's
own ModelOpt FP8 methods (ModelOptFp8LinearMethod, ModelOptFp8MoEMethod) instead of the
compressed-tensors FP8 schemes, whose GEMM gives other bits (LazyxformConfig.modelopt_fp8). The GPU
branch of LazyxformConfig is taken on this CPU (conftest's gpu_branch); real SGLang layers are built in
this process (one-rank gloo group) with the method lazyxform hands out, filled with lazyxform's stream
of the checkpoint through the parameters' weight loaders as SGLang's loaders fill them, and processed
after loading. Each equals, in every parameter and attribute (dtype, shape, strides, bits), the same
layer built by SGLang's native ModelOpt path (ModelOptFp8Config.from_config of the checkpoint's
hf_quant_config.json, as SGLang's get_quant_config builds it) and filled with the checkpoint's own
tensors read with safetensors: the layers then run SGLang's one GEMM on the same operands, the
native path's function bit for bit. Checked for the fp8 fixture's fused q/k/v (three different weight
scales) and gate/up, and for qwen3moe_fp8's experts; not yet run on a GPU.

process_weights_after_loading requantizes the members of a fused layer (and each expert's gate and up)
to their largest weight scale with SGLang's scaled_fp8_quant, whose static-scale kernel is CUDA only
(0.5.23: sglang.kernels.ops.quantization.per_tensor_quant_fp8, a JIT-compiled CUDA kernel; on a CPU
SGLang imports none, and scaled_fp8_quant raises NameError on sgl_per_tensor_quant_fp8). Here that
kernel is replaced by its definition (jit/csrc/gemm/per_tensor_quant_fp8.cuh: x * (1 / scale) in
float32, clipped to +-448, cast to e4m3), the same on both sides; everything else runs as SGLang
wrote it."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import FIXTURES, load_tensors
from sglang.kernels.ops.quantization import fp8_kernel
from sglang.srt.layers.quantization.modelopt_quant import (
    ModelOptFp8Config,
    ModelOptFp8LinearMethod,
    ModelOptFp8MoEMethod,
)
from sglang_support import (
    MEMBERS,
    distinct_input_scales,
    fused_layers,
    fused_members,
    fused_moe,
    load,
    load_experts,
    member_key,
)

import lazyxform
from lazyxform_sglang.config import MARK
from lazyxform_sglang.quant_config import LazyxformConfig

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


def lazyxform_config(path: Path) -> LazyxformConfig:
    ck = lazyxform.open(path, device="cpu")
    return LazyxformConfig.from_config({**ck.quantization_config, MARK: {"checkpoint": str(path)}, "packed_modules_mapping": {}})


def native_config(path: Path) -> ModelOptFp8Config:
    """SGLang's own config of the ModelOpt checkpoint: its hf_quant_config.json plus the model's
    packed_modules_mapping (none for Llama), as weight_utils.get_quant_config builds it."""
    return ModelOptFp8Config.from_config({**json.loads((path / "hf_quant_config.json").read_text()), "packed_modules_mapping": {}})


def stream(path: Path, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # distinct input scales: lazyxform says it merges them
        return list(lazyxform.open(path, device="cpu").wrap(iter(tensors.items())))


# What differs by construction: the config the layer and its method were built with (lazyxform's, and
# ModelOptFp8Config(is_checkpoint_fp8_serialized=True), or SGLang's from the checkpoint). On these
# layers SGLang reads the layer's only in FusedMoE._load_w2's 2-D check for a "modelopt" config and in
# FP4 paths, the method's only for is_checkpoint_fp8_serialized (compared).
BUILT_WITH = "quant_config"


def assert_same_layer(got: torch.nn.Module, want: torch.nn.Module, what: str) -> None:
    """The same parameters, attributes and method state: tensors of the same dtype, shape, strides and
    bits; other values equal, objects without an equality of their own (MoE runners, dispatchers)
    compared attribute by attribute, references to the layer (or to another object compared) as such."""
    assert type(got.quant_method) is type(want.quant_method), what
    assert got.quant_method.quant_config.is_checkpoint_fp8_serialized == want.quant_method.quant_config.is_checkpoint_fp8_serialized, what
    pairs: dict[int, Any] = {id(want): got}
    params = dict(want.named_parameters())
    assert params.keys() == dict(got.named_parameters()).keys(), what
    for name, value in params.items():
        assert_same(getattr(got, name), value, f"{what}.{name}", pairs)
    for a, b, where in ((got, want, what), (got.quant_method, want.quant_method, f"{what}.quant_method")):
        attrs = {k: v for k, v in vars(b).items() if not k.startswith("_") and k not in (BUILT_WITH, "quant_method")}
        assert attrs.keys() == {k for k in vars(a) if not k.startswith("_") and k not in (BUILT_WITH, "quant_method")}, where
        for name, value in attrs.items():
            assert_same(getattr(a, name), value, f"{where}.{name}", pairs)


def assert_same(mine: Any, value: Any, what: str, pairs: dict[int, Any]) -> None:
    if mine is value:
        return
    if id(value) in pairs:
        assert mine is pairs[id(value)], what
    elif isinstance(value, torch.Tensor):
        assert (mine.dtype, mine.shape, mine.stride()) == (value.dtype, value.shape, value.stride()), what
        assert torch.equal(bits(mine), bits(value)), what
    elif dataclasses.is_dataclass(value) or type(value).__eq__ is object.__eq__:
        assert type(mine) is type(value), what
        pairs[id(value)] = mine
        fields = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else list(vars(value))
        for name in fields:
            assert_same(getattr(mine, name), getattr(value, name), f"{what}.{name}", pairs)
    else:
        assert mine == value, what


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("cutlass", [True, False], ids=["per-channel weight scale (CUTLASS)", "per-tensor weight scale"])
@pytest.mark.parametrize("distinct", [False, True], ids=["as exported", "input scales distinct per member"])
def test_fused_fp8_layers_equal_sglangs_modelopt_path(cutlass: bool, distinct: bool) -> None:
    """Layer 0's qkv_proj and gate_up_proj of the fp8 fixture. `cutlass`: ModelOptFp8LinearMethod's
    cutlass_fp8_supported (read when processing; True on an H200, False here), which broadcasts the
    weight scale per channel; set alike on both sides. `distinct`: the members' input scales made
    1, 2, 3 times the exported one (lazyxform streams their max to each member, SGLang's native path
    keeps each and takes their max after loading)."""
    path = FIXTURES / "fp8"
    hf = json.loads((path / "config.json").read_text())
    ckpt = load_tensors(path)
    if distinct:
        ckpt = distinct_input_scales(ckpt)
    qkv_scales = {ckpt[member_key("self_attn.qkv_proj", m, "weight_scale")].item() for m in MEMBERS["self_attn.qkv_proj"]}
    assert len(qkv_scales) == 3  # three weight scales: the requantization to their max is exercised
    lazy, native = fused_layers(hf, lazyxform_config(path)), fused_layers(hf, native_config(path))
    for fused, layer in lazy.items():
        assert type(layer.quant_method) is ModelOptFp8LinearMethod, fused
        assert "scheme" not in vars(layer), fused  # SGLang's compressed-tensors scheme, dropped
        assert type(native[fused].quant_method) is ModelOptFp8LinearMethod, fused
    load(lazy, fused_members(stream(path, ckpt)))
    load(native, fused_members(ckpt.items()))
    for fused in lazy:
        for layer in (lazy[fused], native[fused]):
            layer.quant_method.cutlass_fp8_supported = cutlass
            layer.quant_method.process_weights_after_loading(layer)
        assert_same_layer(lazy[fused], native[fused], fused)
        assert lazy[fused].weight_scale.shape == ((sum(lazy[fused].logical_widths), 1) if cutlass else ()), fused


@pytest.mark.parametrize("distinct", [False, True], ids=["as exported", "gate and up weight scales distinct"])
def test_fp8_experts_equal_sglangs_modelopt_path(monkeypatch: pytest.MonkeyPatch, distinct: bool) -> None:
    """qwen3moe_fp8's layer-0 experts. `distinct`: each expert's up_proj weight scale doubled, so that
    each expert's gate is requantized to its up's scale."""
    from lazyxform_sglang import config as sglang_config

    monkeypatch.setattr(sglang_config, "is_cpu", lambda: False)
    path = FIXTURES / "qwen3moe_fp8"
    hf: dict[str, Any] = json.loads((path / "config.json").read_text())
    experts, top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
    ckpt = load_tensors(path)
    if distinct:
        for e in range(experts):
            ckpt[f"{EXPERTS_LAYER}.{e}.up_proj.weight_scale"] = ckpt[f"{EXPERTS_LAYER}.{e}.up_proj.weight_scale"] * 2
    lazy = fused_moe(hf, lazyxform_config(path), EXPERTS_LAYER, experts, top_k)
    native = fused_moe(hf, native_config(path), EXPERTS_LAYER, experts, top_k)
    assert type(lazy.quant_method) is ModelOptFp8MoEMethod and type(native.quant_method) is ModelOptFp8MoEMethod
    assert "scheme" not in vars(lazy)  # SGLang's expert weight loader would dispatch on it
    assert load_experts(lazy, stream(path, ckpt)) == load_experts(native, ckpt.items()) == experts * 3 * 3
    for layer in (lazy, native):
        layer.quant_method.process_weights_after_loading(layer)
    assert_same_layer(lazy, native, EXPERTS_LAYER)
    assert lazy.w13_weight_scale.shape == (experts,)  # one per expert: gate and up requantized to one scale
