"""Issue-2 recipes, every quantized module of every fixture, against two independent references:
ModelOpt's dequant formulas on the original tensors, and compressed-tensors' decompressor on
lazyxform's output.

Bounds (elementwise, relative to the ModelOpt value):
- FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, W8A8_SQ_PER_CHANNEL: 0 (scales stay fp32; bit-exact).
- ... with a pre_quant_scale folded into the row scales: 2^-22 (one extra fp32 rounding of ws * pqs).
- W8A16: 2^-7 (WNA16 stores the scale in bf16, unit roundoff 2^-8, and dequantizes in bf16, 2^-8).
- pre_quant_scale folded into a norm weight: 2^-8 on the effective map (g * pqs rounded to bf16).
"""

from __future__ import annotations

import pytest
import torch
from reference import (
    FIXTURES,
    ct_decompress,
    folded_row_factor,
    hf_quant_algo,
    load_tensors,
    modelopt_dequant,
    quantized_modules,
)

import lazyxform

CORE_FIXTURES = ["fp8", "fp8_kv_fp8", "fp8_pc_pt", "fp8_2d_blockwise_wo", "int8_default", "int8_sq", "int8_wo", "qwen3moe_fp8"]
WEIGHT_BOUND = {"W8A16": 2**-7}
ROW_FOLD_BOUND = 2**-22
NORM_FOLD_BOUND = 2**-8


@pytest.fixture(scope="module", params=CORE_FIXTURES)
def case(request):
    path = FIXTURES / request.param
    ck = lazyxform.open(path, device="cpu")
    return ck, load_tensors(path), dict(ck), hf_quant_algo(path)


def assert_within(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    if rel == 0:
        assert torch.equal(got, want), f"{what}: not bit-exact, max abs diff {(got - want).abs().max()}"
        return
    excess = (got - want).abs() - rel * want.abs()
    assert excess.max() <= 0, f"{what}: exceeds rel {rel} by {excess.max()} (max abs diff {(got - want).abs().max()})"


def test_every_module_matches_modelopt_formula_and_ct_decompressor(case):
    ck, orig, out, algo = case
    modules = quantized_modules(orig)
    assert modules, "fixture has quantized modules"
    for module in modules:
        want = modelopt_dequant(algo, orig, module)
        rel = WEIGHT_BOUND.get(algo, 0.0)
        factor = folded_row_factor(module, orig, out)
        if factor is not None:
            want = want * factor.float()[:, None]
            rel = max(rel, ROW_FOLD_BOUND)
        got = ct_decompress(ck.quantization_config, module, out).float()
        assert got.shape == want.shape, module
        assert_within(got, want, rel, module)
        if algo == "W8A16":  # WNA16 holds its scales in the model dtype (vLLM allocates them so)
            assert out[f"{module}.weight_scale"].dtype == torch.bfloat16, module


def test_activation_scales_are_modelopts_merged_over_fused_siblings(case):
    ck, orig, out, algo = case
    names = [k for k in orig if k.endswith(".input_scale")]
    groups = ck.quantization_config["config_groups"].values()
    static = [g for g in groups if g.get("input_activations") and not g["input_activations"]["dynamic"]]
    assert bool(names) == bool(static), "static activation scales exported iff the target has static inputs"
    for name in names:
        parent, leaf = name.removesuffix(".input_scale").rsplit(".", 1)
        family = next((f for f in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")) if leaf in f), (leaf,))
        siblings = torch.stack([orig[f"{parent}.{x}.input_scale"] for x in family])
        assert out[name].shape == (1,)
        assert out[name].item() == siblings.max().item()
        # ModelOpt exports fused siblings with one input amax, so the merge loses nothing here.
        assert torch.equal(siblings.min(), siblings.max()), name


def test_unquantized_tensors_pass_through_bit_exact(case):
    ck, orig, out, algo = case
    folded_norms = {n for g in ck.plan.groups for r in g.rules if "pre_quant_scale" in r.label and "norm" in r.label for n in r.outputs}
    for name in ck.plan.passthrough:
        assert name not in folded_norms
        assert torch.equal(out[name], orig[name]), name
    assert {n for n in ck.plan.passthrough if n.endswith("embed_tokens.weight") or n == "lm_head.weight"} == {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }


def test_kv_cache_scales_move_to_the_attention_unchanged(case):
    ck, orig, out, algo = case
    kv = {k: v for k, v in orig.items() if k.endswith((".k_proj.k_scale", ".v_proj.v_scale"))}
    for name, value in kv.items():
        attn, proj, scale = name.rsplit(".", 2)
        assert name not in out
        assert out[f"{attn}.{scale}"].shape == (1,)
        assert out[f"{attn}.{scale}"].item() == value.item()
    if kv:
        expected = {"strategy": "tensor", "symmetric": True, "num_bits": 8, "type": "float", "dynamic": False}
        assert expected.items() <= ck.quantization_config["kv_cache_scheme"].items()
    else:  # no KV-cache quantization: neither a scheme nor stray scales
        assert ck.quantization_config.get("kv_cache_scheme") is None
        assert not [k for k in out if k.endswith(("k_scale", "v_scale"))]


def rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_smoothquant_folds_keep_the_effective_linear_maps():
    """int8_sq: q/k/v and gate/up pqs go into the norms, down_proj's into up_proj's rows, o_proj's
    (GQA: 4 heads share 2 KV heads) is kept. Compare whole sub-networks on random inputs."""
    path = FIXTURES / "int8_sq"
    ck = lazyxform.open(path, device="cpu")
    orig, out = load_tensors(path), dict(ck)
    qc = ck.quantization_config
    h = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    for layer in ("model.layers.0", "model.layers.1"):
        for norm, consumers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g = orig[f"{layer}.{norm}.weight"].float()
            g_out = out[f"{layer}.{norm}.weight"].float()
            for c in consumers:
                m = f"{layer}.{c}"
                assert f"{m}.pre_quant_scale" not in out
                w = modelopt_dequant("W8A8_SQ_PER_CHANNEL", orig, m)
                factor = folded_row_factor(m, orig, out)  # up_proj's rows also carry down_proj's pqs
                w = w if factor is None else w * factor.float()[:, None]
                x = rms(h) * g * orig[f"{m}.pre_quant_scale"].float()
                got = (rms(h) * g_out) @ ct_decompress(qc, m, out).float().T
                assert_within_map(got, x @ w.T, x.abs(), w, m)
        x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
        deq = {p: modelopt_dequant("W8A8_SQ_PER_CHANNEL", orig, f"{layer}.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
        ct = {p: ct_decompress(qc, f"{layer}.mlp.{p}", out).float() for p in ("gate_proj", "up_proj", "down_proj")}
        z_ref = torch.nn.functional.silu(x @ deq["gate_proj"].T) * (x @ deq["up_proj"].T)
        want = (z_ref * orig[f"{layer}.mlp.down_proj.pre_quant_scale"].float()) @ deq["down_proj"].T
        got = (torch.nn.functional.silu(x @ ct["gate_proj"].T) * (x @ ct["up_proj"].T)) @ ct["down_proj"].T
        assert f"{layer}.mlp.down_proj.pre_quant_scale" not in out
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(out[f"{layer}.self_attn.o_proj.pre_quant_scale"], orig[f"{layer}.self_attn.o_proj.pre_quant_scale"])
    assert ck.plan.runtime_pre_quant_scale == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def assert_within_map(got: torch.Tensor, want: torch.Tensor, x_abs: torch.Tensor, w: torch.Tensor, what: str) -> None:
    # |sum_k x_k (g_k p_k)(1+e_k) w_jk - sum_k x_k g_k p_k w_jk| <= 2^-8 * sum_k |x_k g_k p_k w_jk|, plus fp32 noise.
    bound = NORM_FOLD_BOUND * (x_abs @ w.abs().T) + 1e-5 * want.abs().max()
    assert ((got - want).abs() <= bound).all(), f"{what}: effective map off by {(got - want).abs().max()}"


def test_mixtral_naming_streams_like_qwen3_moe(tmp_path):
    """Mixtral exports name experts block_sparse_moe.experts.{e}.w1|w2|w3 (gate, down, up) and the
    router block_sparse_moe.gate; the same tensors must come out under those names."""
    from helpers import copy_fixture, edit_json, rename_tensors

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
