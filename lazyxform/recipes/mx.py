"""OCP MX formats: MXFP8, MXFP4 (`mxfp4` in configs), W4A8_MXFP4_FP8 -> mxfp8-quantized / mxfp4-pack-quantized.

ModelOpt and compressed-tensors store the same bytes: FP8 E4M3 or E2M1 pairs (low nibble = even
column) and one uint8 E8M0 scale 2^(s - 127) per 32 input columns. Bit-exact; only the packed FP4
weight is renamed. E8M0 255 is NaN and rejected; 0 is the valid 2^-127.
"""

from __future__ import annotations

import torch

from ..checks import require
from ..errors import BadScaleError, UnsupportedAlgoError
from ..modelopt import AlgoConfig
from ..plan import Rule, Tensors
from .base import PRESETS, Module, Recipe, RowFactor, Target, block_count, expect, passthrough, preset_target, renamed
from .fp8 import FP8, fp8_args

MX_BLOCK = 32
E8M0_NAN = 255


def e8m0_scale_rule(m: Module, out: int, inp: int) -> Rule:
    if m.cfg.group_size not in (None, MX_BLOCK):
        raise UnsupportedAlgoError(f"{m.name}: {m.cfg.algo} with group_size {m.cfg.group_size}; MX blocks are {MX_BLOCK} columns")
    expect(m.info("weight_scale"), (torch.uint8,), (out, block_count(m, inp, MX_BLOCK)))
    name = m.key("weight_scale")

    def check(t: Tensors) -> dict[str, torch.Tensor]:
        nan = t[name] == E8M0_NAN

        def fail() -> None:
            first = [int(i) for i in nan.nonzero()[0]]
            raise BadScaleError(f"{name}: {int(nan.sum())} of {nan.numel()} E8M0 scale values are 255 (NaN) (first at index {first})")

        require(~nan.any(), fail)
        return {name: t[name]}

    return Rule("weight_scale: uint8 E8M0 per 32 columns, unchanged", (name,), (name,), check)


class Mxfp8Recipe(Recipe):
    """MXFP8 -> the MXFP8 preset: activations MXFP8 dynamic, as ModelOpt's MXFP8_DEFAULT_CFG."""

    algos = ("MXFP8",)

    def target(self, cfg: AlgoConfig) -> Target | None:
        return preset_target("MXFP8", "mxfp8-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        expect(m.info("weight"), (FP8,), (out, inp))
        return [passthrough(m.key("weight")), e8m0_scale_rule(m, out, inp)]


class Mxfp4Recipe(Recipe):
    """MXFP4 -> the MXFP4 preset: activations MXFP4 dynamic, as ModelOpt's MXFP4_DEFAULT_CFG."""

    algos = ("MXFP4",)
    writes = ("weight_packed", "weight_scale")
    nibble_dim = 1

    def target(self, cfg: AlgoConfig) -> Target | None:
        return preset_target("MXFP4", "mxfp4-pack-quantized")

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        out, inp = self.weight_shape(m)
        expect(m.info("weight"), (torch.uint8,), (out, inp // 2))
        return [renamed(m.key("weight"), m.key("weight_packed")), e8m0_scale_rule(m, out, inp)]


class W4A8Mxfp4Fp8Recipe(Mxfp4Recipe):
    """W4A8_MXFP4_FP8: MXFP4 weights, FP8 activations. ModelOpt's preset never calibrates the
    per-tensor FP8 input quantizer (no input_scale is exported), so its scale is computed per call;
    vLLM's W4A8 MXFP4 scheme quantizes per token, dynamically: same FP8 format, finer scales."""

    algos = ("W4A8_MXFP4_FP8",)

    def target(self, cfg: AlgoConfig) -> Target | None:
        return Target(PRESETS["MXFP4", "weights"], fp8_args("token", True), "mxfp4-pack-quantized")
