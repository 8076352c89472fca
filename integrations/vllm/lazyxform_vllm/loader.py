"""The weight-stream hook: lazyxform feeds vLLM the rewritten tensors of a ModelOpt checkpoint.

`DefaultModelLoader.get_all_weights` is the one place every safetensors load format passes
through (default, multi-thread out of order, fastsafetensors, instanttensor), whatever the user
chose, before `model.load_weights`. The hook applies only to models loading with the "lazyxform"
quantization method; tensor parallelism shards the rewritten tensors as it would a
compressed-tensors checkpoint's.

On a GPU, with vLLM's default load format, lazyxform reads the files itself (`iter(ck)`: its
pipelined reader, page cache -> pinned staging -> device, overlapping reads and copies); otherwise,
or with LAZYXFORM_VLLM_READER=off, it rewrites the stream vLLM's own reader yields (`ck.wrap`).
Both give the same tensors.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import Iterator
from typing import Literal, get_args

import torch
import vllm
from vllm.config import ModelConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

import lazyxform
import lazyxform.profile
from lazyxform import LazyxformError

from .config_parser import MARK
from .quant_config import NAME, experts_input_scale

logger: logging.Logger = init_logger(f"vllm.{__name__}")

SUPPORTED_VLLM = ">=0.26,<0.34"  # pyproject.toml, extra "vllm"; docs/vllm.md says which were run


class UnsupportedVllmError(LazyxformError):
    """This vLLM changed a method lazyxform hooks."""


# What the hook wraps: vLLM has no registered extension point around the weight stream of the
# default load formats, so the method is replaced, and only where it has this signature.
HOOKED_SIGNATURE = ("self", "model_config", "model")

READER_ENV = "LAZYXFORM_VLLM_READER"
ReaderMode = Literal["auto", "on", "off"]
# The load formats whose stream is exactly the checkpoint directory's safetensors files, read whole.
PLAIN_LOAD_FORMATS = ("auto", "safetensors")


def reader_mode() -> ReaderMode:
    """auto (default): lazyxform's reader on a GPU where `own_reader_fits`; on: wherever it fits; off: never."""
    value = os.environ.get(READER_ENV, "").strip().lower() or "auto"
    if value not in get_args(ReaderMode):
        raise ValueError(f"{READER_ENV}={value!r}: expected one of {', '.join(get_args(ReaderMode))}")
    return value  # type: ignore[return-value]


def own_reader_fits(loader: DefaultModelLoader, model: torch.nn.Module) -> bool:
    """Whether vLLM would read exactly the checkpoint's safetensors files, every tensor, as the user
    left it: not with another load format or strategy it was asked for, nor when it skips experts of
    other ranks (expert parallelism) or reads other sources or files for this model."""
    config = loader.load_config
    return (
        config.load_format in PLAIN_LOAD_FORMATS
        and not config.model_loader_extra_config
        and config.safetensors_load_strategy is None
        and loader.local_expert_ids is None
        and not getattr(model, "secondary_weights", ())
        and getattr(model, "allow_patterns_overrides", None) is None
    )


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
        # On the GPU when there is one (vLLM's worker set the device); planned as the quantization config was.
        ck = lazyxform.open(directory, experts_input_scale=experts_input_scale())
        mode = reader_mode()
        if mode != "off" and (mode == "on" or ck.device.type == "cuda") and own_reader_fits(self, model):
            logger.info("lazyxform: reading and rewriting %s on %s (%s=off to use vLLM's reader)", directory, ck.device, READER_ENV)
            # vLLM's own iterator starts this clock, which its "Loading weights took" line reads.
            self.counter_before_loading_weights = time.perf_counter()
            pairs = iter(ck)
        else:
            logger.info("lazyxform: rewriting the weight stream of %s on %s", directory, ck.device)
            pairs = ck.wrap(weights)
        return lazyxform.profile.maybe_profile(pairs, ck.device, ck.nbytes, ck.path.name)  # $LAZYXFORM_PROFILE=dir

    get_all_weights.lazyxform_hook = True  # type: ignore[attr-defined]
    DefaultModelLoader.get_all_weights = get_all_weights  # type: ignore[method-assign]
