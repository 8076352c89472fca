"""lazyxform/recipes/mx.py: MXFP8, MXFP4, W4A8_MXFP4_FP8 scale checks (E8M0). Every module of every
fixture: tests/test_exactness.py."""

from __future__ import annotations

import pytest
import torch
from helpers import poisoned, set_at

import lazyxform


def test_e8m0_nan_scale(tmp_path):
    ck = lazyxform.open(poisoned(tmp_path, "mxfp4", "model.layers.0.self_attn.o_proj.weight_scale", set_at((2, 5), 255)), device="cpu")
    with pytest.raises(lazyxform.BadScaleError, match=r"o_proj\.weight_scale: 1 of 2048 E8M0 scale values are 255 \(NaN\) \(first at index \[2, 5\]\)"):
        list(ck)


def test_e8m0_zero_is_a_valid_scale(tmp_path):
    ckpt = poisoned(tmp_path, "mxfp8", "model.layers.0.self_attn.o_proj.weight_scale", torch.zeros_like)
    out = dict(lazyxform.open(ckpt, device="cpu"))
    assert out["model.layers.0.self_attn.o_proj.weight_scale"].eq(0).all()
