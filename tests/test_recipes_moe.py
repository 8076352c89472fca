"""Every issue-3 recipe over MoE naming: Qwen3-MoE (`mlp.experts.{e}.gate_proj|up_proj|down_proj`,
router `mlp.gate`) and Mixtral (`block_sparse_moe.experts.{e}.w1|w2|w3`, router
`block_sparse_moe.gate`). The only MoE export is FP8, so each dense fixture's MLPs are cloned into
experts (recipe_reference.make_moe): every expert must then stream exactly like the dense MLP."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import copy_fixture, rewrite_tensors
from recipe_reference import MLP, hf_algo, make_moe, moe_name
from reference import FIXTURES

import lazyxform

MOE_FIXTURES = ["int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq_lite", "w4a16_nvfp4", "w4a8_nvfp4_fp8", "mxfp8", "mxfp4", "w4a8_mxfp4_fp8", "nvfp4_svdquant"]
EXPERTS = 2


def stream(path) -> tuple[lazyxform.Checkpoint, dict[str, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # NVFP4_SVD is dequantized (tested elsewhere)
        ck = lazyxform.open(path, device="cpu")
        return ck, dict(ck)


def mlp_of(name: str) -> str | None:
    """model.layers.N.mlp when `name` belongs to one of its projections."""
    parts = name.split(".")
    return ".".join(parts[:4]) if len(parts) > 4 and parts[3] == "mlp" and parts[4] in MLP else None


@pytest.mark.parametrize("naming", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("fixture", MOE_FIXTURES)
def test_experts_stream_exactly_like_the_dense_mlp(tmp_path, fixture, naming):
    _, dense = stream(FIXTURES / fixture)
    ck, moe = stream(make_moe(fixture, tmp_path, naming))
    expected = {}
    for name, tensor in dense.items():
        layer_mlp = mlp_of(name)
        for e in range(EXPERTS) if layer_mlp else [None]:
            expected[moe_name(name, layer_mlp, e, naming) if layer_mlp else name] = tensor
    router = "mlp.gate" if naming == "qwen3_moe" else "block_sparse_moe.gate"
    routers = {f"model.layers.{i}.{router}.weight" for i in range(2)}
    assert set(moe) == set(expected) | routers
    for name, tensor in expected.items():
        assert torch.equal(moe[name], tensor), name
    assert routers <= set(ck.plan.passthrough)
    assert r"re:model\.layers\..*\." + re.escape(router) in ck.quantization_config["ignore"]
    experts = [m for m in ck.plan.modules if ".experts." in m.name]
    assert len(experts) == 2 * EXPERTS * 3 and {m.algo for m in experts} == {hf_algo(FIXTURES / fixture)}


@pytest.mark.parametrize("naming", ["qwen3_moe", "mixtral"])
def test_expert_gate_and_up_share_one_global_scale_group(tmp_path, naming):
    ck, _ = stream(make_moe("nvfp4", tmp_path, naming))
    gate, up = ("gate_proj", "up_proj") if naming == "qwen3_moe" else ("w1", "w3")
    groups = {frozenset(g.inputs) for g in ck.plan.groups}
    for layer in range(2):
        for e in range(EXPERTS):
            expert = f"model.layers.{layer}.{'mlp' if naming == 'qwen3_moe' else 'block_sparse_moe'}.experts.{e}"
            for scale in ("weight_scale_2", "input_scale"):
                assert frozenset({f"{expert}.{gate}.{scale}", f"{expert}.{up}.{scale}"}) in groups, (expert, scale)


def test_differing_expert_gate_up_global_scales_are_refused(tmp_path):
    ckpt = make_moe("nvfp4", tmp_path, "qwen3_moe")
    key = "model.layers.1.mlp.experts.1.up_proj.weight_scale_2"
    rewrite_tensors(ckpt, lambda t: t.update({key: t[key] * 2}))
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"weight_scale_2 of siblings fused into one GEMM: .*experts\.1\.gate_proj\.weight_scale_2 and .*experts\.1\.up_proj\.weight_scale_2 differ"):
        stream(ckpt)


def add_gate_up_pre_quant_scale(t: dict[str, torch.Tensor]) -> None:
    for name in [n for n in t if n.endswith((".gate_proj.weight", ".up_proj.weight"))]:
        t[name.removesuffix("weight") + "pre_quant_scale"] = torch.linspace(0.8, 1.2, 256).to(torch.bfloat16)


def test_post_attention_norm_never_absorbs_a_scale_when_a_router_reads_it(tmp_path):
    """Experts' (and a dense gate/up's) shared pre_quant_scale stays at run time when a router also
    reads post_attention_layernorm; without the router the same scale folds into the norm."""
    moe = make_moe("int4_awq", tmp_path, "qwen3_moe")
    rewrite_tensors(moe, add_gate_up_pre_quant_scale)
    dense_with_router = copy_fixture("int4_awq", tmp_path / "router")
    rewrite_tensors(dense_with_router, add_gate_up_pre_quant_scale)
    rewrite_tensors(dense_with_router, lambda t: t.update({f"model.layers.{i}.mlp.gate.weight": torch.ones(2, 256, dtype=torch.bfloat16) for i in range(2)}))
    control = copy_fixture("int4_awq", tmp_path / "control")
    rewrite_tensors(control, add_gate_up_pre_quant_scale)
    for ckpt, routed in ((moe, True), (dense_with_router, True), (control, False)):
        ck, out = stream(ckpt)
        kept = {m for m in ck.plan.runtime_pre_quant_scale if m.endswith(("gate_proj", "up_proj"))}
        assert bool(kept) == routed, ckpt
        norms = [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(2)]
        assert all(n in ck.plan.passthrough for n in norms) == routed, ckpt
