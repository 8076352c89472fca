"""lazyxform/fallback.py: modules whose format has no compressed-tensors scheme (NVFP4_SVD) become
dense model-dtype weights listed in `ignore`, with a warning (fallback="dequantize"), or raise
(fallback="error"). The dequantized values: tests/test_exactness.py, tests/recipes/test_fp4.py.
Routed experts whose gate/up pre_quant_scale differs between experts become dense weights with the
scale multiplied in, when asked (experts_input_scale="dense"): their values are checked here."""

from __future__ import annotations

import pytest
import torch
from algos import fixtures
from reference import FIXTURES, load_tensors, modelopt_weight

import lazyxform


def test_dequantize_is_the_default_fallback_and_names_the_modules():
    with pytest.warns(lazyxform.LazyxformWarning, match=r"NVFP4_SVD has no compressed-tensors equivalent: 14 modules are dequantized to bfloat16 .*: model\.layers\.0\.mlp\.down_proj, .*model\.layers\.1\.self_attn\.v_proj$"):
        ck = lazyxform.open(FIXTURES / "nvfp4_svdquant", device="cpu")
    qc = ck.quantization_config
    assert qc["config_groups"] == {} and qc["format"] == "dense"
    assert sorted(qc["ignore"]) == sorted(["lm_head", "model.embed_tokens"] + [m.name for m in ck.plan.modules])
    assert all(m.scheme == "ignore" and m.outputs == ["weight"] for m in ck.plan.modules)
    assert ck.plan.warnings and ck.plan.runtime_pre_quant_scale == []
    assert ck.dense_modules == [m.name for m in ck.plan.modules]
    out = dict(ck)
    assert all(out[f"{m.name}.weight"].dtype == torch.bfloat16 for m in ck.plan.modules)


def test_fallback_error_refuses_and_names_the_modules():
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=r"NVFP4_SVD has no compressed-tensors equivalent and fallback='error' forbids dequantizing 14 modules: model\.layers\.0\.mlp\.down_proj"):
        lazyxform.open(FIXTURES / "nvfp4_svdquant", device="cpu", fallback="error")


def test_fallback_error_changes_nothing_when_every_format_has_a_target():
    fixture = "nvfp4"
    assert fixture in fixtures(dense=False)
    ck = lazyxform.open(FIXTURES / fixture, device="cpu", fallback="error")
    assert ck.dense_modules == [] and not ck.plan.warnings
    assert dict(ck).keys() == dict(lazyxform.open(FIXTURES / fixture, device="cpu")).keys()


def test_unknown_fallback_value():
    with pytest.raises(ValueError, match=r"fallback must be one of \('dequantize', 'error'\), got 'ignore'"):
        lazyxform.open(FIXTURES / "nvfp4", device="cpu", fallback="ignore")  # type: ignore[arg-type]


DEEPSEEK_EXPERTS = "model.layers.1.mlp.experts"


def test_dense_experts_are_modelopts_decode_times_their_own_scale_rounded_once():
    """deepseek_v3_int4_awq: its routed experts' gate/up scales differ per expert; asked for dense
    experts, every projection of every expert of that layer streams W_e * s_e (s_e over the input
    columns), ModelOpt's decode in float64 times the scale, rounded once to bf16."""
    path = FIXTURES / "deepseek_v3_int4_awq"
    with pytest.warns(lazyxform.LazyxformWarning, match=rf"^{DEEPSEEK_EXPERTS}: the routed experts' gate/up pre_quant_scale differs between experts.*their 12 expert weights are dequantized to bfloat16 .*Memory: 2 bytes per weight instead of 0\.516 .*: 0\.75 MiB instead of 0\.193 MiB$"):
        ck = lazyxform.open(path, device="cpu", experts_input_scale="dense")
    experts = [f"{DEEPSEEK_EXPERTS}.{e}.{p}" for e in range(4) for p in ("down_proj", "gate_proj", "up_proj")]
    assert ck.dense_modules == experts
    assert all(m.scheme == "ignore" and m.outputs == ["weight"] for m in ck.plan.modules if m.name in experts)
    assert set(experts) <= set(ck.quantization_config["ignore"])
    assert not any(n.startswith(DEEPSEEK_EXPERTS) for n in ck.runtime_pre_quant_scale)
    orig, out = load_tensors(path), dict(ck)
    assert not [k for k in out if k.startswith(DEEPSEEK_EXPERTS) and not k.endswith(".weight")]
    gate = [orig[f"{DEEPSEEK_EXPERTS}.{e}.gate_proj.pre_quant_scale"] for e in range(4)]
    assert not all(torch.equal(g, gate[0]) for g in gate)  # the case this is about
    for module in experts:
        want = (modelopt_weight("W4A16_AWQ", orig, module) * orig[f"{module}.pre_quant_scale"].double()).to(torch.bfloat16)
        assert torch.equal(out[f"{module}.weight"], want), module
    # Everything else streams as without the option.
    default = dict(lazyxform.open(path, device="cpu"))
    assert {k for k in default if not k.startswith(DEEPSEEK_EXPERTS)} == {k for k in out if not k.startswith(DEEPSEEK_EXPERTS)}
    assert all(torch.equal(default[k], v) for k, v in out.items() if not k.startswith(DEEPSEEK_EXPERTS))


def test_dense_experts_leave_one_scale_per_layer_and_the_default_as_they_were():
    """qwen3moe_int4_awq's experts share one scale per layer (ModelOpt's resmoothing): run time
    applies it on any kernel, so nothing is densified. The default keeps every scale for run time."""
    dense = lazyxform.open(FIXTURES / "qwen3moe_int4_awq", device="cpu", experts_input_scale="dense")
    runtime = lazyxform.open(FIXTURES / "qwen3moe_int4_awq", device="cpu")
    assert dense.dense_modules == [] and dense.runtime_pre_quant_scale == runtime.runtime_pre_quant_scale
    assert dense.quantization_config == runtime.quantization_config and not dense.plan.warnings
    deepseek = lazyxform.open(FIXTURES / "deepseek_v3_int4_awq", device="cpu")
    assert deepseek.dense_modules == [] and sum(n.startswith(DEEPSEEK_EXPERTS) for n in deepseek.runtime_pre_quant_scale) == 8


def test_unknown_experts_input_scale_value():
    with pytest.raises(ValueError, match=r"experts_input_scale must be one of \('runtime', 'dense'\), got 'fold'"):
        lazyxform.open(FIXTURES / "deepseek_v3_int4_awq", device="cpu", experts_input_scale="fold")  # type: ignore[arg-type]
