"""Issue-3 recipes -> compressed-tensors schemes, and the vLLM scheme each one selects."""

from __future__ import annotations

import pytest
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from reference import FIXTURES

import lazyxform

NVFP4_W = ("float", 4, "tensor_group", 16)
NVFP4_A = ("float", 4, "tensor_group", "local")
EXPECTED = {
    # fixture: (format, weights (type, bits, strategy, group), activations (type, bits, strategy, dynamic) or None)
    "int4_awq": ("pack-quantized", ("int", 4, "group", 128), None),
    "int4_blockwise_wo": ("pack-quantized", ("int", 4, "group", 128), None),
    "w4a8_awq": ("pack-quantized", ("int", 4, "group", 128), ("float", 8, "token", True)),
    "nvfp4": ("nvfp4-pack-quantized", NVFP4_W, NVFP4_A),
    "nvfp4_awq_clip": ("nvfp4-pack-quantized", NVFP4_W, NVFP4_A),
    "nvfp4_awq_lite": ("nvfp4-pack-quantized", NVFP4_W, NVFP4_A),
    "nvfp4_kv_fp8": ("nvfp4-pack-quantized", NVFP4_W, NVFP4_A),
    "nvfp4_kv_nvfp4": ("nvfp4-pack-quantized", NVFP4_W, NVFP4_A),
    "nvfp4_mlp_only": ("nvfp4-pack-quantized", NVFP4_W, NVFP4_A),
    "w4a16_nvfp4": ("nvfp4-pack-quantized", NVFP4_W, None),
    "w4a8_nvfp4_fp8": ("nvfp4-pack-quantized", NVFP4_W, None),
    "mxfp8": ("mxfp8-quantized", ("float", 8, "group", 32), ("float", 8, "group", True)),
    "mxfp4": ("mxfp4-pack-quantized", ("float", 4, "group", 32), ("float", 4, "group", True)),
    "w4a8_mxfp4_fp8": ("mxfp4-pack-quantized", ("float", 4, "group", 32), ("float", 8, "token", True)),
}
# The compressed-tensors scheme class vLLM's _get_scheme_from_parts picks (first match wins).
VLLM_SCHEME = {
    "pack-quantized": "WNA16",
    "nvfp4-pack-quantized": "W4A4Fp4",
    "mxfp8-quantized": "W8A8Mxfp8",
    "mxfp4-pack-quantized": "W4A4Mxfp4",
}


def vllm_scheme(fmt: str, w: QuantizationArgs, a: QuantizationArgs | None) -> str:
    """vLLM's selection predicates, in its order, without building kernels (no GPU here)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig as C,
    )

    if C._is_nvfp4_format(w):
        return "W4A4Fp4(use_a16)" if a is None else "W4A4Fp4" if C._is_nvfp4_format(a) else "error"
    if C._is_mxfp4_w4a8_fp8(w, a):
        return "W4A8Mxfp4"
    if C._is_mxfp4(w):
        return "W4A4Mxfp4"
    if C._is_mxfp8(w):
        return "W8A8Mxfp8"
    if C._is_fp8_w4a8(w, a):  # and compute capability 9.0 exactly
        return "W4A8Fp8"
    if C._is_wNa16_group_channel(w, a) and fmt == "pack-quantized":
        return "WNA16"
    return "none"


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_recipe_maps_to_its_compressed_tensors_scheme(fixture):
    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    fmt, w, a = EXPECTED[fixture]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == fmt and group["targets"] == ["Linear"]
    weights = group["weights"]
    assert (weights["type"], weights["num_bits"], weights["strategy"], weights["group_size"]) == w
    assert weights["symmetric"] is True and weights["dynamic"] is False
    acts = group.get("input_activations")
    assert (acts and (acts["type"], acts["num_bits"], acts["strategy"], acts["dynamic"])) == (a or None)
    QuantizationConfig.model_validate(qc)


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_vllm_parses_the_shim_and_picks_the_intended_scheme(fixture):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    parsed = CompressedTensorsConfig.from_config(qc)
    assert parsed.ignore == qc["ignore"]
    (group,) = qc["config_groups"].values()
    w = QuantizationArgs.model_validate(group["weights"])
    a = group.get("input_activations") and QuantizationArgs.model_validate(group["input_activations"])
    want = {"w4a8_awq": "W4A8Fp8", "w4a16_nvfp4": "W4A4Fp4(use_a16)", "w4a8_nvfp4_fp8": "W4A4Fp4(use_a16)", "w4a8_mxfp4_fp8": "W4A8Mxfp4"}
    assert vllm_scheme(group["format"], w, a) == want.get(fixture, VLLM_SCHEME[group["format"]])


def test_excluded_attention_stays_dense_and_ignored():
    ck = lazyxform.open(FIXTURES / "nvfp4_mlp_only", device="cpu")
    assert r"re:model\.layers\.0\.self_attn.*" in ck.quantization_config["ignore"]
    assert {m.name.rsplit(".", 1)[1] for m in ck.plan.modules} == {"gate_proj", "up_proj", "down_proj"}
    assert "model.layers.1.self_attn.q_proj.weight" in ck.plan.passthrough


def test_nvfp4_kv_cache_scheme_is_the_nvfp4_activation_layout():
    qc = lazyxform.open(FIXTURES / "nvfp4_kv_nvfp4", device="cpu").quantization_config
    kv = QuantizationArgs.model_validate(qc["kv_cache_scheme"])
    assert (kv.type, kv.num_bits, kv.strategy, kv.group_size, kv.dynamic, kv.symmetric) == ("float", 4, "tensor_group", 16, "local", True)


def test_flat_nvfp4_kv_cache_scheme_string_is_understood(tmp_path):
    from helpers import copy_fixture

    ckpt = copy_fixture("nvfp4_kv_nvfp4", tmp_path)
    (ckpt / "hf_quant_config.json").unlink()  # config.json alone: kv_cache_scheme is the string "NVFP4"
    assert lazyxform.open(ckpt, device="cpu").quantization_config == lazyxform.open(FIXTURES / "nvfp4_kv_nvfp4", device="cpu").quantization_config


def test_light_args_describe_and_resolve_to_compressed_tensors_args():
    """Planning holds recipes.base.Args instead of QuantizationArgs (no compressed-tensors import);
    they must describe the presets truthfully and group modules exactly as the real args would."""
    from itertools import product

    from compressed_tensors.quantization import preset_name_to_scheme

    from lazyxform.modelopt import AlgoConfig
    from lazyxform.recipes import RECIPES
    from lazyxform.recipes.base import PRESETS, WEIGHT_ONLY_PRESETS, Target, describe_target
    from lazyxform.recipes.kv import kv_cache_args

    for (name, role), args in PRESETS.items():
        real = getattr(preset_name_to_scheme(name, ["Linear"]), role)
        assert args.resolve() == real
        for f in ("num_bits", "type", "strategy", "group_size", "dynamic", "symmetric"):
            assert str(getattr(real, f).value if hasattr(getattr(real, f), "value") else getattr(real, f)) == str(getattr(args, f)), (name, role, f)
    for name in WEIGHT_ONLY_PRESETS:
        assert preset_name_to_scheme(name, ["Linear"]).input_activations is None
    targets = [r.target(AlgoConfig(a, g)) for a, r in RECIPES.items() for g in (None, 64, 128)]
    targets = [t for t in targets if t is not None]
    for algo in ("FP8", "NVFP4"):
        targets.append(Target(kv_cache_args(algo), None, "kv"))

    def real_key(t: Target) -> str:
        acts = t.input_activations.resolve().model_dump() if t.input_activations else None
        return repr((t.weights.resolve().model_dump(), acts, t.format))

    for a, b in product(targets, repeat=2):
        assert (a == b) == (real_key(a) == real_key(b)), (a, b)
    for t in targets:
        real = Target(t.weights.resolve(), t.input_activations and t.input_activations.resolve(), t.format)
        assert describe_target(t) == describe_target(real)
