"""lazyxform/recipes/int4.py: W4A16_AWQ and W4A8_AWQ (AWQ folds: tests/test_prequant.py) header
checks. The nibble repack: tests/ops/test_int4.py; every module of every fixture:
tests/test_exactness.py."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_fixture, edit_json, poisoned
from reference import FIXTURES

import lazyxform


def test_int4_group_scale_of_the_wrong_shape(tmp_path):
    ckpt = poisoned(tmp_path, "int4_awq", "model.layers.0.mlp.up_proj.weight_scale", lambda s: s[:, :1].contiguous())
    with pytest.raises(lazyxform.TensorMismatchError, match=r"up_proj\.weight_scale \(float32 \[512, 1\]\) in model\.safetensors: expected float32 \[512, 2\]"):
        lazyxform.open(ckpt, device="cpu")


def test_int4_weight_that_is_not_nibble_packed(tmp_path):
    ckpt = poisoned(tmp_path, "int4_awq", "model.layers.0.mlp.up_proj.weight", lambda w: w.to(torch.int8))
    with pytest.raises(lazyxform.TensorMismatchError, match=r"up_proj\.weight \(int8 \[256, 256\]\) .*expected uint8 \[256, 256\]"):
        lazyxform.open(ckpt, device="cpu")


def test_int4_with_zero_points_is_refused(tmp_path):
    ckpt = copy_fixture("int4_awq", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(has_zero_point=True))
    with pytest.raises(lazyxform.UnsupportedAlgoError, match="W4A16_AWQ with has_zero_point: true"):
        lazyxform.open(ckpt, device="cpu")


def test_a_config_without_group_size_takes_modelopts_128(tmp_path):
    """ModelOpt's INT4 block is 128 columns when the config does not say: the same plan and bits."""
    ckpt = copy_fixture("int4_awq", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].pop("group_size"))
    said, unsaid = lazyxform.open(FIXTURES / "int4_awq", device="cpu"), lazyxform.open(ckpt, device="cpu")
    assert unsaid.quantization_config == said.quantization_config
    assert said.quantization_config["config_groups"]["group_0"]["weights"]["group_size"] == 128
    streamed, expected = dict(unsaid), dict(said)
    assert streamed.keys() == expected.keys() and all(torch.equal(streamed[k], expected[k]) for k in expected)
