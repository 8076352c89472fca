"""Every vLLM symbol and signature lazyxform_vllm relies on, in one place: a vLLM upgrade that moves
or changes one fails here, by name, instead of somewhere inside an engine start."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import lazyxform_vllm

PLUGIN = Path(lazyxform_vllm.__file__).parent


def vllm_imports() -> dict[str, list[str]]:
    """module -> the names lazyxform_vllm imports from it, read from the plugin's source (anywhere in a
    file, function-level imports included), so that this list cannot fall behind the code."""
    found: dict[str, set[str]] = {}
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                found.setdefault(node.module, set()).update(a.name for a in node.names)
    return {module: sorted(names) for module, names in sorted(found.items())}


IMPORTED = vllm_imports()


def test_the_plugins_vllm_imports_are_found() -> None:
    assert "DefaultModelLoader" in IMPORTED["vllm.model_executor.model_loader.default_loader"]
    assert len(IMPORTED) >= 15, IMPORTED


@pytest.mark.parametrize("module", sorted(IMPORTED))
def test_imported_symbols_exist(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = [name for name in IMPORTED[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} no longer has {missing}"


def test_the_methods_it_calls_or_wraps_keep_their_signatures() -> None:
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
        CompressedTensorsKVCacheMethod,
    )
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.models.utils import WeightsMapper

    from lazyxform_vllm.loader import HOOKED_SIGNATURE

    def params(f) -> tuple[str, ...]:
        return tuple(inspect.signature(f).parameters)

    assert params(DefaultModelLoader.get_all_weights) == HOOKED_SIGNATURE
    assert params(CompressedTensorsConfig.get_scheme_dict) == ("self", "layer", "layer_name")
    assert params(CompressedTensorsConfig._add_fused_moe_to_target_scheme_map) == ("self",)
    assert params(WeightsMapper.apply_list) == ("self", "values")
    assert params(FusedMoEMethodBase.apply) == ("self", "layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input")
    assert params(CompressedTensorsKVCacheMethod.validate_kv_cache_scheme) == ("kv_cache_scheme",)


def test_the_loader_state_it_reads_exists() -> None:
    """lazyxform_vllm.loader.own_reader_fits reads these, and sets the clock of vLLM's load-time log line."""
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    loader = DefaultModelLoader(LoadConfig())
    for name in ("load_format", "model_loader_extra_config", "safetensors_load_strategy"):
        assert hasattr(loader.load_config, name), name
    assert loader.local_expert_ids is None
    assert loader.counter_before_loading_weights == 0.0


def test_the_kv_cache_algos_it_passes_on_are_the_ones_vllm_runs() -> None:
    """config_parser.VLLM_KV_CACHE_ALGOS: FP8 accepted by vLLM's compressed-tensors KV method, NVFP4 not."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsKVCacheMethod,
    )

    from lazyxform_vllm.config_parser import VLLM_KV_CACHE_ALGOS

    fp8 = {"type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True, "dynamic": False}
    CompressedTensorsKVCacheMethod.validate_kv_cache_scheme(fp8)
    with pytest.raises(NotImplementedError):
        CompressedTensorsKVCacheMethod.validate_kv_cache_scheme({**fp8, "num_bits": 4, "group_size": 16, "strategy": "tensor_group"})
    assert VLLM_KV_CACHE_ALGOS == {"FP8"}


def test_an_unknown_loader_signature_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from lazyxform_vllm import loader

    def changed(self, model_config, model, extra):  # what a future vLLM might define
        return iter(())

    monkeypatch.setattr(DefaultModelLoader, "get_all_weights", changed)
    with pytest.raises(loader.UnsupportedVllmError, match=r"vLLM .* defines as get_all_weights\('self', 'model_config', 'model', 'extra'\).*>=0.26,<0.34"):
        loader.install_loader_hook()
