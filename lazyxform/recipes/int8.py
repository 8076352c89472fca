"""INT8 per-channel weights: with static int8 activations (W8A8_SQ_PER_CHANNEL, from INT8_DEFAULT
and INT8_SMOOTHQUANT) or weight-only (W8A16)."""

from __future__ import annotations

import torch

from ..modelopt import AlgoConfig
from ..ops.pack import pack_int32_cols, shape_tensor
from ..plan import Rule, Tensors
from .base import Args, Module, Recipe, RowFactor, Target, expect, passthrough, scale_rule


def int8_channel_weights() -> Args:
    return Args(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)


def per_row_scale(m: Module, out: int, row_factor: RowFactor | None, dtype: torch.dtype) -> Rule:
    expect(m.info("weight_scale"), (torch.float32,), (out,))
    return scale_rule(
        "weight_scale: [out] -> [out, 1]" + (f" as {str(dtype).removeprefix('torch.')}" if dtype != torch.float32 else ""),
        m.key("weight_scale"),
        m.key("weight_scale"),
        lambda s: s.reshape(-1, 1),
        dtype=dtype,
        row_factor=row_factor,
    )


class Int8SmoothQuantRecipe(Recipe):
    """W = int8 * weight_scale[:, None]; one static per-tensor int8 activation scale. vLLM's W8A8Int8
    holds a single input_scale for a fused q/k/v or gate/up layer, so fused scales are merged."""

    algos = ("W8A8_SQ_PER_CHANNEL",)
    reads = ("weight", "weight_scale", "input_scale")
    shared = ("input_scale",)
    writes = ("weight", "weight_scale", "input_scale")
    row_scalable = True

    def target(self, cfg: AlgoConfig) -> Target:
        activations = Args(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
        return Target(int8_channel_weights(), activations, "int-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        expect(m.info("weight"), (torch.int8,), (out, inp))
        return [passthrough(m.key("weight")), per_row_scale(m, out, row_factor, torch.float32)]


class Int8WeightOnlyRecipe(Recipe):
    """W8A16 -> WNA16 pack-quantized: int8 values offset by +128, four per int32 along the input dim;
    the scale is stored in the model dtype, as compressed-tensors and vLLM's WNA16 keep it."""

    algos = ("W8A16",)
    writes = ("weight_packed", "weight_shape", "weight_scale")
    row_scalable = True

    def target(self, cfg: AlgoConfig) -> Target:
        return Target(int8_channel_weights(), None, "pack-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        expect(m.info("weight"), (torch.int8,), (out, inp))
        w, packed, shape = m.key("weight"), m.key("weight_packed"), m.key("weight_shape")

        def pack(t: Tensors) -> dict[str, torch.Tensor]:
            return {packed: pack_int32_cols(t[w], 8), shape: shape_tensor((out, inp), t[w].device)}

        return [
            Rule("weight int8 [out, in] -> weight_packed int32 [out, in/4] + weight_shape", (w,), (packed, shape), pack),
            per_row_scale(m, out, row_factor, m.model_dtype),
        ]
