"""lazyxform_vllm/marlin_moe.py: the Marlin MoE gate/up scale order, against vLLM's own scale
permutation (marlin_moe_permute_scales, plain torch, runs on a CPU) with the size_k vLLM passes and
with the true one. The Marlin kernel itself needs a GPU: benchmarks/gpu_marlin_moe.py runs it there,
and benchmarks/gpu_fixtures.py serves qwen3moe_int4_awq through it."""

from __future__ import annotations

import pytest
import torch
from reference import FIXTURES
from test_vllm_experts import Kernel
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import _pad_w13_shard_cols
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.utils.marlin_utils import (
    marlin_moe_padded_intermediate,
    marlin_moe_permute_scales,
)

from lazyxform.emulate import mix_in
from lazyxform_vllm import quant_config
from lazyxform_vllm.config_parser import MARK
from lazyxform_vllm.marlin_moe import MarlinGateUpScaleOrder, reorder_gate_up_scales

EXPERTS = 3


def loaded_scales(hidden: int, inter: int, group: int) -> torch.Tensor:
    """[experts, groups along hidden, 2 * inter] bf16 scales, every one different (a wrong order shows)."""
    g = torch.Generator().manual_seed(hidden + inter + group)
    return (0.01 + 0.02 * torch.rand(EXPERTS, hidden // group, 2 * inter, generator=g)).to(torch.bfloat16)


def vllm_order(loaded: torch.Tensor, group: int, size_k: int) -> torch.Tensor:
    """What vLLM's _process_weights_marlin makes of K-first w13 scales: pad each half to Marlin's
    tile, then permute with `size_k`."""
    inter = loaded.shape[2] // 2
    padded = _pad_w13_shard_cols(loaded, inter, marlin_moe_padded_intermediate(inter, group))
    return marlin_moe_permute_scales(padded, size_k=size_k, size_n=padded.shape[2], group_size=group)


# (hidden, intermediate per rank, group): the fixture's; Qwen3-30B-A3B's experts at TP=8 (768 / 8 = 96,
# padded to 128); and an intermediate size above the group, where vLLM's order is already right.
SHAPES = [(256, 128, 128), (2048, 96, 128), (256, 256, 128)]


@pytest.mark.parametrize(("hidden", "inter", "group"), SHAPES)
@pytest.mark.parametrize("n_first", [False, True])
def test_the_one_group_order_becomes_the_grouped_one(hidden: int, inter: int, group: int, n_first: bool) -> None:
    loaded = loaded_scales(hidden, inter, group)
    right = vllm_order(loaded, group, size_k=hidden)
    got = vllm_order(loaded, group, size_k=inter)  # vLLM's size_k for w13 (0.26 to 0.32)
    wrong = not torch.equal(got, right)
    assert wrong == (inter <= group)
    # vLLM 0.32's method holds the loaded scales N-first; 0.26's Marlin method K-first.
    held = loaded.transpose(1, 2).contiguous() if n_first else loaded
    assert reorder_gate_up_scales(got, held) == wrong
    assert torch.equal(got, right)


def test_scales_vllm_changed_or_left_raw_are_left_alone() -> None:
    loaded = loaded_scales(256, 128, 128)
    for processed in (
        vllm_order(loaded, 128, size_k=128) * 512,  # vLLM's FP8-activation Marlin scales
        loaded.clone(),  # a backend that keeps them as loaded
        vllm_order(torch.full_like(loaded, 0.5), 128, size_k=128),  # equal scales: every order is right
    ):
        before = processed.clone()
        assert not reorder_gate_up_scales(processed, loaded)
        assert torch.equal(processed, before)


def test_the_method_repairs_after_vllms_own_processing() -> None:
    """MarlinGateUpScaleOrder around a method whose processing does what vLLM's does to w13's scales."""

    class VllmMarlin(Kernel):
        def process_weights_after_loading(self, layer) -> None:
            layer.w13_weight_scale = torch.nn.Parameter(vllm_order(layer.w13_weight_scale.data, 128, size_k=128), requires_grad=False)

    layer = torch.nn.Module()
    layer.layer_name = "model.layers.0.mlp.experts"
    loaded = loaded_scales(256, 128, 128)
    layer.w13_weight_scale = torch.nn.Parameter(loaded.clone(), requires_grad=False)
    method = VllmMarlin()
    method.__class__ = mix_in(MarlinGateUpScaleOrder, VllmMarlin)
    assert type(method).__name__ == "VllmMarlin"  # vLLM's expert weight loader dispatches on the name
    method.process_weights_after_loading(layer)
    assert torch.equal(layer.w13_weight_scale, vllm_order(loaded, 128, size_k=256))


@pytest.mark.parametrize(("name", "mixed"), [("qwen3moe_int4_awq", True), ("qwen3moe_fp8", False)])
def test_integer_weight_only_experts_get_the_repair_on_a_gpu(name: str, mixed: bool, monkeypatch) -> None:
    """The plugin's choice on a GPU (simulated): vLLM's own experts method, with MarlinGateUpScaleOrder
    in front for integer weight-only experts only, under the method's own class name."""
    monkeypatch.setattr(quant_config.current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(CompressedTensorsConfig, "get_quant_method", lambda self, layer, prefix: Kernel())
    config = quant_config.LazyxformConfig.from_config({MARK: {"checkpoint": str(FIXTURES / name), "served": True}})
    layer = RoutedExperts.__new__(RoutedExperts)
    torch.nn.Module.__init__(layer)
    layer.ckpt_gate_proj_name, layer.ckpt_down_proj_name, layer.layer_name = "gate_proj", "down_proj", "model.layers.0.mlp.experts"
    method = config.get_quant_method(layer, "model.layers.0.mlp.experts")
    assert type(method).__name__ == "Kernel"
    assert isinstance(method, MarlinGateUpScaleOrder) == mixed
