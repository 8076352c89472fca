"""lazyxform/topology.py through planning and streaming: fused sets and norm consumers under MoE
naming, Qwen3-MoE (`mlp.experts.{e}.gate_proj|up_proj|down_proj`, router `mlp.gate`) and Mixtral
(`block_sparse_moe.experts.{e}.w1|w2|w3`, router `block_sparse_moe.gate`). The only MoE export is
FP8, so each algo's fixture has its MLPs cloned into experts (helpers.make_moe): every expert must
then stream exactly like the dense MLP, whose exactness tests/test_exactness.py checks."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from algos import FIXTURE_TABLE, representatives
from helpers import MLP, copy_fixture, edit_json, make_moe, moe_name, rename_tensors, rewrite_tensors
from reference import FIXTURES

import lazyxform

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
@pytest.mark.parametrize("fixture", representatives())
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
    assert len(experts) == 2 * EXPERTS * 3 and {m.algo for m in experts} == {FIXTURE_TABLE[fixture].algo}


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


def test_mixtral_naming_streams_like_qwen3_moe(tmp_path):
    """Mixtral exports name experts block_sparse_moe.experts.{e}.w1|w2|w3 (gate, down, up) and the
    router block_sparse_moe.gate; the same tensors must come out under those names."""
    renames = [(".mlp.experts.", ".block_sparse_moe.experts."), (".gate_proj.", ".w1."), (".down_proj.", ".w2."), (".up_proj.", ".w3."), (".mlp.gate.", ".block_sparse_moe.gate.")]
    ckpt = copy_fixture("qwen3moe_fp8", tmp_path)
    rename_tensors(ckpt, renames)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(exclude_modules=["lm_head", "model.embed_tokens", "model.layers.*.block_sparse_moe.gate"]))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(ignore=["lm_head", "model.embed_tokens", "model.layers.*.block_sparse_moe.gate"]))
    qwen = dict(lazyxform.open(FIXTURES / "qwen3moe_fp8", device="cpu"))
    ck = lazyxform.open(ckpt, device="cpu")
    mixtral = dict(ck)
    assert len(mixtral) == len(qwen)
    for name, tensor in qwen.items():
        new = name
        for old, repl in renames:
            new = new.replace(old, repl)
        assert torch.equal(mixtral[new], tensor), new
    merged = [g for g in ck.plan.groups if any(n.endswith(".w1.input_scale") for n in g.inputs)]
    assert merged and all(any(n.endswith(".w3.input_scale") for n in g.inputs) for g in merged)
    assert r"re:model\.layers\..*\.block_sparse_moe\.gate" in ck.quantization_config["ignore"]


@pytest.mark.parametrize("scale", ["weight_scale_2", "input_scale"])
def test_deepseek_mla_a_projections_are_one_gemm_whose_nvfp4_global_scales_must_agree(tmp_path, scale):
    """vLLM runs q_a_proj and kv_a_proj_with_mqa as one GEMM (fused_qkv_a_proj) with one global scale;
    ModelOpt exports them equal, and a checkpoint where they differ is refused, not served with one."""
    ckpt = copy_fixture("deepseek_v3_nvfp4", tmp_path)
    key = f"model.layers.1.self_attn.kv_a_proj_with_mqa.{scale}"
    ck = lazyxform.open(ckpt, device="cpu")
    q_a = f"model.layers.1.self_attn.q_a_proj.{scale}"
    assert frozenset({q_a, key}) in {frozenset(g.inputs) for g in ck.plan.groups}
    rewrite_tensors(ckpt, lambda t: t.update({key: t[key] * 2}))
    with pytest.raises(lazyxform.InconsistentScalesError, match=rf"{re.escape(scale)} of siblings fused into one GEMM: .*q_a_proj\.{scale} and .*kv_a_proj_with_mqa\.{scale} differ"):
        stream(ckpt)
