"""vLLM plugin: `vllm serve <ModelOpt checkpoint>` through vLLM's compressed-tensors path, with
the weights rewritten by lazyxform as they load. Registered under the `vllm.general_plugins`
entry point, so vLLM calls `register` in each of its processes."""

from __future__ import annotations

from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.transformers_utils.config import get_config_parser, register_config_parser

from .config_parser import ModelOptConfigParser
from .loader import install_loader_hook
from .quant_config import NAME, LazyxformConfig

__all__ = ["NAME", "LazyxformConfig", "register"]


def register() -> None:
    """Idempotent: vLLM may load general plugins more than once in a process."""
    register_quantization_config(NAME)(LazyxformConfig)
    current = type(get_config_parser("hf"))
    if not issubclass(current, ModelOptConfigParser):
        ModelOptConfigParser.wrapped = current
        register_config_parser("hf")(ModelOptConfigParser)
    install_loader_hook()
