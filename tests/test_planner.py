"""lazyxform/planner.py: the plan and the compressed-tensors config from headers alone: each algo's
target scheme (the rows of tests/algos.py), ignore lists, MoE routers, excluded modules, fused sets,
MIXED_PRECISION config groups. vLLM's reading of the same configs: tests/vllm/test_vllm_schemes.py."""

from __future__ import annotations

import re

import pytest
import torch
from algos import FIXTURE_TABLE, fixtures
from compressed_tensors.quantization import QuantizationConfig
from helpers import (
    MIXED_LAYOUT,
    check_module,
    copy_fixture,
    edit_json,
    folded_row_factor,
    make_mixed,
    rewrite_tensors,
    tensors_of,
)
from reference import FIXTURES, load_tensors, quantized_modules

import lazyxform
from lazyxform.modelopt import ModelOptConfig
from lazyxform.planner import _ignore_list


@pytest.mark.parametrize("fixture", fixtures(dense=False))
def test_each_recipe_maps_to_its_compressed_tensors_scheme(fixture):
    row = FIXTURE_TABLE[fixture].target
    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    (group,) = qc["config_groups"].values()
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == group["format"] == row.format
    # A quantized lm_head is no Linear to an engine: named (vLLM builds it as ParallelLMHead).
    lm_head = "lm_head" in quantized_modules(tensors_of(fixture))
    assert group["targets"] == ["Linear", *(["lm_head"] if lm_head else [])]
    weights = group["weights"]
    assert (weights["type"], weights["num_bits"], weights["strategy"], weights.get("group_size")) == row.weights
    assert weights["symmetric"] is True and weights["dynamic"] is False
    acts = group.get("input_activations")
    assert (acts and (acts["type"], acts["num_bits"], acts["strategy"], acts["dynamic"])) == (row.activations or None)
    assert set(qc["ignore"]) >= {"model.embed_tokens", *([] if lm_head else ["lm_head"])}
    assert lm_head != ("lm_head" in qc["ignore"])
    QuantizationConfig.model_validate(qc)  # round-trips through the library's own model


def test_a_quantized_mtp_head_is_named_like_lm_head(tmp_path):
    """DeepSeek's MTP output head (`model.layers.N.shared_head.head`) is a ParallelLMHead in vLLM, as
    lm_head is: quantized, a target must name it. Its quantized tensors here are lm_head_nvfp4's
    lm_head (same [vocab, hidden] shape)."""
    ckpt = copy_fixture("deepseek_v3_nvfp4_mtp", tmp_path)
    head = "model.layers.1.shared_head.head"
    lm_head = {k.removeprefix("lm_head."): v for k, v in tensors_of("lm_head_nvfp4").items() if k.startswith("lm_head.")}
    rewrite_tensors(ckpt, lambda t: t.update({f"{head}.{k}": v for k, v in lm_head.items()}))
    ck = lazyxform.open(ckpt, device="cpu")
    (group,) = ck.quantization_config["config_groups"].values()
    assert group["targets"] == ["Linear", head]
    assert head not in ck.quantization_config["ignore"]
    check_module("NVFP4", load_tensors(ckpt), dict(ck), ck.quantization_config, head)


def test_exclude_wildcards_become_anchored_regexes():
    cfg = ModelOptConfig(source=FIXTURES, default=None, exclude=["lm_head", "model.layers.0.self_attn*", "model.layers.?.mlp.gate"])
    ignore = _ignore_list(cfg, {}, {})
    assert ignore == ["lm_head", r"re:model\.layers\.0\.self_attn.*", r"re:model\.layers\..\.mlp\.gate"]
    assert re.fullmatch(ignore[1][3:], "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(ignore[1][3:], "model.layers.10.self_attn.q_proj")
    assert re.fullmatch(ignore[2][3:], "model.layers.7.mlp.gate") and not re.fullmatch(ignore[2][3:], "model.layers.7.mlp.gate_proj")


@pytest.mark.parametrize("fixture", fixtures(moe=True))
def test_moe_routers_stay_ignored_and_unquantized(fixture):
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    experts = [m.name for m in ck.plan.modules if ".experts." in m.name]
    assert len(experts) == FIXTURE_TABLE[fixture].experts
    routers = {f"{name.split('.experts.')[0]}.gate" for name in experts}
    assert routers <= set(ck.quantization_config["ignore"])
    assert {f"{r}.weight" for r in routers} <= set(ck.plan.passthrough)


def test_excluded_attention_stays_dense_and_ignored():
    ck = lazyxform.open(FIXTURES / "nvfp4_mlp_only", device="cpu")
    assert r"re:model\.layers\.0\.self_attn.*" in ck.quantization_config["ignore"]
    assert {m.name.rsplit(".", 1)[1] for m in ck.plan.modules} == {"gate_proj", "up_proj", "down_proj"}
    assert "model.layers.1.self_attn.q_proj.weight" in ck.plan.passthrough


def test_missing_scale_tensor(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.input_scale"))
    with pytest.raises(lazyxform.MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj has no 'input_scale'"):
        lazyxform.open(ckpt, device="cpu")


def test_fused_set_with_a_member_missing(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.0.self_attn.v_proj.")])
    with pytest.raises(lazyxform.MissingTensorError, match=r"fused set .*v_proj'\] missing"):
        lazyxform.open(ckpt, device="cpu")


# --- MIXED_PRECISION -------------------------------------------------------------------------------


def test_mixed_precision_gets_one_group_per_scheme_targeted_per_layer(tmp_path):
    """Layer 0 from the FP8 export, layer 1 from the FP8 per-channel export (same shapes)."""
    ckpt = copy_fixture("fp8", tmp_path)
    per_channel = tensors_of("fp8_pc_pt")

    def graft_layer_1(t):
        for k in [k for k in t if k.startswith("model.layers.1.")]:
            del t[k]
        t.update({k: v for k, v in per_channel.items() if k.startswith("model.layers.1.")})

    rewrite_tensors(ckpt, graft_layer_1)
    layers = {}
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        layers[f"model.layers.0.{proj}"] = {"quant_algo": "FP8"}
        layers[f"model.layers.1.{proj}"] = {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}

    def mixed(cfg):
        cfg["quantization"] = {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers, "exclude_modules": ["lm_head", "model.embed_tokens"]}

    edit_json(ckpt / "hf_quant_config.json", mixed)
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_algo="MIXED_PRECISION"))
    ck = lazyxform.open(ckpt, device="cpu")
    qc = ck.quantization_config
    assert qc["format"] == "float-quantized"
    groups = {g["weights"]["strategy"]: g for g in qc["config_groups"].values()}
    assert set(groups) == {"tensor", "channel"}
    assert sorted(groups["tensor"]["targets"]) == sorted(k for k in layers if ".0." in k)
    assert sorted(groups["channel"]["targets"]) == sorted(k for k in layers if ".1." in k)
    assert lazyxform.read_modelopt_algos(ckpt) == {"FP8", "FP8_PER_CHANNEL_PER_TOKEN"}
    out = dict(ck)
    assert out["model.layers.0.mlp.up_proj.weight_scale"].shape == (1,)
    assert out["model.layers.1.mlp.up_proj.weight_scale"].shape == (512, 1)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    ckpt = make_mixed(tmp_path_factory.mktemp("mixed"), MIXED_LAYOUT)
    with pytest.warns(lazyxform.LazyxformWarning, match=r"NVFP4_SVD has no compressed-tensors equivalent: 1 modules are dequantized .*: model\.layers\.1\.self_attn\.o_proj$"):
        ck = lazyxform.open(ckpt, device="cpu")
    return ck, load_tensors(ckpt), dict(ck)


def layout_algo(module: str) -> str:
    return MIXED_LAYOUT[max((p for p in MIXED_LAYOUT if module.startswith(p + ".") or module == p), key=len)][1]["quant_algo"]


def test_mixed_precision_one_config_group_per_scheme_targeting_exactly_its_modules(mixed):
    ck, orig, out = mixed
    qc = ck.quantization_config
    assert qc["format"] == "mixed-precision"
    by_format = {}
    for group in qc["config_groups"].values():
        acts = group.get("input_activations")
        by_format[(group["format"], acts and acts["num_bits"])] = sorted(group["targets"])
    layer0_attn = [f"model.layers.0.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert by_format == {
        ("nvfp4-pack-quantized", 4): layer0_attn,
        ("pack-quantized", None): [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")],
        ("mxfp8-quantized", 8): [f"model.layers.1.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")],
        ("nvfp4-pack-quantized", None): [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")],
    }
    assert "model.layers.1.self_attn.o_proj" in qc["ignore"]


def test_mixed_precision_every_module_is_exact_in_its_own_format(mixed):
    ck, orig, out = mixed
    modules = quantized_modules(orig)
    assert len(modules) == 14
    for module in modules:
        check_module(layout_algo(module), orig, out, ck.quantization_config, module, folded_row_factor(module, orig, out))
    # layer 0: the INT4 down_proj's pre_quant_scale went into the INT4 up_proj's rows
    assert ck.plan.runtime_pre_quant_scale == []
    assert "model.layers.0.mlp.down_proj.pre_quant_scale" not in out


ATTENTION = [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
NVFP4_TENSORS = ("weight", "weight_scale", "weight_scale_2", "input_scale")


def test_as_exported_modules_stream_unchanged_and_the_rest_is_converted():
    """An engine's own ModelOpt method loads these modules: their tensors come out as ModelOpt wrote
    them (name, dtype, shape, bytes; NVFP4's per-tensor scales 0-d and not inverted), the others as
    compressed-tensors tensors, and the config is unchanged."""
    path = FIXTURES / "nvfp4"
    tensors = load_tensors(path)
    ck = lazyxform.open(path, device="cpu", as_exported=ATTENTION)
    assert ck.plan.as_exported == sorted(ATTENTION)
    out = dict(ck.wrap(iter(tensors.items())))
    for module in ATTENTION:
        for suffix in NVFP4_TENSORS:
            name = f"{module}.{suffix}"
            assert (out[name].dtype, out[name].shape) == (tensors[name].dtype, tensors[name].shape), name
            assert torch.equal(out[name].reshape(-1).view(torch.uint8), tensors[name].reshape(-1).view(torch.uint8)), name
        assert f"{module}.weight_packed" not in out and f"{module}.weight_global_scale" not in out
    assert "model.layers.0.self_attn.o_proj.weight_packed" in out and "model.layers.0.self_attn.o_proj.weight" not in out
    assert ck.quantization_config == lazyxform.open(path, device="cpu").quantization_config


def test_as_exported_scales_are_still_checked(tmp_path):
    ckpt = copy_fixture("nvfp4", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_scale_2": torch.tensor(0.0)}))
    with pytest.raises(lazyxform.BadScaleError, match=r"^model\.layers\.0\.self_attn\.k_proj\.weight_scale_2: 1 of 1 "):
        list(lazyxform.open(ckpt, device="cpu", as_exported=ATTENTION))


@pytest.mark.parametrize(
    ("fixture", "modules", "error"),
    [
        ("nvfp4", ATTENTION[:1], r"as_exported names model\.layers\.0\.self_attn\.q_proj but not the rest of the fused set"),
        ("nvfp4", ["model.layers.0.input_layernorm"], r"model\.layers\.0\.input_layernorm is to stream as exported, but it is not a quantized module"),
        ("nvfp4_svdquant", ["model.layers.0.mlp.down_proj"], r"down_proj is to stream as exported, but it is not a quantized module with a compressed-tensors target"),
        ("int4_awq", ["model.layers.0.mlp.up_proj"], r"up_proj is to stream as exported, but model\.layers\.0\.mlp\.down_proj\.pre_quant_scale is folded into its rows"),
    ],
)
def test_what_cannot_stream_as_exported_is_named(fixture, modules, error):
    with pytest.raises(lazyxform.ConfigError, match=error):
        lazyxform.open(FIXTURES / fixture, device="cpu", as_exported=modules)


def test_as_exported_fused_siblings_are_still_checked_as_a_conversion_checks_them(tmp_path):
    """The engine's method takes one weight_scale_2 for a fused GEMM (SGLang: their max, without
    requantizing the weights), so siblings whose scales differ would load as a wrong layer: refused as
    the conversion refuses them."""
    ckpt = copy_fixture("nvfp4", tmp_path)
    name = "model.layers.0.self_attn.v_proj.weight_scale_2"
    rewrite_tensors(ckpt, lambda t: t.update({name: t[name] * 2}))
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"weight_scale_2 of siblings fused into one GEMM: .*q_proj\.weight_scale_2 and .*v_proj\.weight_scale_2 differ"):
        list(lazyxform.open(ckpt, device="cpu", as_exported=ATTENTION))
