"""The quantization config SGLang sees: a ModelOpt checkpoint presented as compressed-tensors.

`ModelConfig._parse_quant_hf_config` is where SGLang reads a checkpoint's quantization config, from
config.json or, for a legacy export, hf_quant_config.json; `_verify_quantization` picks the method
from what it returns, and `get_quant_config` later builds the method's config from
`hf_config.quantization_config`. The hook answers, for a checkpoint lazyxform serves, lazyxform's
compressed-tensors config plus a MARK entry (the local checkpoint directory, which the weight-stream
hook needs in the scheduler process), and writes the same into `hf_config.quantization_config`, so
every later reader, SGLang's model code included, sees one config: compressed-tensors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sglang
from sglang.srt.utils import is_cpu

import lazyxform
from lazyxform.fallback import ExpertsInputScale
from lazyxform.routing import route, served_algos

from .routing import ROUTE_ENV, native_algos

logger = logging.getLogger(__name__)

MARK = "lazyxform"  # key of the mark in the quantization config
# An explicit --quantization other than these is the user's choice and is respected.
COMPRESSED_TENSORS = (None, "compressed-tensors", "compressed_tensors")


def parse_quant_hf_config(original: Callable[[Any], dict | None], model_config: Any) -> dict | None:
    """AROUND hook of ModelConfig._parse_quant_hf_config."""
    quant = original(model_config)
    if isinstance(quant, dict) and MARK in quant:  # presented by an earlier call
        return quant
    mode = route(ROUTE_ENV)
    directory = Path(model_config.model_path)
    if mode == "off" or not directory.is_dir() or not lazyxform.is_modelopt_checkpoint(directory):
        return quant
    if model_config.quantization not in COMPRESSED_TENSORS:
        logger.info("lazyxform: --quantization %s given for %s; left to SGLang", model_config.quantization, directory)
        return quant
    if served_algos(directory, mode, is_cpu(), native_algos(sglang.__version__), logger, "SGLang") is None:
        return quant
    presented = presented_config(directory)
    model_config.hf_config.quantization_config = presented
    return copy.deepcopy(presented)


def presented_config(directory: Path) -> dict[str, Any]:
    """lazyxform's compressed-tensors quantization config of the checkpoint, marked. Configs and
    safetensors headers only: no tensor is read."""
    ck = lazyxform.open(directory, device="cpu", experts_input_scale=experts_input_scale())
    return {**copy.deepcopy(ck.quantization_config), MARK: {"checkpoint": str(directory.resolve())}}


def experts_input_scale() -> ExpertsInputScale:
    """What lazyxform.open does with routed experts whose gate/up pre_quant_scale differs between
    experts: keep it on a CPU, where lazyxform's portable fused-MoE scheme scales each expert's input;
    on a GPU, where SGLang's fused-MoE kernels take one input for all experts, stream those layers'
    experts dense with the scales multiplied in (SGLang then runs its unquantized fused MoE there)."""
    return "runtime" if is_cpu() else "dense"
