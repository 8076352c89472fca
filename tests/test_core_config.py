"""The compressed-tensors config shim: both ModelOpt config forms, MIXED_PRECISION, ignore, KV."""

from __future__ import annotations

import re

import pytest
from compressed_tensors.quantization import QuantizationConfig
from helpers import copy_fixture, edit_json, rewrite_tensors, tensors_of
from reference import FIXTURES

import lazyxform
from lazyxform.modelopt import ModelOptConfig
from lazyxform.planner import _ignore_list

CORE_FIXTURES = ["fp8", "fp8_kv_fp8", "fp8_pc_pt", "fp8_2d_blockwise_wo", "int8_default", "int8_sq", "int8_wo", "qwen3moe_fp8"]
EXPECTED = {
    # fixture: (format, weights (type, bits, strategy), activations (type, bits, strategy, dynamic) or None)
    "fp8": ("float-quantized", ("float", 8, "tensor"), ("float", 8, "tensor", False)),
    "fp8_pc_pt": ("float-quantized", ("float", 8, "channel"), ("float", 8, "token", True)),
    "fp8_2d_blockwise_wo": ("float-quantized", ("float", 8, "block"), ("float", 8, "group", True)),
    "int8_default": ("int-quantized", ("int", 8, "channel"), ("int", 8, "tensor", False)),
    "int8_sq": ("int-quantized", ("int", 8, "channel"), ("int", 8, "tensor", False)),
    "int8_wo": ("pack-quantized", ("int", 8, "channel"), None),
}


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_recipe_maps_to_its_compressed_tensors_scheme(fixture):
    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    fmt, w, a = EXPECTED[fixture]
    (group,) = qc["config_groups"].values()
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == group["format"] == fmt
    assert group["targets"] == ["Linear"]
    assert (group["weights"]["type"], group["weights"]["num_bits"], group["weights"]["strategy"]) == w
    assert group["weights"]["symmetric"] is True
    acts = group.get("input_activations")
    assert (acts and (acts["type"], acts["num_bits"], acts["strategy"], acts["dynamic"])) == (a or None)
    assert set(qc["ignore"]) >= {"lm_head", "model.embed_tokens"}
    QuantizationConfig.model_validate(qc)  # round-trips through the library's own model


def test_block_scheme_says_128x128():
    qc = lazyxform.open(FIXTURES / "fp8_2d_blockwise_wo", device="cpu").quantization_config
    (group,) = qc["config_groups"].values()
    assert group["weights"]["block_structure"] == [128, 128]
    assert group["input_activations"]["group_size"] == 128


@pytest.mark.parametrize("fixture", CORE_FIXTURES)
def test_hf_config_is_config_json_with_the_shim(fixture):
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    assert ck.hf_config["quantization_config"] == ck.quantization_config
    assert ck.hf_config["architectures"] and ck.hf_config["hidden_size"] == 256


def test_flat_config_json_alone_gives_the_same_shim(tmp_path):
    ckpt = copy_fixture("int8_sq", tmp_path)
    nested = lazyxform.open(ckpt, device="cpu").quantization_config
    (ckpt / "hf_quant_config.json").unlink()
    assert lazyxform.open(ckpt, device="cpu").quantization_config == nested


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


def test_exclude_wildcards_become_anchored_regexes():
    cfg = ModelOptConfig(source=FIXTURES, default=None, exclude=["lm_head", "model.layers.0.self_attn*", "model.layers.?.mlp.gate"])
    ignore = _ignore_list(cfg, {}, {})
    assert ignore == ["lm_head", r"re:model\.layers\.0\.self_attn.*", r"re:model\.layers\..\.mlp\.gate"]
    assert re.fullmatch(ignore[1][3:], "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(ignore[1][3:], "model.layers.10.self_attn.q_proj")
    assert re.fullmatch(ignore[2][3:], "model.layers.7.mlp.gate") and not re.fullmatch(ignore[2][3:], "model.layers.7.mlp.gate_proj")


def test_moe_routers_stay_ignored_and_unquantized():
    ck = lazyxform.open(FIXTURES / "qwen3moe_fp8", device="cpu")
    assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(ck.quantization_config["ignore"])
    assert "model.layers.0.mlp.gate.weight" in ck.plan.passthrough
    assert len([m for m in ck.plan.modules if ".experts." in m.name]) == 2 * 4 * 3


def test_lower_case_leaked_algo_names_are_understood():
    assert lazyxform.read_modelopt_algos(FIXTURES / "fp8_2d_blockwise_wo") == {"FP8_PB_WO"}


@pytest.mark.parametrize("fixture", CORE_FIXTURES)
def test_vllm_accepts_the_shim(fixture):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    parsed = CompressedTensorsConfig.from_config(qc)
    assert parsed.target_scheme_map and parsed.ignore == qc["ignore"]
    if fixture == "fp8_kv_fp8":
        assert parsed.kv_cache_scheme["strategy"] == "tensor" and parsed.kv_cache_scheme["symmetric"] is True
