"""lazyxform/recipes/fp8.py: FP8 per tensor, per channel and 128x128 blocks (FP8_PB_WO, alias
FP8_BLOCK_SCALES: tests/test_modelopt.py). Every module of every fixture: tests/test_exactness.py."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_fixture, rewrite_tensors
from reference import FIXTURES, load_tensors

import lazyxform


def test_block_scheme_says_128x128():
    qc = lazyxform.open(FIXTURES / "fp8_2d_blockwise_wo", device="cpu").quantization_config
    (group,) = qc["config_groups"].values()
    assert group["weights"]["block_structure"] == [128, 128]
    assert group["input_activations"]["group_size"] == 128


def test_block_scales_lose_their_unit_dimensions():
    """ModelOpt stores 128x128 block scales as [out/128, 1, in/128, 1]; compressed-tensors as
    [out/128, in/128]: a 256 x 512 weight has 2 x 4 blocks, the same fp32 values."""
    name = "model.layers.0.mlp.up_proj"
    orig = load_tensors(FIXTURES / "fp8_2d_blockwise_wo")
    out = dict(lazyxform.open(FIXTURES / "fp8_2d_blockwise_wo", device="cpu"))
    assert orig[f"{name}.weight"].shape == (512, 256) and orig[f"{name}.weight_scale"].shape == (4, 1, 2, 1)
    assert out[f"{name}.weight_scale"].shape == (4, 2)
    assert torch.equal(out[f"{name}.weight_scale"], orig[f"{name}.weight_scale"][:, 0, :, 0])


def test_scale_of_the_wrong_dtype(tmp_path):
    ckpt = copy_fixture("fp8_pc_pt", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": t["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16)}))
    with pytest.raises(lazyxform.TensorMismatchError, match=r"down_proj\.weight \(bfloat16 \[256, 512\]\) .*expected float8_e4m3fn"):
        lazyxform.open(ckpt, device="cpu")
