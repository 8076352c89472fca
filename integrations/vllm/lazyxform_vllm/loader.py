"""The weight-stream hook: vLLM's default loader yields the ModelOpt tensors, lazyxform rewrites them.

`DefaultModelLoader.get_all_weights` is the one place every safetensors load format passes
through (default, multi-thread out of order, fastsafetensors, instanttensor), whatever the user
chose, before `model.load_weights`. The wrap applies only to models loading with the "lazyxform"
quantization method; tensor parallelism shards the rewritten tensors as it would a
compressed-tensors checkpoint's.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator

import torch
import vllm
from vllm.config import ModelConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

import lazyxform
import lazyxform.profile
from lazyxform import LazyxformError

from .config_parser import MARK
from .quant_config import NAME

logger: logging.Logger = init_logger(f"vllm.{__name__}")

SUPPORTED_VLLM = ">=0.26,<0.34"  # pyproject.toml, extra "vllm"; docs/vllm.md says which were run


class UnsupportedVllmError(LazyxformError):
    """This vLLM changed a method lazyxform hooks."""


# What the hook wraps: vLLM has no registered extension point around the weight stream of the
# default load formats, so the method is replaced, and only where it has this signature.
HOOKED_SIGNATURE = ("self", "model_config", "model")


def install_loader_hook() -> None:
    original = DefaultModelLoader.get_all_weights
    if getattr(original, "lazyxform_hook", False):  # plugins may be loaded twice in one process
        return
    found = tuple(inspect.signature(original).parameters)
    if found != HOOKED_SIGNATURE:
        raise UnsupportedVllmError(
            f"lazyxform_vllm wraps DefaultModelLoader.get_all_weights{HOOKED_SIGNATURE}, which vLLM "
            f"{vllm.__version__} defines as get_all_weights{found}; lazyxform supports vLLM {SUPPORTED_VLLM}. "
            "Install a supported vLLM, or uninstall lazyxform to run this one without it"
        )

    @functools.wraps(original)
    def get_all_weights(
        self: DefaultModelLoader, model_config: ModelConfig, model: torch.nn.Module
    ) -> Iterator[tuple[str, torch.Tensor]]:
        weights = original(self, model_config, model)
        if model_config.quantization != NAME:
            return weights
        directory = model_config.hf_config.quantization_config[MARK]["checkpoint"]
        ck = lazyxform.open(directory)  # on the GPU when there is one: vLLM's worker set the device
        logger.info("lazyxform: rewriting the weight stream of %s on %s", directory, ck.device)
        return lazyxform.profile.maybe_profile(ck.wrap(weights), ck.device, ck.nbytes, ck.path.name)  # $LAZYXFORM_PROFILE=dir

    get_all_weights.lazyxform_hook = True  # type: ignore[attr-defined]
    DefaultModelLoader.get_all_weights = get_all_weights  # type: ignore[method-assign]
