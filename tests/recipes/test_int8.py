"""lazyxform/recipes/int8.py: W8A8_SQ_PER_CHANNEL (SmoothQuant folds: tests/test_prequant.py) and
W8A16. Every module of every fixture: tests/test_exactness.py."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from helpers import copy_fixture, rewrite_tensors
from reference import FIXTURES, load_tensors

import lazyxform


def test_scale_of_the_wrong_shape(tmp_path):
    ckpt = copy_fixture("int8_default", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(255)}))
    with pytest.raises(lazyxform.TensorMismatchError) as err:
        lazyxform.open(ckpt, device="cpu")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj.weight_scale (float32 [255]) in model.safetensors: expected float32 [256]" in msg


def test_w8a16_packs_the_int8_codes_and_holds_the_scale_in_the_model_dtype():
    """WNA16 packs four int8 codes per int32 and keeps one scale per row in the model dtype (bf16
    here: vLLM allocates the parameter so)."""
    orig, out = load_tensors(FIXTURES / "int8_wo"), dict(lazyxform.open(FIXTURES / "int8_wo", device="cpu"))
    name = "model.layers.1.mlp.down_proj"
    w = orig[f"{name}.weight"]
    assert w.dtype == torch.int8 and w.shape == (256, 512)
    assert out[f"{name}.weight_packed"].dtype == torch.int32 and out[f"{name}.weight_packed"].shape == (256, 512 // 4)
    assert out[f"{name}.weight_shape"].tolist() == [256, 512]
    assert torch.equal(unpack_from_int32(out[f"{name}.weight_packed"], 8, w.shape), w)
    scale = out[f"{name}.weight_scale"]
    assert scale.dtype == torch.bfloat16 and scale.shape == (256, 1)
    assert torch.equal(scale, orig[f"{name}.weight_scale"].to(torch.bfloat16)[:, None])
