"""NVFP4 family: NVFP4, NVFP4_AWQ, W4A16_NVFP4, W4A8_NVFP4_FP8 -> nvfp4-pack-quantized; NVFP4_SVD -> dense.

ModelOpt: W = e2m1(nibble) * float(weight_scale)[r, k // block] * weight_scale_2, two input columns
per byte (low nibble = even column), FP8 E4M3 block scales. compressed-tensors keeps those bytes
and block scales (blocks of 16) and stores the per-tensor scales as divisors:
weight_global_scale = 1 / weight_scale_2, input_global_scale = 1 / input_scale (fp32, [1]).
The engine divides the block scale by the global scale; 1/(1/x) differs from x in the last fp32
bit for some x, which is the only difference from ModelOpt's product (2^-23 relative).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..checks import require, require_positive_finite
from ..errors import UnsupportedAlgoError
from ..modelopt import AlgoConfig
from ..ops.fp4 import e2m1_to_float, reciprocal_global_scale, split_block_scales
from ..plan import Rule, Tensors
from .base import (
    FLOAT_DTYPES,
    PQS,
    Module,
    Recipe,
    RowFactor,
    Target,
    block_count,
    check_equal,
    check_scale,
    dropped_input_scales,
    expect,
    preset_target,
    renamed,
    scale_rule,
)

FP8 = torch.float8_e4m3fn
CT_BLOCK = 16  # compressed-tensors' NVFP4 block
LORA_A = "weight_quantizer._svdquant_lora_a"
LORA_B = "weight_quantizer._svdquant_lora_b"


def global_scale_rule(members: Sequence[Module], src: str, dst: str) -> Rule:
    """Per-tensor multiplier -> compressed-tensors divisor. The engine keeps one global scale per
    fused GEMM (vLLM takes the max), so fused siblings must agree exactly; ModelOpt unifies them."""
    names = tuple(m.key(src) for m in members)
    outs = tuple(m.key(dst) for m in members)
    for m in members:
        expect(m.info(src), (torch.float32,), ())

    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        for n in names:
            check_scale(n, t[n])
        shared = check_equal(names, t, f"{src} of siblings fused into one GEMM")
        divisor = reciprocal_global_scale(shared)
        return {o: divisor.clone() for o in outs}

    return Rule(f"{src} -> {dst} = 1 / {src} as [1], equal across fused siblings", names, outs, fn, global_scales_together)


def global_scales_together(work: Sequence[tuple[Rule, Tensors]]) -> list[dict[str, torch.Tensor]]:
    """Every global-scale rule of a batch in a few launches: all the scalars in one vector, checked
    and inverted at once. Should a check fail, each rule's own function names the culprit."""
    scalars = torch.stack([t[n].reshape(()) for r, t in work for n in r.inputs])
    first = []  # per scalar: where the first sibling of its fused set sits
    for r, _ in work:
        first += [len(first)] * len(r.inputs)
    index = torch.tensor(first).to(scalars.device, non_blocking=True)

    def name_the_culprit() -> None:
        for r, t in work:
            r.fn(t)

        raise AssertionError("the batched global-scale check failed where every rule's own check passes")

    require_positive_finite(scalars, name_the_culprit)
    require((scalars == scalars[index]).all(), name_the_culprit)
    divisors = torch.reciprocal(scalars.float())
    out, at = [], 0
    for r, _ in work:
        out.append({o: divisors[at : at + 1] for o in r.outputs})
        at += len(r.inputs)
    return out


class Nvfp4Recipe(Recipe):
    """NVFP4 and NVFP4_AWQ (W4A4): the NVFP4 preset, FP4 activations with a static global scale.
    FP8 block scales cannot absorb a row factor exactly, so pre_quant_scale row folds are refused."""

    algos = ("NVFP4", "NVFP4_AWQ")
    reads = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    shared = ("weight_scale_2", "input_scale")
    writes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    nibble_dim = 1
    preset: ClassVar[str] = "NVFP4"
    default_block: ClassVar[int] = 16

    def target(self, cfg: AlgoConfig) -> Target | None:
        return preset_target(self.preset, "nvfp4-pack-quantized")

    def block(self, m: Module) -> int:
        block = m.cfg.group_size or self.default_block
        if block % CT_BLOCK:
            raise UnsupportedAlgoError(f"{m.name}: {m.cfg.algo} with group_size {block}; only multiples of {CT_BLOCK} map onto NVFP4 blocks")
        return block

    def expect_weight(self, m: Module) -> int:
        """Header checks of the FP4 weight and its block scales; returns the ModelOpt block size."""
        out, inp = self.weight_shape(m)
        block = self.block(m)
        expect(m.info("weight"), (torch.uint8,), (out, inp // 2))
        expect(m.info("weight_scale"), (FP8,), (out, block_count(m, inp, block)))
        return block

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        parts = self.expect_weight(m) // CT_BLOCK
        scale = m.key("weight_scale")
        if parts == 1:
            scales = scale_rule("weight_scale: float8_e4m3fn, unchanged", scale, scale, lambda s: s, dtype=FP8)
        else:
            label = f"weight_scale: each block scale repeated x{parts} for 16-column blocks (exact)"
            scales = scale_rule(label, scale, scale, functools.partial(split_block_scales, parts=parts), dtype=FP8)
        return [renamed(m.key("weight"), m.key("weight_packed")), scales]

    def fused_rules(self, members: Sequence[Module]) -> list[Rule]:
        return [
            global_scale_rule(members, "weight_scale_2", "weight_global_scale"),
            global_scale_rule(members, "input_scale", "input_global_scale"),
        ]


class W4A16Nvfp4Recipe(Nvfp4Recipe):
    """W4A16_NVFP4: the NVFP4A16 preset (weights only)."""

    algos = ("W4A16_NVFP4",)
    reads = ("weight", "weight_scale", "weight_scale_2")
    shared = ("weight_scale_2",)
    writes = ("weight_packed", "weight_scale", "weight_global_scale")
    preset = "NVFP4A16"

    def fused_rules(self, members: Sequence[Module]) -> list[Rule]:
        return [global_scale_rule(members, "weight_scale_2", "weight_global_scale")]


class W4A8Nvfp4Fp8Recipe(W4A16Nvfp4Recipe):
    """W4A8_NVFP4_FP8: NVFP4 weights in 32-column blocks with weight_scale_2 = amax/448, static FP8
    activations. Each 32-block scale serves two 16-blocks unchanged, so the weights are NVFP4A16
    exactly. No compressed-tensors scheme pairs NVFP4 weights with FP8 activations, so activations
    run unquantized and the FP8 input_scale is checked and dropped."""

    algos = ("W4A8_NVFP4_FP8",)
    reads = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    shared = ("weight_scale_2", "input_scale")
    default_block = 32

    def fused_rules(self, members: Sequence[Module]) -> list[Rule]:
        return [*super().fused_rules(members), *dropped_input_scales(members, "NVFP4A16 keeps activations unquantized")]


class Nvfp4SvdRecipe(Nvfp4Recipe):
    """NVFP4_SVD (SVDQuant): y = (x * pqs) @ (W_res + B @ A)^T, W_res NVFP4, A [r, in], B [out, r].
    No compressed-tensors scheme has a low-rank branch, so there is no target: the dequantize
    fallback computes W = (W_res + B @ A) * pqs[None, :] and rounds it to the model dtype; the NVFP4
    input_scale is checked and dropped (activations run unquantized). The sum is formed in float64,
    where every product of these 16-bit factors and their short sums are exact, so the result does
    not depend on the device's summation order."""

    algos = ("NVFP4_SVD",)
    reads = ("weight", "weight_scale", "weight_scale_2", "input_scale", LORA_A, LORA_B)
    shared = ()
    writes = ("weight",)

    def target(self, cfg: AlgoConfig) -> Target | None:
        return None

    def dense_rules(self, m: Module) -> list[Rule]:
        out, inp = self.weight_shape(m)
        block = self.expect_weight(m)
        rank = next(iter(m.info(LORA_A).shape), 0)  # a 0-d lora_a then fails the [rank, in] check
        expect(m.info(LORA_A), FLOAT_DTYPES, (rank, inp))
        expect(m.info(LORA_B), FLOAT_DTYPES, (out, rank))
        expect(m.info("weight_scale_2"), (torch.float32,), ())
        expect(m.info("input_scale"), (torch.float32,), ())
        w, ws, ws2, lora_a, lora_b = (m.key(s) for s in ("weight", "weight_scale", "weight_scale_2", LORA_A, LORA_B))
        pqs = m.key(PQS) if PQS in m.tensors else None
        scales = (ws, ws2, m.key("input_scale"), *((pqs,) if pqs else ()))

        def dense(t: Tensors) -> dict[str, torch.Tensor]:
            for n in scales:
                check_scale(n, t[n])
            residual = e2m1_to_float(t[w]).double() * split_block_scales(t[ws].double(), block) * t[ws2].double()
            effective = residual + t[lora_b].double() @ t[lora_a].double()
            if pqs is not None:
                effective = effective * t[pqs].double()
            return {w: effective.to(m.model_dtype)}

        dtype = str(m.model_dtype).removeprefix("torch.")
        label = f"weight = (NVFP4 residual + lora_b @ lora_a){' * pre_quant_scale' if pqs else ''} -> {dtype}"
        return [Rule(label, (w, lora_a, lora_b, *scales), (w,), dense)]
