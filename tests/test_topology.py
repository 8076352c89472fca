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
from helpers import (
    MLP,
    copy_fixture,
    edit_json,
    exclude_in_bf16,
    make_moe,
    moe_name,
    rename_tensors,
    rewrite_tensors,
    tensors_of,
)
from reference import FIXTURES, load_tensors, quantized_modules

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


# --- Multi-token prediction (DeepSeek-V3 layout: model.layers.{num_hidden_layers}.*) -----------------

MTP_FIXTURE = "deepseek_v3_nvfp4_mtp"
MTP = "model.layers.1"  # its num_hidden_layers is 1


def test_mtp_layer_gets_the_deepseek_facts_of_any_decoder_layer():
    """The MTP layer's fused q_a/kv_a and shared-expert gate/up share one global scale group, as
    the main layers' do; its router, eh_proj, embedding and head stay dense and ignored."""
    ck, out = stream(FIXTURES / MTP_FIXTURE)
    groups = {frozenset(g.inputs) for g in ck.plan.groups}
    for fused in (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")):
        for layer in ("model.layers.0", MTP):
            if layer == "model.layers.0" and "shared_experts" in fused[0]:
                continue  # layer 0 is dense
            assert frozenset(f"{layer}.{leaf}.weight_scale_2" for leaf in fused) in groups, (layer, fused)
    assert len([m for m in ck.plan.modules if m.name.startswith(MTP + ".")]) == FIXTURE_TABLE[MTP_FIXTURE].mtp_modules
    dense = [f"{MTP}.{m}" for m in ("mlp.gate", "eh_proj", "embed_tokens", "shared_head.head")]
    assert set(dense) <= set(ck.quantization_config["ignore"])
    assert {f"{m}.weight" for m in dense} <= set(ck.plan.passthrough)
    assert {f"{MTP}.{n}.weight" for n in ("enorm", "hnorm", "shared_head.norm")} <= set(ck.plan.passthrough)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_a_quantized_mtp_eh_proj_is_refused_by_name(tmp_path, model_type):
    """vLLM and SGLang build DeepSeek's (and GLM-4.5's) MTP eh_proj as a plain nn.Linear: quantized
    tensors for it would have no parameter to go to. The quantized tensors are the MTP layer's
    shared-expert down_proj's, under eh_proj's name."""
    ckpt = copy_fixture(MTP_FIXTURE, tmp_path)
    source = f"{MTP}.mlp.shared_experts.down_proj."

    def quantize_eh_proj(t):
        del t[f"{MTP}.eh_proj.weight"]
        t.update({f"{MTP}.eh_proj.{k.removeprefix(source)}": v.clone() for k, v in t.items() if k.startswith(source)})

    rewrite_tensors(ckpt, quantize_eh_proj)
    edit_json(ckpt / "config.json", lambda c: c.update(model_type=model_type))
    with pytest.raises(lazyxform.UnplaceableModuleError, match=rf"{MTP}\.eh_proj\.weight \(uint8 \[256, 64\]\) in model\.safetensors: {MTP}\.eh_proj is quantized \(NVFP4\), but engines build a {model_type} model's eh_proj as a plain Linear"):
        stream(ckpt)


def test_a_dequantized_mtp_eh_proj_is_a_plain_weight(tmp_path):
    """An NVFP4_SVD eh_proj (nvfp4_svdquant's down_proj, the same [hidden, 2 * hidden] shape, in a
    MIXED_PRECISION config) has no compressed-tensors target: the dequantize fallback streams a
    plain bf16 weight, which the engine's nn.Linear loads, so it is not refused."""
    ckpt = copy_fixture(MTP_FIXTURE, tmp_path)
    source = "model.layers.0.mlp.down_proj."
    svd = {f"{MTP}.eh_proj.{k.removeprefix(source)}": v for k, v in tensors_of("nvfp4_svdquant").items() if k.startswith(source)}
    rewrite_tensors(ckpt, lambda t: t.update(svd))
    layers = {m: {"quant_algo": "NVFP4", "group_size": 16} for m in quantized_modules(tensors_of(MTP_FIXTURE))}
    layers[f"{MTP}.eh_proj"] = {"quant_algo": "NVFP4_SVD", "group_size": 16}
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="MIXED_PRECISION", quantized_layers=layers))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_algo="MIXED_PRECISION"))
    ck, out = stream(ckpt)
    assert ck.dense_modules == [f"{MTP}.eh_proj"]
    assert f"{MTP}.eh_proj" in ck.quantization_config["ignore"]
    assert out[f"{MTP}.eh_proj.weight"].dtype == torch.bfloat16 and out[f"{MTP}.eh_proj.weight"].shape == (256, 512)


def test_an_mtp_layer_excluded_in_bf16_stays_dense(tmp_path):
    """What ModelOpt's hf_ptq writes (the MTP layer re-attached unquantized, `model.layers.N*` in
    exclude_modules) and NVIDIA's DeepSeek FP4 releases keep: the MTP layer's Linears here are the
    fixture's own weights decoded to bf16 by ModelOpt's formula."""
    ckpt = copy_fixture(MTP_FIXTURE, tmp_path)
    mtp_modules = exclude_in_bf16(ckpt, "NVFP4", MTP)  # ModelOpt writes `model.layers.N*`
    ck, out = stream(ckpt)
    assert len(mtp_modules) == FIXTURE_TABLE[MTP_FIXTURE].mtp_modules
    assert len(ck.plan.modules) == FIXTURE_TABLE[MTP_FIXTURE].modules - len(mtp_modules)
    assert rf"re:{re.escape(MTP)}.*" in ck.quantization_config["ignore"]
    orig = load_tensors(ckpt)
    for name in (n for n in orig if n.startswith(MTP + ".")):
        assert name in ck.plan.passthrough and torch.equal(out[name], orig[name]), name
