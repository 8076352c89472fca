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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sglang
import torch
from sglang.srt.utils import is_cpu

import lazyxform
from lazyxform.fallback import EXPERT, ExpertsInputScale
from lazyxform.plan import ModulePlan
from lazyxform.prequant import PQS
from lazyxform.routing import route, served_algos
from lazyxform.topology import topology_of

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
    ck = open_checkpoint(directory, "cpu")
    return {**copy.deepcopy(ck.quantization_config), MARK: {"checkpoint": str(directory.resolve())}}


def open_checkpoint(directory: str | Path, device: str | torch.device | None = None) -> lazyxform.Checkpoint:
    """The checkpoint as this SGLang process serves it: planned alike wherever it is opened (the
    quantization config, the weight stream), with the experts' input scales and the modules handed to
    SGLang's ModelOpt methods as this process runs them."""
    if is_cpu():
        return lazyxform.open(directory, device, experts_input_scale=experts_input_scale())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # the second open gives them
        planned = lazyxform.open(directory, "cpu", experts_input_scale=experts_input_scale())
    return lazyxform.open(directory, device, experts_input_scale=experts_input_scale(), as_exported=modelopt_method_modules(planned))


# On a GPU, the ModelOpt recipes whose layers SGLang's own ModelOpt methods run (quant_config.py,
# LazyxformConfig.modelopt_method says why): algo -> whether its routed experts go too.
MODELOPT_METHOD_ALGOS = {"FP8": True, "NVFP4": False}
NVFP4_GROUP = 16  # the only block size SGLang's FP4 kernels take (and ModelOpt's NVFP4 default)


def modelopt_method_modules(ck: lazyxform.Checkpoint) -> frozenset[str]:
    """The checkpoint's modules that get SGLang's ModelOpt methods on a GPU, and so stream as exported:
    those of FP8 (experts too) and NVFP4 in 16-column blocks (not experts), without a pre_quant_scale
    (SGLang's ModelOpt FP4 method drops it where it runs FP4 Marlin, on GPUs below SM 10.0). Chosen per
    SGLang layer: a fused set, or a layer's routed experts, all of whose modules qualify, or none of it."""
    topology = topology_of(ck.hf_config)
    layers: dict[str, set[str]] = {}  # SGLang layer -> its checkpoint modules
    qualified = set()
    for m in ck.plan.modules:
        expert = EXPERT.match(m.name)
        if expert:
            layer = expert["experts"]
        else:
            parent, dot, leaf = m.name.rpartition(".")
            layer = f"{parent}{dot}{'+'.join(topology.fused_family(leaf))}"
        layers.setdefault(layer, set()).add(m.name)
        if qualifies(ck, m, bool(expert)):
            qualified.add(m.name)
    return frozenset(n for members in layers.values() if members <= qualified for n in members)


def qualifies(ck: lazyxform.Checkpoint, m: ModulePlan, expert: bool) -> bool:
    """Whether one module may go to SGLang's ModelOpt method (modelopt_method_modules)."""
    experts_too = MODELOPT_METHOD_ALGOS.get(m.algo)
    if experts_too is None or m.scheme == "ignore" or PQS in m.inputs or (expert and not experts_too):
        return False  # another recipe, a plain weight (no target, or experts made dense), a pre_quant_scale
    return m.algo != "NVFP4" or (ck.modelopt_config.algo_for(m.name).group_size or NVFP4_GROUP) == NVFP4_GROUP


def experts_input_scale() -> ExpertsInputScale:
    """What lazyxform.open does with routed experts whose gate/up pre_quant_scale differs between
    experts: keep it on a CPU, where lazyxform's portable fused-MoE scheme scales each expert's input;
    on a GPU, where SGLang's fused-MoE kernels take one input for all experts, stream those layers'
    experts dense with the scales multiplied in (SGLang then runs its unquantized fused MoE there)."""
    return "runtime" if is_cpu() else "dense"
