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


@pytest.mark.parametrize("fixture", ["fp8_block_scales_inv", "fp8_pb_real"])
def test_other_block_layouts_stream_like_fp8_pb_wo(fixture):
    """fp8_block_scales_inv (FP8_BLOCK_SCALES in MIXED_PRECISION, scales as weight_scale_inv
    [out/128, in/128]) was edited from fp8_2d_blockwise_wo with the values unchanged: it streams the
    same tensors and the same scheme. fp8_pb_real (its own export, 2-D weight_scale) streams the
    same tensor names and scheme."""
    ck, base = lazyxform.open(FIXTURES / fixture, device="cpu"), lazyxform.open(FIXTURES / "fp8_2d_blockwise_wo", device="cpu")
    out, want = dict(ck), dict(base)
    assert set(out) == set(want)
    if fixture == "fp8_block_scales_inv":
        assert all(torch.equal(out[n], want[n]) for n in want)
    (group,), (base_group,) = ck.quantization_config["config_groups"].values(), base.quantization_config["config_groups"].values()
    assert {k: v for k, v in group.items() if k != "targets"} == {k: v for k, v in base_group.items() if k != "targets"}


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
