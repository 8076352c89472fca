"""lazyxform/modelopt.py: ModelOpt's quantization config in both forms (nested hf_quant_config.json,
flat config.json), leaked lower-case names, KV-cache schemes, recipe aliases. Malformed configs:
test_hardening.py; random ones: test_fuzz.py."""

from __future__ import annotations

import torch
from algos import ALGOS, ALIASES
from helpers import copy_fixture, same_bits, set_quant_algo
from reference import FIXTURES

import lazyxform


def test_flat_config_json_alone_gives_the_same_shim(tmp_path):
    ckpt = copy_fixture("int8_sq", tmp_path)
    nested = lazyxform.open(ckpt, device="cpu").quantization_config
    (ckpt / "hf_quant_config.json").unlink()
    assert lazyxform.open(ckpt, device="cpu").quantization_config == nested


def test_flat_nvfp4_kv_cache_scheme_string_is_understood(tmp_path):
    ckpt = copy_fixture("nvfp4_kv_nvfp4", tmp_path)
    (ckpt / "hf_quant_config.json").unlink()  # config.json alone: kv_cache_scheme is the string "NVFP4"
    assert lazyxform.open(ckpt, device="cpu").quantization_config == lazyxform.open(FIXTURES / "nvfp4_kv_nvfp4", device="cpu").quantization_config


def test_lower_case_leaked_algo_names_are_understood():
    assert (FIXTURES / "fp8_2d_blockwise_wo" / "hf_quant_config.json").read_text().count('"fp8_pb_wo"') == 1
    assert lazyxform.read_modelopt_algos(FIXTURES / "fp8_2d_blockwise_wo") == {"FP8_PB_WO"}


def test_an_alias_streams_exactly_like_its_algo(tmp_path):
    """FP8_BLOCK_SCALES (and any ALIASES entry): a copy of the canonical algo's fixture whose config
    says the alias gives the same config, plan and bits."""
    for alias, algo in ALIASES.items():
        fixture = ALGOS[algo].fixture
        ckpt = copy_fixture(fixture, tmp_path / alias)
        set_quant_algo(ckpt, alias)
        assert lazyxform.read_modelopt_algos(ckpt) == {alias}
        ck, canonical = lazyxform.open(ckpt, device="cpu"), lazyxform.open(FIXTURES / fixture, device="cpu")
        assert ck.quantization_config == canonical.quantization_config
        assert {m.algo for m in ck.plan.modules} == {alias}
        assert [m.name for m in ck.plan.modules] == [m.name for m in canonical.plan.modules]
        got, want = dict(ck), dict(canonical)
        assert got.keys() == want.keys()
        assert all(same_bits(got[k], want[k]) for k in want), alias
        assert any(t.dtype == torch.float8_e4m3fn for t in got.values())
