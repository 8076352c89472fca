"""lazyxform/recipes/kv.py: KV-cache scales (FP8, NVFP4) move from k_proj/v_proj to the attention
module unchanged, under the kv_cache_scheme of the fixture's kv_cache_quant_algo; a checkpoint
without KV quantization gets neither a scheme nor stray scales."""

from __future__ import annotations

import pytest
from algos import FIXTURE_TABLE, SERVED
from compressed_tensors.quantization import QuantizationArgs
from reference import FIXTURES, load_tensors

import lazyxform

# kv_cache_quant_algo -> (type, num_bits, strategy, dynamic, symmetric) of the kv_cache_scheme
KV_SCHEME = {"FP8": ("float", 8, "tensor", False, True), "NVFP4": ("float", 4, "tensor_group", "local", True)}


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")  # NVFP4_SVD is dequantized
@pytest.mark.parametrize("fixture", SERVED)
def test_kv_cache_scales_move_to_the_attention_unchanged(fixture):
    kv_algo = FIXTURE_TABLE[fixture].kv
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    orig, out = load_tensors(FIXTURES / fixture), dict(ck)
    kv = {k: v for k, v in orig.items() if k.endswith((".k_proj.k_scale", ".v_proj.v_scale"))}
    scheme = ck.quantization_config.get("kv_cache_scheme")
    if kv_algo is None:  # no KV-cache quantization: neither a scheme nor stray scales
        assert not kv and scheme is None
        assert not [k for k in out if k.endswith(("k_scale", "v_scale"))]
        return
    assert len(kv) == 4  # k and v of two layers
    for name, value in kv.items():
        attn, _, scale = name.rsplit(".", 2)
        assert name not in out
        assert out[f"{attn}.{scale}"].shape == (1,)
        assert out[f"{attn}.{scale}"].tolist() == [value.item()]
    assert (scheme["type"], scheme["num_bits"], scheme["strategy"], scheme["dynamic"], scheme["symmetric"]) == KV_SCHEME[kv_algo]
    args = QuantizationArgs.model_validate(scheme)
    assert (args.type, args.num_bits, args.strategy, args.dynamic, args.symmetric) == KV_SCHEME[kv_algo]


def test_nvfp4_kv_cache_scheme_is_the_nvfp4_activation_layout():
    qc = lazyxform.open(FIXTURES / "nvfp4_kv_nvfp4", device="cpu").quantization_config
    kv = QuantizationArgs.model_validate(qc["kv_cache_scheme"])
    assert (kv.type, kv.num_bits, kv.strategy, kv.group_size, kv.dynamic, kv.symmetric) == ("float", 4, "tensor_group", 16, "local", True)
