"""lazyxform/recipes/base.py: the registry (recipe_for), the light Args/Target of planning against
compressed-tensors' own, the fused-sibling merge of activation scales, row scaling."""

from __future__ import annotations

import struct

import pytest
import torch
from helpers import copy_fixture, edit_json, rewrite_tensors, tensors_of
from hypothesis import given, settings
from hypothesis import strategies as st

import lazyxform
from lazyxform.recipes.base import row_scaled


def test_unknown_quant_algo(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="FP3_MAGIC"))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_algo="FP3_MAGIC"))
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=r"'FP3_MAGIC' is not supported \(supported: .*FP8"):
        lazyxform.open(ckpt, device="cpu")


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


def test_differing_fused_activation_scales_merge_to_max_with_a_warning(tmp_path):
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.input_scale": t["model.layers.0.self_attn.k_proj.input_scale"] * 2}))
    with pytest.warns(lazyxform.LazyxformWarning, match=r"fused .*q_proj\.input_scale.*k_proj\.input_scale.*using their max"):
        out = dict(lazyxform.open(ckpt, device="cpu"))
    # Every member carries the largest of the exported scales, not the smallest or its own.
    exported = tensors_of("fp8")
    scales = {m: exported[f"model.layers.0.self_attn.{m}.input_scale"].item() for m in ("q_proj", "k_proj", "v_proj")}
    scales["k_proj"] *= 2
    assert len(set(scales.values())) > 1
    for member in scales:
        assert out[f"model.layers.0.self_attn.{member}.input_scale"].item() == max(scales.values()), member


def f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), by the IEEE encoder of the struct module."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_row_scaled_on_hand_worked_values():
    # 3 * 0.5 and 0.1f * 2 are exact; 1/3f * 3 rounds once (to 1.0), as a single fp32 product does.
    scale = torch.tensor([[3.0, 0.1], [1 / 3, 5.0]])
    factor = torch.tensor([0.5, 3.0], dtype=torch.bfloat16)
    got = row_scaled(scale, factor)
    assert got.dtype == torch.float32 and got.shape == (2, 2)
    assert got.tolist() == [[1.5, f32(0.1) * 0.5], [f32(f32(1 / 3) * 3), 15.0]]


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 64), first_row=st.integers(0, 64), groups=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_row_scaled_multiplies_each_row_once_in_fp32(rows, first_row, groups, seed):
    """Each element of rows first_row.. is scale x its row's factor, correctly rounded to fp32 once:
    computed here element by element in Python floats (binary64: the product of an fp32 and a bf16
    value is exact there) and rounded by struct; the rows before first_row are unchanged."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(first_row + rows, groups, generator=g) + 0.01
    factor = (torch.rand(rows, generator=g) + 0.5).to(torch.bfloat16)
    got = row_scaled(scale, factor, first_row)
    assert got.dtype == torch.float32 and got.shape == scale.shape
    s, f = scale.tolist(), [1.0] * first_row + factor.float().tolist()
    assert got.tolist() == [[f32(s[i][j] * f[i]) for j in range(groups)] for i in range(first_row + rows)]
