"""Every quantized module of every bundled fixture, end to end (lazyxform/recipes/*, planner.py,
prequant.py, stream.py through `open`), against two independent references: ModelOpt's formulas
decoded from the original tensors (reference.py) and compressed-tensors' decompressor applied to
lazyxform's output. The per-algo bounds, stream outputs and scale dtypes are the rows of
tests/algos.py (its docstring states the bounds); checks per module: helpers.check_module."""

from __future__ import annotations

import warnings

import pytest
import torch
from algos import FIXTURE_TABLE, SERVED
from helpers import check_module, folded_row_factor
from reference import FIXTURES, load_tensors, quantized_modules

import lazyxform

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("q_a_proj", "kv_a_proj_with_mqa"))


@pytest.fixture(scope="module", params=SERVED)
def case(request):
    name, row = request.param, FIXTURE_TABLE[request.param]
    path = FIXTURES / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = lazyxform.open(path, device="cpu")
    # Only a format without a compressed-tensors scheme is dequantized, and that says so; the only
    # other warning is about ModelOpt's defective norm folds (tests/test_prequant.py).
    warned = any(issubclass(w.category, lazyxform.LazyxformWarning) for w in caught)
    assert warned == (row.target.format == "dense" or bool(row.defective_norm_folds))
    return name, row, ck, load_tensors(path), dict(ck)


def test_every_module_is_exact_up_to_the_stated_bound(case):
    name, row, ck, orig, out = case
    modules = quantized_modules(orig)
    assert len(modules) == len(ck.plan.modules) == row.modules
    for module in modules:
        check_module(row.algo, orig, out, ck.quantization_config, module, folded_row_factor(module, orig, out))


def test_activation_scales_are_modelopts_merged_over_fused_siblings(case):
    """Static activation scales go out as `input_scale` iff the target has static inputs (merged
    over fused siblings to their max); NVFP4's become input_global_scale (check_module); elsewhere
    (dynamic or no activation quantization) none is streamed."""
    name, row, ck, orig, out = case
    names = [k for k in orig if k.endswith(".input_scale")]
    groups = ck.quantization_config["config_groups"].values()
    static = [g for g in groups if g.get("input_activations") and not g["input_activations"]["dynamic"]]
    assert bool(static) == ("input_scale" in row.target.outputs), "a static input scheme iff the stream carries input_scale"
    if "input_scale" not in row.target.outputs:
        assert not [k for k in out if k.endswith(".input_scale")]
        return
    assert names
    for scale in names:
        parent, dot, leaf = scale.removesuffix(".input_scale").rpartition(".")  # lm_head has no parent
        family = next((f for f in FUSED if leaf in f), (leaf,))
        siblings = torch.stack([orig[f"{parent}{dot}{x}.input_scale"] for x in family])
        assert out[scale].shape == (1,)
        assert out[scale].item() == siblings.max().item()
        # ModelOpt exports fused siblings with one input amax, so the merge loses nothing here.
        assert torch.equal(siblings.min(), siblings.max()), scale


def test_unquantized_tensors_pass_through_bit_exact(case):
    name, row, ck, orig, out = case
    folded_norms = {n for g in ck.plan.groups for r in g.rules if "pre_quant_scale" in r.label and "norm" in r.label for n in r.outputs}
    for tensor in ck.plan.passthrough:
        assert tensor not in folded_norms
        assert orig[tensor].dtype == torch.bfloat16, tensor
        assert torch.equal(out[tensor], orig[tensor]), tensor
    # The embeddings and output heads (the model's, and an MTP layer's embed_tokens and shared_head.head),
    # unless quantized; a tied lm_head (Gemma 3) has no lm_head.weight.
    heads = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")
    unquantized = {n for n in orig if n.endswith(heads)} - {f"{m.name}.weight" for m in ck.plan.modules}
    assert {n for n in ck.plan.passthrough if n.endswith(heads)} == unquantized
    assert "model.embed_tokens.weight" in unquantized
    assert set(out) == set(ck.plan.passthrough) | {o for g in ck.plan.groups for o in g.outputs}
