"""benchmarks/gpu_marlin_moe.py's CPU half: the GPTQ packing vLLM's Marlin repack reads, and the
references the GPU probe measures vLLM's Marlin MoE against. A wrong packing or reference would
make every shape look broken (or hide the broken one), and costs a GPU lease to find out there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_marlin_moe as probe  # noqa: E402
from gpu_marlin_moe import Shape  # noqa: E402

SMALL = Shape(64, 32, 16)  # four groups along gate_up's K, two along down's


@pytest.mark.parametrize("shape", [*probe.SHAPES, SMALL], ids=lambda s: s.name)
def test_packing_round_trips(shape: Shape) -> None:
    case = probe.make_case(shape, 3)
    for codes in (case.codes13, case.codes2):
        packed = probe.pack_gptq(codes)
        E, out, k = codes.shape
        assert packed.dtype == torch.int32 and packed.shape == (E, k // 8, out)
        assert torch.equal(probe.unpack_gptq(packed), codes)


def test_packing_is_gptqs_rows_lowest_nibble_first() -> None:
    """Row 8i + j of K in bits 4j..4j+3 of packed row i (vLLM's pack_rows), all 32 bits used."""
    codes = torch.zeros(1, 2, 16, dtype=torch.uint8)  # [E, out, K]
    codes[0, 0] = torch.arange(16)
    codes[0, 1, 8] = 15
    packed = probe.pack_gptq(codes)
    assert packed[0, 0, 0].item() == 0x76543210
    assert packed[0, 1, 0].item() == 0xFEDCBA98 - 2**32  # the top nibble sets the sign bit
    assert packed[0, :, 1].tolist() == [0, 15]


def test_scales_transpose_to_groups_by_output() -> None:
    case = probe.make_case(SMALL, 2)
    s = probe.gptq_scales(case.scales13)
    assert s.shape == (probe.EXPERTS, SMALL.hidden // SMALL.group, 2 * SMALL.inter) and s.is_contiguous()
    assert torch.equal(s[1, 2, 5], case.scales13[1, 5, 2])


def test_case_is_symmetric_int4_with_a_top_k_router() -> None:
    case = probe.make_case(probe.SHAPES[0], 40)
    assert case.codes13.max() <= 15 and case.codes2.max() <= 15
    assert case.codes13.min() == 0 and case.codes13.max() == 15
    assert case.scales13.dtype == torch.bfloat16 and (case.scales13 > 0).all()
    assert case.topk_ids.dtype == torch.int32 and case.topk_weights.dtype == torch.float32
    assert (case.topk_ids[:, 0] != case.topk_ids[:, 1]).all()
    assert (case.topk_weights.sum(-1) < 1).all()  # softmax weights of the top 2 of 4, not renormalized


def dense_moe(case: probe.Case) -> torch.Tensor:
    """The MoE layer token by token, each weight element decoded by indexing its group's scale."""
    K = case.codes13.shape[2]
    N = case.codes2.shape[2]
    out = torch.zeros(case.x.shape, dtype=torch.float64)
    for m in range(case.x.shape[0]):
        x = case.x[m].double()
        for j in range(case.topk_ids.shape[1]):
            e = int(case.topk_ids[m, j])
            w13 = (case.codes13[e].double() - 8) * case.scales13[e].double()[:, torch.arange(K) // case.group]
            w2 = (case.codes2[e].double() - 8) * case.scales2[e].double()[:, torch.arange(N) // case.group]
            h = w13 @ x
            out[m] += float(case.topk_weights[m, j]) * (w2 @ (torch.nn.functional.silu(h[:N]) * h[N:]))
    return out


@pytest.mark.parametrize("shape", [probe.SHAPES[0], SMALL], ids=lambda s: s.name)
def test_reference_is_the_dense_moe(shape: Shape) -> None:
    case = probe.make_case(shape, 5, seed=3)
    ref = probe.reference(case)
    torch.testing.assert_close(ref["out"], dense_moe(case), rtol=1e-12, atol=1e-12)
    assert ref["gate_up"].shape == (5 * probe.TOPK, 2 * shape.inter) and ref["down"].shape == (5 * probe.TOPK, shape.hidden)
    # row m * topk + j is token m's j-th expert, the order of vLLM's sorted_token_ids
    m, j = 3, 1
    e = int(case.topk_ids[m, j])
    w13 = probe.dequant(case.codes13, case.scales13, case.group)[e]
    torch.testing.assert_close(ref["gate_up"][m * probe.TOPK + j], w13 @ case.x[m].double(), rtol=1e-12, atol=1e-12)


def test_rounded_reference_rounds_every_stage_to_bf16() -> None:
    case = probe.make_case(probe.SHAPES[0], 8)
    exact, rounded = probe.reference(case), probe.reference(case, rounded=True)
    for stage in ("gate_up", "inter", "down", "out"):
        assert torch.equal(rounded[stage], probe.bf16(rounded[stage])), stage
        noise = probe.deviation(rounded[stage], exact[stage])
        assert 0 < noise["mean"] < 0.02 and noise["max"] < 0.2, (stage, noise)


def test_down_alone_is_the_references_down() -> None:
    case = probe.make_case(SMALL, 6)
    for rounded in (False, True):
        ref = probe.reference(case, rounded)
        assert torch.equal(probe.down_reference(case, ref["inter"], rounded), ref["down"])


def test_compare_ratios_against_the_noise() -> None:
    case = probe.make_case(SMALL, 4)
    exact, rounded = probe.reference(case)["out"], probe.reference(case, rounded=True)["out"]
    same = probe.compare(exact, exact, rounded)
    assert same["dev"] == {"max": 0.0, "mean": 0.0} and same["ratio"] == {"max": 0.0, "mean": 0.0}
    as_noise = probe.compare(rounded.to(torch.bfloat16), exact, rounded)
    assert as_noise["ratio"] == {"max": 1.0, "mean": 1.0}


def test_scale_layouts_disagree_only_where_intermediate_is_one_group() -> None:
    """vLLM 0.26 permutes w13's scales by intermediate_size_per_partition (not w13's K): channelwise
    where intermediate <= group, while gate_up's K (hidden) has several groups. Down agrees always."""
    layouts = {s.name: probe.scale_layouts(s) for s in probe.SHAPES}
    assert layouts["K256-N128-g128"]["gate_up"] == {"prepared": "channelwise", "kernel": "grouped"}
    assert layouts["K2048-N128-g128"]["gate_up"] == {"prepared": "channelwise", "kernel": "grouped"}
    for name in ("K256-N256-g128", "K2048-N768-g128"):
        assert layouts[name]["gate_up"] == {"prepared": "grouped", "kernel": "grouped"}
    assert layouts["K256-N128-g128"]["down"] == {"prepared": "channelwise", "kernel": "channelwise"}
    assert all(lay["down"]["prepared"] == lay["down"]["kernel"] for lay in layouts.values())


def test_table_shows_runs_and_errors() -> None:
    ratio = {"dev": {"max": 0.1, "mean": 0.01}, "noise": {"max": 0.05, "mean": 0.005}, "ratio": {"max": 2.0, "mean": 2.0}}
    shape = probe.SHAPES[0]
    results = [
        {"name": shape.name, "layouts": probe.scale_layouts(shape), "runs": [{"tokens": 8, "arm": "vllm", "moe": ratio, "gate_up": ratio, "down": ratio}, {"tokens": 8, "arm": "true-k", "error": "Traceback\nRuntimeError: boom\n"}]},
        {"name": "K1-N1-g1", "layouts": {}, "error": "Traceback\nImportError: no vllm\n"},
    ]
    text = probe.table(results)
    assert "| K256-N128-g128 | channelwise / grouped | 8 | vllm | 0.10000 / 0.01000 | 0.05000 / 0.00500 | 2.00 / 2.00 |" in text
    assert "error: RuntimeError: boom" in text and "error: ImportError: no vllm" in text
