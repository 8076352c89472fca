"""lazyxform/fallback.py: modules whose format has no compressed-tensors scheme (NVFP4_SVD) become
dense model-dtype weights listed in `ignore`, with a warning (fallback="dequantize"), or raise
(fallback="error"). The dequantized values: tests/test_exactness.py, tests/recipes/test_fp4.py."""

from __future__ import annotations

import pytest
import torch
from algos import fixtures
from reference import FIXTURES

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
