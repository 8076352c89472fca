"""vLLM's Marlin WNA16 MoE against the same INT4 experts computed with plain torch, on a few shapes.

    PYTHONPATH=/tmp/site python3 benchmarks/gpu_marlin_moe.py [--out DIR]   # on the GPU (CUDA vLLM kit); JSON to DIR or $OUT

Why: qwen3moe_int4_awq (hidden 256, moe_intermediate 128, INT4 group 128) on vLLM 0.26's default WNA16
MoE backend (Marlin) is 4.6x the reference's noise on an H200, on its `emulation` backend 1.0x, and
vLLM alone on a compressed-tensors copy 5.4x (docs/vllm.md). This takes the model and lazyxform away:
random symmetric INT4 experts with bf16 group scales, prepared by vLLM's own weight processing
(`_process_weights_marlin`, what CompressedTensorsWNA16MarlinMoEMethod.process_weights_after_loading
calls) and run through `fused_marlin_moe` with the arguments MarlinExperts.apply passes.

What reading vLLM 0.26 suggests: `_process_weights_marlin` permutes w13's scales with
`size_k=layer.intermediate_size_per_partition`, but w13's K is the hidden size. `marlin_permute_scales`
takes the channelwise ("single") permutation when group_size >= size_k, while the kernel decides grouped
or channelwise from the scales' group count along K (hidden // group). Where intermediate <= group <
hidden (the fixture: 128, 128, 256), w13's scales reach a grouped kernel in the channelwise layout.
down_proj (one group along K = intermediate) is permuted and read channelwise alike.

Arms: `vllm` (vLLM's `_process_weights_marlin` itself), `lazyxform` (that, then the plugin's repair,
lazyxform_vllm/marlin_moe.py) and `true-k` (the same calls, w13's scales permuted with size_k = hidden,
as vllm-project/vllm#50196 proposes). Parts: the whole MoE
(`fused_marlin_moe`), gate_up alone and down alone (`ops.moe_wna16_marlin_gemm`, the down GEMM fed the
bf16 reference's activations, so that gate_up's error does not reach it). Each part's deviation from an
exact reference (float64 from the INT4 codes and scales, no vLLM code), relative to the mean |reference|,
next to the same for the reference rounded where a bf16 computation rounds (the noise floor); ratio =
deviation / noise. A ratio well above 1 on the shapes where the layouts differ and about 1 elsewhere
(and on `true-k`) pins the scale permutation.

The data, the GPTQ packing and the references are plain torch and run on a CPU
(tests/benchmarks/test_gpu_marlin_moe.py); only `marlin_*` and `probe_shape` need vLLM and a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lazyxform.ops.pack import pack_int32_cols


@dataclass(frozen=True)
class Shape:
    hidden: int  # K of gate_up, N of down
    inter: int  # moe_intermediate_size per partition: N of gate_up (per half), K of down
    group: int

    @property
    def name(self) -> str:
        return f"K{self.hidden}-N{self.inter}-g{self.group}"


SHAPES = [
    Shape(256, 128, 128),  # the fixture's: down has one group along K, gate_up two
    Shape(256, 256, 128),  # two groups along K in both GEMMs
    Shape(2048, 768, 128),  # a realistic one (Qwen3-30B-A3B's hidden, moe_intermediate)
    Shape(2048, 128, 128),  # intermediate = group again, with 16 groups along gate_up's K
]
EXPERTS = 4
TOPK = 2
TOKENS = (8, 48)  # fused_marlin_moe picks block_size_m 8 and 32 for these
# The scales' spread around their mean (log-normal sigma): the fixture's gate_proj scales vary by 13%
# (std / mean). A permutation error moves each column to another column's scale, so the deviation it
# causes grows with this spread; 0 would hide it.
SCALE_SPREAD = 0.15
CODE_STD = math.sqrt((16**2 - 1) / 12)  # of (code - 8), codes uniform in [0, 15]


@dataclass(frozen=True)
class Case:
    """One MoE layer's inputs in the checkpoint's orientation (Linear weights [out, in])."""

    x: torch.Tensor  # [M, K] bf16
    codes13: torch.Tensor  # [E, 2N, K] uint8 in [0, 15], value code - 8: gate rows, then up rows (vLLM's w13)
    scales13: torch.Tensor  # [E, 2N, K // group] bf16
    codes2: torch.Tensor  # [E, K, N] uint8
    scales2: torch.Tensor  # [E, K, N // group] bf16
    topk_ids: torch.Tensor  # [M, topk] int32 (vLLM's routers give int32)
    topk_weights: torch.Tensor  # [M, topk] float32 (fused_marlin_moe asserts it)
    group: int


def make_case(shape: Shape, tokens: int, seed: int = 0, experts: int = EXPERTS, topk: int = TOPK) -> Case:
    """Random symmetric INT4 experts, bf16 group scales sized so that each GEMM's outputs are O(1),
    bf16 activations, a random softmax router's top-k (not renormalized: Qwen3-MoE's norm_topk_prob
    is false in the fixture)."""
    g = torch.Generator().manual_seed(seed)
    K, N, E = shape.hidden, shape.inter, experts

    def scales(out: int, k: int) -> torch.Tensor:
        spread = torch.exp(SCALE_SPREAD * torch.randn(E, out, k // shape.group, generator=g))
        return (spread / (CODE_STD * math.sqrt(k))).to(torch.bfloat16)

    codes13 = torch.randint(0, 16, (E, 2 * N, K), generator=g, dtype=torch.uint8)
    scales13 = scales(2 * N, K)
    codes2 = torch.randint(0, 16, (E, K, N), generator=g, dtype=torch.uint8)
    scales2 = scales(K, N)
    x = torch.randn(tokens, K, generator=g).to(torch.bfloat16)
    probs = torch.softmax(torch.randn(tokens, E, generator=g), dim=-1)
    weights, ids = probs.topk(topk, dim=-1)
    return Case(x, codes13, scales13, codes2, scales2, ids.to(torch.int32), weights.float().contiguous(), shape.group)


# ---- the checkpoint's tensors as vLLM holds them ----


def pack_gptq(codes: torch.Tensor) -> torch.Tensor:
    """[E, out, in] codes -> [E, in // 8, out] int32, eight rows of K per int32, row 8i + j in bits
    4j..4j+3: GPTQ's layout (vLLM's pack_rows), which is how CompressedTensorsWNA16MarlinMoEMethod holds
    a pack-quantized checkpoint's experts once loaded (transposed, `w13_weight_packed` [E, K // 8, 2N])
    and what `gptq_marlin_moe_repack` reads: compressed-tensors' packing along K (the codes are
    offset-binary, code = value + 8, as there), transposed."""
    return pack_int32_cols(codes.to(torch.int32) - 8, 4).transpose(1, 2).contiguous()


def unpack_gptq(packed: torch.Tensor) -> torch.Tensor:
    """pack_gptq's inverse: [E, in // 8, out] int32 -> [E, out, in] uint8."""
    E, k8, out = packed.shape
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (4 * torch.arange(8, dtype=torch.int64)).view(1, 1, 8, 1)
    nibbles = (p.unsqueeze(2) >> shifts) & 0xF  # [E, in // 8, 8, out]
    return nibbles.reshape(E, k8 * 8, out).transpose(1, 2).to(torch.uint8).contiguous()


def gptq_scales(scales: torch.Tensor) -> torch.Tensor:
    """[E, out, groups] -> [E, groups, out]: `w13_weight_scale` / `w2_weight_scale` as the Marlin MoE
    method creates them."""
    return scales.transpose(1, 2).contiguous()


# ---- the references: plain torch, float64 ----


def dequant(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """(code - 8) * scale of the code's group along the input dimension, exactly (float64)."""
    return (codes.double() - 8) * scales.double().repeat_interleave(group, dim=-1)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, kept in float64."""
    return t.to(torch.bfloat16).double()


def per_expert(rows_in: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row r of the result = rows_in[r] @ weights[ids[r]].T, one matmul per expert."""
    out = torch.zeros(rows_in.shape[0], weights.shape[1], dtype=torch.float64)
    for e in range(weights.shape[0]):
        rows = (ids == e).nonzero().flatten()
        if len(rows):
            out[rows] = rows_in[rows] @ weights[e].T
    return out


def down_reference(case: Case, inter: torch.Tensor, rounded: bool) -> torch.Tensor:
    """[M * topk, K]: each (token, expert) row's down projection times its router weight; rounded: with
    the weights dequantized to bf16 and the product rounded to bf16 (Marlin's output)."""
    w2 = dequant(case.codes2, case.scales2, case.group)
    if rounded:
        w2 = bf16(w2)
    down = per_expert(inter, w2, case.topk_ids.flatten()) * case.topk_weights.flatten().double()[:, None]
    return bf16(down) if rounded else down


def reference(case: Case, rounded: bool = False) -> dict[str, torch.Tensor]:
    """The MoE layer, stage by stage, rows in vLLM's order (token m's j-th expert at row m * topk + j):
    gate_up [M * topk, 2N], inter = silu(gate) * up [M * topk, N], down [M * topk, K] (router weight
    applied), out [M, K] (summed over the top-k). Exact (float64) unless rounded, where every stage a
    bf16 computation writes in bf16 is rounded to bf16 (dequantized weights, gate_up, inter, down, out):
    the noise floor a correct bf16 kernel is expected to reach."""
    M, topk = case.topk_ids.shape
    flat = case.topk_ids.flatten()
    w13 = dequant(case.codes13, case.scales13, case.group)
    if rounded:
        w13 = bf16(w13)
    x = case.x.double().repeat_interleave(topk, dim=0)  # row m * topk + j is token m
    gate_up = per_expert(x, w13, flat)
    if rounded:
        gate_up = bf16(gate_up)
    n = gate_up.shape[1] // 2
    inter = torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
    if rounded:
        inter = bf16(inter)
    down = down_reference(case, inter, rounded)
    out = down.view(M, topk, -1).sum(dim=1)
    if rounded:
        out = bf16(out)
    return {"gate_up": gate_up, "inter": inter, "down": down, "out": out}


def deviation(got: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """max and mean |got - exact|, relative to mean |exact|."""
    d = (got.double().cpu() - exact).abs()
    scale = exact.abs().mean().item()
    return {"max": d.max().item() / scale, "mean": d.mean().item() / scale}


def compare(got: torch.Tensor, exact: torch.Tensor, rounded: torch.Tensor) -> dict[str, dict[str, float]]:
    """got's deviation from the exact reference, the rounded reference's (the noise), and their ratio."""
    dev, noise = deviation(got, exact), deviation(rounded, exact)
    return {"dev": dev, "noise": noise, "ratio": {k: dev[k] / max(noise[k], 1e-30) for k in dev}}


def scale_layouts(shape: Shape) -> dict[str, dict[str, str]]:
    """Per GEMM, the scale permutation vLLM 0.26's _process_weights_marlin applies (marlin_permute_scales:
    grouped when group_size < size_k, with size_k = intermediate_size_per_partition for w13 and the
    scales' groups times group_size for w2) and the layout the kernel reads (moe_wna16_marlin_gemm:
    grouped when the scales have more than one group along K). The prediction the GPU run tests."""

    def kind(grouped: bool) -> str:
        return "grouped" if grouped else "channelwise"

    K, N, g = shape.hidden, shape.inter, shape.group
    return {
        "gate_up": {"prepared": kind(g < N), "kernel": kind(K // g > 1)},
        "down": {"prepared": kind(g < (N // g) * g), "kernel": kind(N // g > 1)},
    }


# ---- vLLM (GPU) ----


def marlin_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors CompressedTensorsWNA16MarlinMoEMethod.create_weights registers, as loaded (no act
    order: g_idx is only read for its expert count and device)."""
    E, K = case.codes13.shape[0], case.codes13.shape[2]
    N = case.codes2.shape[2]
    return {
        "w13": pack_gptq(case.codes13).to(device),
        "w2": pack_gptq(case.codes2).to(device),
        "s13": gptq_scales(case.scales13).to(device),
        "s2": gptq_scales(case.scales2).to(device),
        "g_idx13": torch.zeros((E, K), dtype=torch.int32, device=device),
        "g_idx2": torch.zeros((E, N), dtype=torch.int32, device=device),
    }


def marlin_vllm(inputs: dict[str, torch.Tensor], shape: Shape) -> dict[str, torch.Tensor]:
    """vLLM's own _process_weights_marlin, called as convert_to_wna16_moe_kernel_format calls it for a
    compressed-tensors W4A16 layer (QuantizationArgs: num_bits 4, pack_factor 8, no actorder; 16-bit
    activations: input_dtype None). The layer is read for intermediate_size_per_partition only."""
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import _process_weights_marlin

    layer = SimpleNamespace(
        intermediate_size_per_partition=shape.inter,
        num_groups_w13=shape.hidden // shape.group,
        num_groups_w2=shape.inter // shape.group,
    )
    out = _process_weights_marlin(
        layer, None, 4, 8, shape.group, None, inputs["w13"], inputs["w2"], inputs["s13"], inputs["s2"], inputs["g_idx13"], inputs["g_idx2"]
    )
    names = ("w13", "w2", "s13", "s2", "g_idx13", "g_idx2", "sort13", "sort2")
    return dict(zip(names, out[: len(names)], strict=True))


def marlin_repro(inputs: dict[str, torch.Tensor], shape: Shape, w13_scales_size_k: int) -> dict[str, torch.Tensor]:
    """_process_weights_marlin's calls for this case (no padding: the shapes are tile-aligned; no act
    order; no FP8/INT8 activations), w13's scale permutation given `w13_scales_size_k`: shape.inter is
    vLLM's, shape.hidden the GEMM's true K."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_moe_padded_intermediate,
        marlin_moe_permute_scales,
    )

    assert marlin_moe_padded_intermediate(shape.inter, shape.group) == shape.inter
    w13, w2, s13, s2 = inputs["w13"], inputs["w2"], inputs["s13"], inputs["s2"]
    E = w13.shape[0]
    empty = {k: torch.empty((E, 0), dtype=torch.int32, device=w13.device) for k in ("g_idx13", "g_idx2", "sort13", "sort2")}
    return {
        "w13": ops.gptq_marlin_moe_repack(w13, empty["sort13"], w13.shape[1] * 8, w13.shape[2], 4, is_a_8bit=False),
        "w2": ops.gptq_marlin_moe_repack(w2, empty["sort2"], w2.shape[1] * 8, w2.shape[2], 4, is_a_8bit=False),
        "s13": marlin_moe_permute_scales(s=s13, size_k=w13_scales_size_k, size_n=s13.shape[2], group_size=shape.group, is_a_8bit=False),
        "s2": marlin_moe_permute_scales(s=s2, size_k=s2.shape[1] * shape.group, size_n=s2.shape[2], group_size=shape.group, is_a_8bit=False),
        **empty,
    }


def marlin_fused(w: dict[str, torch.Tensor], case: Case, device: torch.device) -> torch.Tensor:
    """fused_marlin_moe with the arguments MarlinExperts.apply passes for this layer (no LoRA, no
    expert map, no bias, zero points, global or input scales; SiLU; workspaces of
    MarlinExperts.workspace_shapes, swapped as there)."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation, apply_moe_activation
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    from vllm.scalar_type import scalar_types

    x = case.x.to(device)
    M, K = x.shape
    E, topk, N = w["w13"].shape[0], case.topk_ids.shape[1], case.codes2.shape[2]
    output = torch.empty_like(x)
    workspace13 = torch.empty((M * topk, max(N, K)), dtype=x.dtype, device=device)
    workspace2 = torch.empty((M * topk * max(2 * N, K),), dtype=x.dtype, device=device)

    def moe_sum(input: torch.Tensor, out: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> None:
        ops.moe_sum(input, out)  # MarlinExperts.moe_sum without an expert map

    fused_marlin_moe(
        hidden_states=x,
        w1=w["w13"],
        w2=w["w2"],
        bias1=None,
        bias2=None,
        w1_scale=w["s13"],
        w2_scale=w["s2"],
        topk_weights=case.topk_weights.to(device),
        topk_ids=case.topk_ids.to(device),
        global_scale1=None,
        global_scale2=None,
        input_global_scale1=None,
        input_global_scale2=None,
        w1_zeros=None,
        w2_zeros=None,
        quant_type_id=scalar_types.uint4b8.id,  # symmetric int4, no zero points: MarlinExpertsBase.quant_type_id
        apply_router_weight_on_input=False,
        global_num_experts=E,
        activation=MoEActivation.SILU,
        activation_func=apply_moe_activation,  # FusedMoEExpertsModular.activation calls it
        moe_sum=moe_sum,
        expert_map=None,
        output=output,
        intermediate_cache13=workspace2,
        intermediate_cache2=workspace13,
        g_idx1=w["g_idx13"],
        g_idx2=w["g_idx2"],
        sort_indices1=w["sort13"],
        sort_indices2=w["sort2"],
        is_k_full=True,  # CompressedTensorsWNA16MarlinMoEMethod: actorder != "group"
        input_dtype=None,  # get_marlin_input_dtype() without VLLM_MARLIN_INPUT_DTYPE
        clamp_limit=None,
        gemm1_alpha=1.0,
        gemm1_beta=0.0,
    )
    return output


def marlin_gemms(w: dict[str, torch.Tensor], case: Case, inter: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up and down alone: _fused_marlin_moe's two ops.moe_wna16_marlin_gemm calls with its block
    size and alignment; down gets `inter` ([M * topk, N]) instead of gate_up's activations."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_make_workspace_new
    from vllm.scalar_type import scalar_types

    x = case.x.to(device)
    M, K = x.shape
    E, topk, N = w["w13"].shape[0], case.topk_ids.shape[1], case.codes2.shape[2]
    topk_ids, topk_weights = case.topk_ids.to(device), case.topk_weights.to(device)
    for block_size_m in [8, 16, 32, 48, 64]:  # fused_marlin_moe's choice
        if M * topk / E / block_size_m < 0.9:
            break
    sorted_ids, expert_ids, padded = moe_align_block_size(topk_ids, block_size_m, E, None, ignore_invalid_experts=True)
    workspace = marlin_make_workspace_new(device, 4)
    common = {
        "workspace": workspace,
        "sorted_token_ids": sorted_ids,
        "expert_ids": expert_ids,
        "num_tokens_past_padded": padded,
        "topk_weights": topk_weights,
        "moe_block_size": block_size_m,
        "b_q_type": scalar_types.uint4b8,
        "is_k_full": True,
        "use_atomic_add": False,
        "use_fp32_reduce": True,
        "is_zp_float": False,
    }
    gate_up = ops.moe_wna16_marlin_gemm(
        x, None, w["w13"], None, w["s13"], None, None, None, w["g_idx13"], w["sort13"],
        top_k=topk, mul_topk_weights=False, size_m=M, size_n=2 * N, size_k=K, **common,
    )
    down = ops.moe_wna16_marlin_gemm(
        inter.to(device=device, dtype=x.dtype).contiguous(), None, w["w2"], None, w["s2"], None, None, None, w["g_idx2"], w["sort2"],
        top_k=1, mul_topk_weights=True, size_m=M * topk, size_n=K, size_k=N, **common,
    )
    return gate_up, down


def probe_shape(shape: Shape, device: torch.device, tokens: tuple[int, ...] = TOKENS, seed: int = 0) -> dict[str, Any]:
    """Every arm, token count and part of one shape; an arm that fails records its traceback."""
    found: dict[str, Any] = {"shape": asdict(shape), "name": shape.name, "layouts": scale_layouts(shape), "runs": []}
    for m in tokens:
        case = make_case(shape, m, seed)
        exact, rounded = reference(case), reference(case, rounded=True)
        down_exact, down_rounded = down_reference(case, rounded["inter"], False), down_reference(case, rounded["inter"], True)
        inputs = marlin_inputs(case, device)
        arms: dict[str, Any] = {}
        try:
            arms["vllm"] = marlin_vllm(inputs, shape)
            repro = marlin_repro(inputs, shape, shape.inter)
            same = all(torch.equal(repro[k], arms["vllm"][k]) for k in ("w13", "w2", "s13", "s2"))
            found["repro_equals_vllm"] = found.get("repro_equals_vllm", True) and same
        except Exception:
            found.setdefault("errors", []).append(f"vllm arm, M={m}:\n{traceback.format_exc()}")
            print(found["errors"][-1], file=sys.stderr, flush=True)
        if "vllm" in arms:  # vLLM's own processing, then lazyxform_vllm's repair of w13's scale order
            from lazyxform_vllm.marlin_moe import reorder_gate_up_scales

            repaired = {**arms["vllm"], "s13": arms["vllm"]["s13"].clone()}
            found["lazyxform_reordered"] = reorder_gate_up_scales(repaired["s13"], inputs["s13"])
            arms["lazyxform"] = repaired
        try:
            arms["true-k"] = marlin_repro(inputs, shape, shape.hidden)
        except Exception:
            found.setdefault("errors", []).append(f"true-k arm, M={m}:\n{traceback.format_exc()}")
            print(found["errors"][-1], file=sys.stderr, flush=True)
        for arm, w in arms.items():
            run: dict[str, Any] = {"tokens": m, "arm": arm}
            try:
                run["moe"] = compare(marlin_fused(w, case, device), exact["out"], rounded["out"])
            except Exception:
                run["error"] = traceback.format_exc()
                print(f"{shape.name} M={m} {arm}, fused_marlin_moe:\n{run['error']}", file=sys.stderr, flush=True)
            try:  # the GEMMs alone even where the fused call failed: they say which one fails
                gate_up, down = marlin_gemms(w, case, rounded["inter"], device)
                run["gate_up"] = compare(gate_up, exact["gate_up"], rounded["gate_up"])
                run["down"] = compare(down, down_exact, down_rounded)
            except Exception:
                run["error"] = run.get("error", "") + traceback.format_exc()
                print(f"{shape.name} M={m} {arm}, GEMMs alone:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            found["runs"].append(run)
    return found


def pair(d: dict[str, float] | None, fmt: str) -> str:
    return "-" if d is None else f"{d['max']:{fmt}} / {d['mean']:{fmt}}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| shape K-N-group | scales gate_up: prepared / kernel | tokens | arm | MoE deviation max / mean | noise max / mean | MoE ratio max / mean | gate_up ratio | down ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in results:
        lay = shape.get("layouts", {}).get("gate_up", {})
        layout = f"{lay.get('prepared')} / {lay.get('kernel')}"
        if "error" in shape:
            rows.append(f"| {shape['name']} | {layout} | | | error: {shape['error'].strip().splitlines()[-1]} | | | | |")
        for run in shape.get("runs", []):
            moe, gu, dn = run.get("moe", {}), run.get("gate_up", {}), run.get("down", {})
            rows.append(
                f"| {shape['name']} | {layout} | {run['tokens']} | {run['arm']} | {pair(moe.get('dev'), '.5f')} | {pair(moe.get('noise'), '.5f')} "
                f"| {pair(moe.get('ratio'), '.2f')} | {pair(gu.get('ratio'), '.2f')} | {pair(dn.get('ratio'), '.2f')} |"
            )
            if "error" in run:
                rows.append(f"| {shape['name']} | | {run['tokens']} | {run['arm']} | error: {run['error'].strip().splitlines()[-1]} | | | | |")
    return "\n".join(rows)


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("vllm", "torch"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions, "gpu": gpu, "python": sys.version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None, help="writes marlin_moe.json there (default: $OUT)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this probe runs vLLM's CUDA kernels", file=sys.stderr)
        return 2
    began = time.perf_counter()
    import vllm._custom_ops  # noqa: F401  (loads vLLM's CUDA ops; ~20 s, timed apart from the shapes)
    import vllm.model_executor.layers.fused_moe.experts.marlin_moe  # noqa: F401

    imported = time.perf_counter() - began
    device = torch.device("cuda", 0)
    results = []
    for shape in SHAPES:
        t0 = time.perf_counter()
        try:
            found = probe_shape(shape, device, seed=args.seed)
        except Exception:
            found = {"name": shape.name, "shape": asdict(shape), "layouts": scale_layouts(shape), "error": traceback.format_exc()}
            print(f"{shape.name}:\n{found['error']}", file=sys.stderr, flush=True)
        found["wall_s"] = round(time.perf_counter() - t0, 2)
        results.append(found)
        print(f"{shape.name}: {found['wall_s']} s, vLLM's prep == its reproduction: {found.get('repro_equals_vllm')}", flush=True)
    text = table(results)
    print(text)
    report = {"env": environment(), "import_s": round(imported, 1), "seed": args.seed, "scale_spread": SCALE_SPREAD, "shapes": results, "table": text}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "marlin_moe.json").write_text(json.dumps(report, indent=2))
    failed = any("error" in s or s.get("errors") or any("error" in r for r in s.get("runs", [])) for s in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
