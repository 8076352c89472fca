"""INT4 group weights: W4A16_AWQ (from INT4_AWQ and INT4_BLOCKWISE_WEIGHT_ONLY) and W4A8_AWQ.

ModelOpt: W[r, k] = q[r, k] * weight_scale[r, k // group], q signed int4, no zero point, two
OUTPUT rows per byte. compressed-tensors pack-quantized: eight INPUT columns per int32, offset +8,
group scales in the model dtype (the one rounding of this recipe: fp32 -> bf16, 2^-8 relative).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UnsupportedAlgoError
from ..modelopt import AlgoConfig
from ..ops.int4 import int4_rows_to_ct_packed, int4_rows_to_ct_packed_many, int4_rows_values
from ..ops.pack import shape_tensor, shape_tensors
from ..plan import Rule, Tensors
from .base import (
    PQS,
    Args,
    Module,
    Recipe,
    RowFactor,
    Target,
    block_count,
    check_scale,
    checked_and_dropped,
    expect,
    scale_rule,
)
from .fp8 import fp8_args

DEFAULT_GROUP = 128  # ModelOpt's INT4 block size when the config does not say


def int4_group_weights(cfg: AlgoConfig) -> Args:
    if cfg.has_zero_point:
        raise UnsupportedAlgoError(f"quant_algo {cfg.algo} with has_zero_point: true (asymmetric INT4) is not supported")
    return Args(num_bits=4, type="int", symmetric=True, strategy="group", group_size=cfg.group_size or DEFAULT_GROUP, dynamic=False)


def repack_many(work: Sequence[tuple[Rule, Tensors]]) -> list[dict[str, torch.Tensor]]:
    """The repack rules of a batch: one kernel per weight width, one copy for all the weight_shapes."""
    packed = int4_rows_to_ct_packed_many([t[r.inputs[0]] for r, t in work])
    shapes = shape_tensors([(p.shape[-2], p.shape[-1] * 8) for p in packed], packed[0].device)
    return [{r.outputs[0]: p, r.outputs[1]: s} for (r, _), p, s in zip(work, packed, shapes, strict=True)]


class Int4AwqRecipe(Recipe):
    """W4A16_AWQ -> WNA16 int4 group, pack-quantized. Group scales are per row, so a pre_quant_scale
    row fold multiplies into them before their one rounding to the model dtype."""

    algos = ("W4A16_AWQ",)
    writes = ("weight_packed", "weight_shape", "weight_scale")
    row_scalable = True
    nibble_dim = 0

    def target(self, cfg: AlgoConfig) -> Target:
        return Target(int4_group_weights(cfg), None, "pack-quantized")

    def expect_weight(self, m: Module) -> tuple[int, int]:
        out, inp = self.weight_shape(m)
        groups = block_count(m, inp, int4_group_weights(m.cfg).group_size)
        expect(m.info("weight"), (torch.uint8,), (out // 2, inp))
        expect(m.info("weight_scale"), (torch.float32,), (out, groups))
        return out, inp

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.expect_weight(m)
        w, packed, shape = m.key("weight"), m.key("weight_packed"), m.key("weight_shape")

        def repack(t: Tensors) -> dict[str, torch.Tensor]:
            return {packed: int4_rows_to_ct_packed(t[w]), shape: shape_tensor((out, inp), t[w].device)}

        dtype = str(m.model_dtype).removeprefix("torch.")
        return [
            Rule("weight uint8 [out/2, in] (2 rows per byte) -> weight_packed int32 [out, in/8] + weight_shape", (w,), (packed, shape), repack, repack_many),
            scale_rule(f"weight_scale: float32 -> {dtype}", m.key("weight_scale"), m.key("weight_scale"), lambda s: s, dtype=m.model_dtype, row_factor=row_factor),
        ]

    def dense_rules(self, m: Module) -> list[Rule]:
        """W = q * weight_scale (per group), times the module's pre_quant_scale over the input
        columns when it has one (the dense experts of fallback.plan_dense_experts): formed in
        float64, where q (4 bits) x an fp32 scale x a 16- or 32-bit pre_quant_scale is exact, then
        rounded once to the model dtype. Other scales (W4A8's) are checked and dropped: the engine
        runs the dense weight on unquantized activations."""
        out, inp = self.expect_weight(m)
        w, ws = m.key("weight"), m.key("weight_scale")
        pqs = (m.key(PQS),) if PQS in m.tensors else ()

        def dense(t: Tensors) -> dict[str, torch.Tensor]:
            for n in (ws, *pqs):
                check_scale(n, t[n])
            scale = t[ws].double()
            weight = int4_rows_values(t[w]).double() * scale.repeat_interleave(inp // scale.shape[1], dim=1)
            for n in pqs:
                weight = weight * t[n].double()
            return {w: weight.to(m.model_dtype)}

        dtype = str(m.model_dtype).removeprefix("torch.")
        label = f"weight = int4 x weight_scale{' x pre_quant_scale (columns)' if pqs else ''} -> {dtype}"
        others = [s for s in self.reads if s not in ("weight", "weight_scale")]
        return [Rule(label, (w, ws, *pqs), (w,), dense), *(checked_and_dropped(m.key(s), "unquantized activations") for s in others)]


class W4A8AwqRecipe(Int4AwqRecipe):
    """W4A8_AWQ -> the W4AFP8 scheme (vLLM's CompressedTensorsW4A8Fp8, CUTLASS on Hopper): the same
    int4 group weights, activations FP8 per token, dynamic.

    `weight_scale_2` is the per-tensor scale of ModelOpt's second (FP8) weight quantizer: the stored
    int4 values and group scales do not use it (W = q * weight_scale). vLLM derives its own FP8 form
    of the group scales at load (per row), so it is checked and dropped. The static per-tensor FP8
    `input_scale` has no place in a per-token dynamic scheme: checked and dropped too."""

    algos = ("W4A8_AWQ",)
    reads = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    shared = ("input_scale",)

    def target(self, cfg: AlgoConfig) -> Target:
        return Target(int4_group_weights(cfg), fp8_args("token", True), "pack-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        expect(m.info("weight_scale_2"), (torch.float32,), ())
        return [*super().rules(m, row_factor), checked_and_dropped(m.key("weight_scale_2"), "W = q * weight_scale does not use it")]

    def fused_rules(self, members: Sequence[Module]) -> list[Rule]:
        for m in members:
            expect(m.info("input_scale"), (torch.float32,), ())
        return [checked_and_dropped(m.key("input_scale"), "activations are quantized per token at run time") for m in members]
