"""FP8 E4M3 weights: per-tensor (FP8), per-channel (FP8_PER_CHANNEL_PER_TOKEN), 128x128 blocks (FP8_PB_WO).

Weights are stored as compressed-tensors expects already; only scale layouts change.
"""

from __future__ import annotations

from typing import Any

import torch

from ..modelopt import AlgoConfig
from ..plan import Rule
from .base import Args, Module, Recipe, RowFactor, Target, expect, passthrough, scale_rule

FP8 = torch.float8_e4m3fn
BLOCK = 128


def fp8_args(strategy: str, dynamic: bool, **extra: Any) -> Args:
    return Args(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=dynamic, **extra)


class Fp8PerTensorRecipe(Recipe):
    """W = fp8 * weight_scale; static per-tensor activation scale. vLLM keeps one weight scale per
    fused shard and requantizes to the max itself, so per-shard scales pass through unmerged."""

    algos = ("FP8",)
    reads = ("weight", "weight_scale", "input_scale")
    shared = ("input_scale",)
    writes = ("weight", "weight_scale", "input_scale")

    def target(self, cfg: AlgoConfig) -> Target:
        return Target(fp8_args("tensor", False), fp8_args("tensor", False), "float-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        expect(m.info("weight"), (FP8,), (out, inp))
        expect(m.info("weight_scale"), (torch.float32,), ())
        return [
            passthrough(m.key("weight")),
            scale_rule("weight_scale: 0-d -> [1]", m.key("weight_scale"), m.key("weight_scale"), lambda s: s.reshape(1)),
        ]


class Fp8PerChannelRecipe(Recipe):
    """W = fp8 * weight_scale[:, None]; activations quantized per token at run time."""

    algos = ("FP8_PER_CHANNEL_PER_TOKEN",)
    row_scalable = True

    def target(self, cfg: AlgoConfig) -> Target:
        return Target(fp8_args("channel", False), fp8_args("token", True), "float-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        expect(m.info("weight"), (FP8,), (out, inp))
        expect(m.info("weight_scale"), (torch.float32,), (out,))
        return [
            passthrough(m.key("weight")),
            scale_rule(
                "weight_scale: [out] -> [out, 1]",
                m.key("weight_scale"),
                m.key("weight_scale"),
                lambda s: s.reshape(-1, 1),
                row_factor=row_factor,
            ),
        ]


class Fp8BlockRecipe(Recipe):
    """W = fp8 * weight_scale per 128x128 block; compressed-tensors wants the scale as [out/128, in/128].
    Activations: dynamic per token-group of 128, as vLLM's native FP8_PB_WO path runs them.

    - FP8_PB_WO: ModelOpt keeps the quantizer's keep-dim amax shape [out/128, 1, in/128, 1].
    - FP8_PB_REAL (`fp8_pb_real`): weights ModelOpt received already block-quantized; it exports the
      quantizer's own scale, [out/128, in/128].
    - FP8_BLOCK_SCALES: TensorRT-LLM's name for the same layout, used by NVIDIA's releases (MoE experts
      in MIXED_PRECISION configs), whose scale may be stored as `weight_scale_inv`, [out/128, in/128]:
      a multiplier despite its name, as in DeepSeek's own FP8 release.
    """

    algos = ("FP8_PB_WO", "FP8_PB_REAL", "FP8_BLOCK_SCALES")
    read_as = {"weight_scale_inv": "weight_scale"}

    def target(self, cfg: AlgoConfig) -> Target:
        return Target(
            fp8_args("block", False, block_structure=(BLOCK, BLOCK)),
            fp8_args("group", True, group_size=BLOCK),
            "float-quantized",
        )

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        ob, ib = -(-out // BLOCK), -(-inp // BLOCK)
        expect(m.info("weight"), (FP8,), (out, inp))
        keep_dim = len(m.info("weight_scale").shape) == 4
        expect(m.info("weight_scale"), (torch.float32,), (ob, 1, ib, 1) if keep_dim else (ob, ib))
        src = m.source("weight_scale")
        layout = "[out/128, 1, in/128, 1] -> [out/128, in/128]" if keep_dim else "[out/128, in/128], unchanged"
        return [
            passthrough(m.key("weight")),
            scale_rule(
                f"{src.rsplit('.', 1)[1]}: {layout}",
                src,
                m.key("weight_scale"),
                lambda s: s.reshape(ob, ib),
            ),
        ]
