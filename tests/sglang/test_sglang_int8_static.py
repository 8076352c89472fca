"""SGLang's own static W8A8 int8 scheme (CompressedTensorsW8A8Int8, what lazyxform hands a GPU for
W8A8_SQ_PER_CHANNEL) on real SGLang fused layers built in this process (one-rank gloo group): the GPU
branch of LazyxformConfig is taken by answering is_cpu() False and an SM 9.0 capability, as
test_sglang_config does. The int8_sq fixture's layer-0 tensors, rewritten by lazyxform's stream, go
into a QKVParallelLinear and a MergedColumnParallelLinear through their weight loaders as SGLang's
Llama load_weights sends them (stacked_params_mapping, shard ids "q"/"k"/"v" and 0/1).

SGLang 0.5.17 and 0.5.23 register the static input scale as one element, which the fused loaders index
by member (IndexError on k / up); lazyxform's StaticInt8InputScheme gives it one element per member.
Checked: loading succeeds, each element is its member's scale from the stream, and SGLang's own
process_weights_after_loading (which runs on a CPU for a per-channel weight) leaves their max; the
same with SGLang's bare scheme fails as on the H200. The fixture's members share one input scale
(1/127), and lazyxform's stream gives fused members one scale (their max) anyway: a checkpoint with
distinct member scales is checked to arrive as that max in every element. Where each member lands is
seen with asymmetric zero points, distinct per member."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from reference import FIXTURES, load_tensors
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.parameter import PerTensorScaleParameter
from sglang.srt.layers.quantization.compressed_tensors.schemes import CompressedTensorsW8A8Int8
from sglang_support import MEMBERS, distinct_input_scales, fused_layers, fused_members, load, member_key

import lazyxform
from lazyxform_sglang import quant_config
from lazyxform_sglang.config import MARK
from lazyxform_sglang.schemes import StaticInt8InputScheme

pytestmark = pytest.mark.usefixtures("one_rank_group")

NAME = "int8_sq"
PATH = FIXTURES / NAME


def int8_layers(input_symmetric: bool = True) -> dict[str, LinearBase]:
    """Layer 0's qkv_proj and gate_up_proj, built by SGLang with lazyxform's config of the fixture."""
    ck = lazyxform.open(PATH, device="cpu")
    config = {**ck.quantization_config, MARK: {"checkpoint": str(PATH)}, "packed_modules_mapping": {}}
    config["config_groups"]["group_0"]["input_activations"]["symmetric"] = input_symmetric
    return fused_layers(ck.hf_config, quant_config.LazyxformConfig.from_config(config))


def checkpoint(distinct: bool) -> dict[str, torch.Tensor]:
    """The fixture's tensors; `distinct`: each fused member's input scale multiplied by 1, 2, 3 in member order."""
    tensors = load_tensors(PATH)
    return distinct_input_scales(tensors) if distinct else tensors


def stream(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer 0's q/k/v and gate/up tensors out of lazyxform's stream of `tensors`."""
    return fused_members(lazyxform.open(PATH, device="cpu").wrap(iter(tensors.items())))


def member_input_scales(tensors: dict[str, torch.Tensor], fused: str) -> torch.Tensor:
    return torch.stack([tensors[member_key(fused, m, "input_scale")].float().reshape(()) for m in MEMBERS[fused]])


@pytest.mark.parametrize("distinct", [False, True], ids=["as exported", "distinct per member"])
def test_fused_static_int8_input_scales_load_per_member(gpu_branch: None, distinct: bool) -> None:
    layers = int8_layers()
    ckpt = checkpoint(distinct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # distinct: lazyxform says it merges them
        tensors = stream(ckpt)
    load(layers, tensors)  # SGLang's bare scheme: IndexError (test_sglangs_bare_scheme_cannot_load_them)
    for fused, layer in layers.items():
        assert isinstance(layer.scheme, StaticInt8InputScheme), fused
        assert type(layer.scheme.inner) is CompressedTensorsW8A8Int8, fused
        assert isinstance(layer.input_scale, PerTensorScaleParameter), fused
        # lazyxform's stream gives fused members one scale, their max (lazyxform.recipes.base.input_scale_rule).
        want = member_input_scales(tensors, fused)
        assert torch.equal(want, member_input_scales(ckpt, fused).max().expand(len(want))), fused
        assert torch.equal(layer.input_scale.data, want), fused
        layer.quant_method.process_weights_after_loading(layer)  # SGLang's own, through the wrapper
        assert layer.input_scale.shape == () and torch.equal(layer.input_scale.data, want.max()), fused
        assert layer.weight.dtype == torch.int8 and layer.weight.shape[1] == sum(layer.output_sizes), fused  # transposed by SGLang


def test_sglangs_bare_scheme_cannot_load_them(gpu_branch: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The H200 failure, on SGLang 0.5.23: without the wrapper the second member's scale has no slot. Should
    an SGLang register one element per member itself, this fails and the wrapper has nothing left to do."""
    monkeypatch.setattr(quant_config, "StaticInt8InputScheme", lambda inner: inner)
    layers = int8_layers()
    assert all(type(layer.scheme) is CompressedTensorsW8A8Int8 and layer.input_scale.numel() == 1 for layer in layers.values())
    with pytest.raises(IndexError, match="index 1 is out of bounds for dimension 0 with size 1"):
        load(layers, stream(checkpoint(distinct=False)))


def test_asymmetric_input_zero_points_load_per_member(gpu_branch: None) -> None:
    """An asymmetric static input (not a ModelOpt export: the fixture's config with symmetric false) has an
    input_zero_point too; one element per member as well. The stream carries none: each member's is fed
    through the same loader. SGLang then folds the members' ranges into one scale and zero point."""
    layers = int8_layers(input_symmetric=False)
    tensors = stream(checkpoint(distinct=False))
    for fused in layers:
        for i, m in enumerate(MEMBERS[fused]):
            tensors[member_key(fused, m, "input_zero_point")] = torch.tensor([i - 1], dtype=torch.int8)
    load(layers, tensors)
    for fused, layer in layers.items():
        scales = member_input_scales(tensors, fused)
        zero_points = torch.arange(len(MEMBERS[fused]), dtype=torch.int8) - 1
        assert layer.input_zero_point.dtype == torch.int8, fused
        assert torch.equal(layer.input_scale.data, scales) and torch.equal(layer.input_zero_point.data, zero_points), fused
        layer.quant_method.process_weights_after_loading(layer)
        # SGLang's formula over every member's range (their zero points differ).
        top, bottom = (scales * (127 - zero_points.int())).max(), (scales * (-128 - zero_points.int())).min()
        assert torch.equal(layer.input_scale.data, (top - bottom) / 255), fused


def test_enough_elements_are_left_as_registered() -> None:
    """The guard: a scheme that registers one element per member keeps its own parameter."""

    class Registers(CompressedTensorsW8A8Int8):
        def create_weights(self, layer: torch.nn.Module, output_partition_sizes: list[int], **kwargs: Any) -> None:
            self.registered = PerTensorScaleParameter(data=torch.zeros(len(output_partition_sizes)), weight_loader=print)
            layer.register_parameter("input_scale", self.registered)

    inner, layer = Registers("channel", True, True), torch.nn.Module()
    StaticInt8InputScheme(inner).create_weights(layer, output_partition_sizes=[4, 2, 2])
    assert layer.input_scale is inner.registered


def static_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt's static INT8 input quantizer (tests/vllm/modelopt_reference.int8_round), as int8 steps."""
    return (x.float() / scale.float()).round().clamp(-128, 127).to(torch.int8)


@pytest.mark.parametrize("wrapped", [True, False], ids=["lazyxform's wrapper", "SGLang's bare scheme"])
def test_the_input_is_quantized_with_the_static_scale(gpu_branch: None, monkeypatch: pytest.MonkeyPatch, wrapped: bool) -> None:
    """SGLang's own apply_weights quantizes the input per token (per_token_quant_int8) and never reads the
    loaded input_scale; the wrapper quantizes it with the static scale, clipping at the calibrated range as
    ModelOpt does. sgl_kernel's int8 GEMM and SGLang's per-token quantizer (CUDA, Triton) are replaced by
    their definitions, the GEMM recording its inputs; the bare scheme's run loads per member by hand (its
    own loader cannot, test above)."""
    import sgl_kernel
    from sglang.srt.layers.quantization.compressed_tensors.schemes import compressed_tensors_w8a8_int8

    seen: dict[str, torch.Tensor] = {}

    def int8_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias=None):
        seen.update(a=a, scale_a=scale_a)
        out = (a.float() * scale_a) @ (b.float() * scale_b.reshape(1, -1))
        return (out if bias is None else out + bias).to(out_dtype)

    def per_token_quant_int8(x):  # SGLang's Triton kernel (GPU), by its definition
        scale = x.float().abs().amax(-1, keepdim=True) / 127
        return (x.float() / scale).round().clamp(-128, 127).to(torch.int8), scale

    monkeypatch.setattr(sgl_kernel, "int8_scaled_mm", int8_scaled_mm, raising=False)
    monkeypatch.setattr(compressed_tensors_w8a8_int8, "int8_scaled_mm", int8_scaled_mm, raising=False)
    monkeypatch.setattr(compressed_tensors_w8a8_int8, "per_token_quant_int8", per_token_quant_int8)
    layer = int8_layers()["mlp.gate_up_proj"]
    tensors = stream(checkpoint(distinct=False))
    if wrapped:
        load({"mlp.gate_up_proj": layer}, {n: t for n, t in tensors.items() if ".mlp." in n})
    else:
        layer.scheme = layer.scheme.inner
        for i, member in enumerate(MEMBERS["mlp.gate_up_proj"]):
            layer.weight.weight_loader(layer.weight, tensors[member_key("mlp.gate_up_proj", member, "weight")], i)
            layer.weight_scale.weight_loader(layer.weight_scale, tensors[member_key("mlp.gate_up_proj", member, "weight_scale")], i)
        layer.input_scale.data.copy_(tensors[member_key("mlp.gate_up_proj", "gate_proj", "input_scale")].reshape(1))
    layer.quant_method.process_weights_after_loading(layer)
    scale = layer.input_scale.data
    torch.manual_seed(0)
    x = torch.randn(5, layer.input_size, dtype=torch.bfloat16) * (64 * scale)
    x[0, 0] = 300 * scale  # beyond the calibrated range: the static quantizer clips it to 127 steps
    got = layer.quant_method.apply(layer, x)
    want = static_int8(x, scale)
    if wrapped:
        assert torch.equal(seen["a"], want) and seen["a"][0, 0] == 127
        assert torch.equal(seen["scale_a"], scale.float().expand(5, 1))
        dense = (want.float() * scale.float()) @ (layer.weight.float() * layer.weight_scale.float().reshape(1, -1))
        assert torch.equal(got, dense.to(torch.bfloat16))
    else:  # per token: each row's own amax / 127, the static scale unread
        assert not torch.equal(seen["a"], want)
        assert torch.equal(seen["scale_a"].reshape(-1), x.float().abs().amax(-1) / 127)


def test_an_asymmetric_input_is_refused_at_run_time(gpu_branch: None) -> None:
    layer = int8_layers(input_symmetric=False)["mlp.gate_up_proj"]
    layer.input_zero_point = torch.nn.Parameter(torch.zeros((), dtype=torch.int32), requires_grad=False)
    with pytest.raises(NotImplementedError, match="asymmetric static INT8 input"):
        layer.scheme.apply_weights(layer, torch.zeros(1, layer.input_size, dtype=torch.bfloat16))
