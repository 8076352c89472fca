"""The run-time pre_quant_scale wrapper on its own: tensor-parallel slices, fused members, a scale
that never arrives. (The engine tests run it inside vLLM, with tensor parallelism 1.)"""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearMethodBase

from lazyxform import InconsistentScalesError, MissingTensorError
from lazyxform_vllm.linear import PreQuantScaleLinearMethod


class Dense(LinearMethodBase):
    """Stands in for the wrapped compressed-tensors method."""

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype, **extra
    ):
        layer.weight = torch.nn.Parameter(
            torch.randn(sum(output_partition_sizes), input_size_per_partition), requires_grad=False
        )

    def process_weights_after_loading(self, layer):
        layer.processed = True

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)


def wrapped_layer(in_per_rank: int, tp_rank: int = 0) -> tuple[torch.nn.Module, PreQuantScaleLinearMethod]:
    layer = torch.nn.Module()
    layer.prefix, layer.tp_rank = "model.layers.0.self_attn.o_proj", tp_rank
    method = PreQuantScaleLinearMethod(Dense())
    method.create_weights(layer, in_per_rank, [3], in_per_rank * 2, 3, torch.float32)
    return layer, method


def test_scales_the_input_of_the_wrapped_method() -> None:
    layer, method = wrapped_layer(4)
    scale = torch.tensor([0.5, 2.0, 4.0, 1.0])
    layer.pre_quant_scale.weight_loader(layer.pre_quant_scale, scale)
    method.process_weights_after_loading(layer)
    x = torch.randn(2, 4)
    assert layer.processed and layer.requires_unquantized_input
    assert torch.equal(method.apply(layer, x), torch.nn.functional.linear(x * scale, layer.weight))
    assert type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED


def test_row_parallel_rank_loads_its_slice_of_the_input() -> None:
    layer, _ = wrapped_layer(4, tp_rank=1)
    layer.pre_quant_scale.weight_loader(layer.pre_quant_scale, torch.arange(1.0, 9.0))
    assert torch.equal(layer.pre_quant_scale, torch.tensor([5.0, 6.0, 7.0, 8.0]))


def test_fused_members_must_share_the_scale() -> None:
    layer, _ = wrapped_layer(4)
    scale = torch.tensor([0.5, 2.0, 4.0, 1.0])
    for shard in ("q", "k"):
        layer.pre_quant_scale.weight_loader(layer.pre_quant_scale, scale, shard)
    with pytest.raises(InconsistentScalesError, match="fused member v differs"):
        layer.pre_quant_scale.weight_loader(layer.pre_quant_scale, scale * 2, "v")


def test_a_scale_that_never_arrived_is_an_error() -> None:
    layer, method = wrapped_layer(4)
    with pytest.raises(MissingTensorError, match="o_proj: the checkpoint stream carried no pre_quant_scale"):
        method.process_weights_after_loading(layer)
