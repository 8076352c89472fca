"""MIXED_PRECISION over the issue-3 formats: one compressed-tensors config group per distinct scheme,
targeted at exactly its modules; every module exact per its own format; NVFP4_SVD modules
dequantized and ignored. The checkpoint is built from fixture tensors (recipe_reference.make_mixed)."""

from __future__ import annotations

import pytest
from recipe_reference import check_module, make_mixed, row_factor_of
from reference import load_tensors, quantized_modules

import lazyxform

LAYOUT = {
    "model.layers.0.self_attn": ("nvfp4", {"quant_algo": "NVFP4", "group_size": 16}),
    "model.layers.0.mlp": ("int4_awq", {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True}),
    "model.layers.1.self_attn": ("mxfp8", {"quant_algo": "MXFP8", "group_size": 32}),
    "model.layers.1.self_attn.o_proj": ("nvfp4_svdquant", {"quant_algo": "NVFP4_SVD", "group_size": 16}),
    "model.layers.1.mlp": ("w4a8_nvfp4_fp8", {"quant_algo": "W4A8_NVFP4_FP8", "group_size": 32}),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    ckpt = make_mixed(tmp_path_factory.mktemp("mixed"), LAYOUT)
    with pytest.warns(lazyxform.LazyxformWarning, match=r"NVFP4_SVD has no compressed-tensors equivalent: 1 modules are dequantized .*: model\.layers\.1\.self_attn\.o_proj$"):
        ck = lazyxform.open(ckpt, device="cpu")
    return ck, load_tensors(ckpt), dict(ck)


def algo_of_module(module: str) -> str:
    return max((p for p in LAYOUT if module.startswith(p + ".") or module == p), key=len)


def test_one_config_group_per_scheme_targeting_exactly_its_modules(mixed):
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


def test_every_module_is_exact_in_its_own_format(mixed):
    ck, orig, out = mixed
    modules = quantized_modules(orig)
    assert len(modules) == 14
    for module in modules:
        algo = LAYOUT[algo_of_module(module)][1]["quant_algo"]
        check_module(algo, orig, out, ck.quantization_config, module, row_factor_of(module, orig, out))
    # layer 0: the INT4 down_proj's pre_quant_scale went into the INT4 up_proj's rows
    assert ck.plan.runtime_pre_quant_scale == []
    assert "model.layers.0.mlp.down_proj.pre_quant_scale" not in out


def test_vllm_maps_every_layer_to_its_group(mixed):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    ck, _, _ = mixed
    parsed = CompressedTensorsConfig.from_config(ck.quantization_config)
    assert set(parsed.target_scheme_map) == {m.name for m in ck.plan.modules if m.scheme != "ignore"}
