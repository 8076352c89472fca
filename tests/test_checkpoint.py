"""lazyxform/checkpoint.py: `open` and the engine surface of a Checkpoint: the plan from headers
alone, hf_config (config.json with the compressed-tensors shim), typed errors for a directory that
is no ModelOpt checkpoint."""

from __future__ import annotations

import warnings

import pytest
from algos import SERVED
from reference import FIXTURES

import lazyxform
from lazyxform.reader import ShardReader


def test_open_builds_the_plan_from_headers_alone(monkeypatch):
    def refuse(self, info):
        raise AssertionError(f"read {info.name} while planning")

    monkeypatch.setattr(ShardReader, "read", refuse)
    ck = lazyxform.open(FIXTURES / "int8_sq", device="cpu")
    assert ck.plan.modules and ck.quantization_config["config_groups"]
    with pytest.raises(AssertionError, match="while planning"):
        next(iter(ck))


@pytest.mark.parametrize("fixture", SERVED)
def test_hf_config_is_config_json_with_the_shim(fixture):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # NVFP4_SVD is dequantized
        ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    assert ck.hf_config["quantization_config"] == ck.quantization_config
    assert ck.hf_config["architectures"] and ck.hf_config["hidden_size"] == 256


def test_directory_that_is_not_a_modelopt_checkpoint(tmp_path):
    with pytest.raises(lazyxform.NotAModelOptCheckpoint, match="no hf_quant_config.json"):
        lazyxform.open(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "awq"}}')
    with pytest.raises(lazyxform.NotAModelOptCheckpoint, match="quant_method 'modelopt'"):
        lazyxform.open(tmp_path, device="cpu")
    assert not lazyxform.is_modelopt_checkpoint(tmp_path)
