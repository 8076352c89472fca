"""vLLM's compressed-tensors config class reads lazyxform's config (lazyxform/planner.py) for every
bundled fixture, the fully dequantized one and a MIXED_PRECISION checkpoint, and its scheme
selection picks the scheme each algo's row of tests/algos.py names. Moved here from the core
tests, which run without vLLM."""

from __future__ import annotations

import pytest
from algos import FIXTURE_TABLE, SERVED, fixtures
from compressed_tensors.quantization import QuantizationArgs
from helpers import MIXED_LAYOUT, make_mixed
from reference import FIXTURES
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

import lazyxform


@pytest.mark.parametrize("fixture", fixtures(dense=False))
def test_vllm_accepts_the_shim(fixture):
    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    parsed = CompressedTensorsConfig.from_config(qc)
    assert parsed.target_scheme_map and parsed.ignore == qc["ignore"]
    if FIXTURE_TABLE[fixture].kv == "FP8":
        assert parsed.kv_cache_scheme["strategy"] == "tensor" and parsed.kv_cache_scheme["symmetric"] is True
    elif FIXTURE_TABLE[fixture].kv is None:
        assert parsed.kv_cache_scheme is None
    else:
        assert parsed.kv_cache_scheme["strategy"] == "tensor_group"


def vllm_scheme(fmt: str, w: QuantizationArgs, a: QuantizationArgs | None) -> str:
    """vLLM's selection predicates, in its order, without building kernels (no GPU here)."""
    C = CompressedTensorsConfig

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


# Fixtures whose algo's row predicts vLLM's scheme (the FP8 / INT8 rows leave it to test_vllm_fixtures.py).
PREDICTED = [f for f in SERVED if FIXTURE_TABLE[f].target.vllm_scheme]


@pytest.mark.parametrize("fixture", PREDICTED)
def test_vllm_parses_the_shim_and_picks_the_intended_scheme(fixture):
    want = FIXTURE_TABLE[fixture].target.vllm_scheme
    qc = lazyxform.open(FIXTURES / fixture, device="cpu").quantization_config
    parsed = CompressedTensorsConfig.from_config(qc)
    assert parsed.ignore == qc["ignore"]
    (group,) = qc["config_groups"].values()
    w = QuantizationArgs.model_validate(group["weights"])
    a = group.get("input_activations") and QuantizationArgs.model_validate(group["input_activations"])
    assert vllm_scheme(group["format"], w, a) == want


def test_vllm_accepts_a_fully_dequantized_config():
    with pytest.warns(lazyxform.LazyxformWarning):
        qc = lazyxform.open(FIXTURES / "nvfp4_svdquant", device="cpu").quantization_config
    assert CompressedTensorsConfig.from_config(qc).ignore == qc["ignore"]


def test_vllm_maps_every_layer_to_its_group(tmp_path):
    with pytest.warns(lazyxform.LazyxformWarning):
        ck = lazyxform.open(make_mixed(tmp_path, MIXED_LAYOUT), device="cpu")
    parsed = CompressedTensorsConfig.from_config(ck.quantization_config)
    assert set(parsed.target_scheme_map) == {m.name for m in ck.plan.modules if m.scheme != "ignore"}
