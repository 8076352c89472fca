"""Linear schemes lazyxform hands SGLang's compressed-tensors linear method (which delegates every
step to `layer.scheme`), so the layer keeps SGLang's own method, parameter loaders and fused-shard
handling:

- `PreQuantScaleScheme` wraps SGLang's scheme of a layer whose AWQ / SmoothQuant `pre_quant_scale`
  lazyxform could not fold (ck.plan.runtime_pre_quant_scale): y = (x * pre_quant_scale) @ W^T.
- `PortableScheme` computes a compressed-tensors layer in PyTorch on a CPU, where SGLang has no
  compressed-tensors kernel (its scheme selection asks for a CUDA device capability): the
  compressed-tensors tensors as SGLang's parameter classes, decoded once to float32 after loading,
  exactly (lazyxform.emulate), the input fake-quantized as the scheme prescribes, one float32 GEMM
  rounded to the model dtype. Slow; for CPU serving, tests and development.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.parameter import (
    BasevLLMParameter,
    BlockQuantScaleParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)
from sglang.srt.layers.quantization.compressed_tensors.schemes import CompressedTensorsLinearScheme

from lazyxform import InconsistentScalesError, MissingTensorError
from lazyxform.emulate import Scheme, decode_layer, linear, register_layout

logger = logging.getLogger(__name__)

PRE_QUANT_SCALE = "pre_quant_scale"


class PreQuantScaleScheme(CompressedTensorsLinearScheme):
    def __init__(self, inner: CompressedTensorsLinearScheme) -> None:
        self.inner = inner

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, params_dtype: torch.dtype, **kwargs: Any) -> None:
        self.inner.create_weights(layer=layer, input_size_per_partition=input_size_per_partition, params_dtype=params_dtype, **kwargs)
        # NaN until loaded: a scale that never arrives is caught after loading, not run as garbage.
        scale = torch.nn.Parameter(torch.full((input_size_per_partition,), torch.nan, dtype=params_dtype), requires_grad=False)
        scale.weight_loader = functools.partial(load_pre_quant_scale, layer)
        layer.register_parameter(PRE_QUANT_SCALE, scale)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if torch.isnan(layer.pre_quant_scale).any():
            raise MissingTensorError(f"{layer.prefix}: the checkpoint stream carried no {PRE_QUANT_SCALE} for it")
        self.inner.process_weights_after_loading(layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.apply_weights(layer, x * layer.pre_quant_scale, bias)


def load_pre_quant_scale(layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Loads an [in] scale: this rank's slice for a row-parallel layer, whose input is split; once
    for the members of a fused layer (q/k/v, gate/up), which read one input and so must carry one
    scale (ModelOpt exports them so)."""
    size = param.shape[0]
    if loaded.shape[0] != size:
        loaded = loaded.narrow(0, layer.tp_rank * size, size)
    loaded = loaded.to(device=param.device, dtype=param.dtype)
    if torch.isnan(param).all():
        param.data.copy_(loaded)
    elif not torch.equal(param.data, loaded):
        raise InconsistentScalesError(
            f"{layer.prefix}: the {PRE_QUANT_SCALE} of fused member {shard_id} differs from one already loaded for "
            "another member; members of one fused GEMM share their input and need one scale"
        )


# SGLang's parameter class for each kind of tensor of lazyxform.emulate.layout: the classes its
# compressed-tensors schemes declare, whose loaders shard fused and tensor-parallel layers.
PARAMETER_CLASS: dict[str, type[BasevLLMParameter]] = {
    "matrix": ModelWeightParameter,
    "packed": PackedvLLMParameter,
    "channel": ChannelQuantScaleParameter,
    "group": GroupQuantScaleParameter,
    "block": BlockQuantScaleParameter,
    "tensor": PerTensorScaleParameter,
    "base": BasevLLMParameter,
}

ANNOUNCED: set[str] = set()


class PortableScheme(CompressedTensorsLinearScheme):
    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: Callable[..., None],
        **kwargs: Any,
    ) -> None:
        if str(self.scheme) not in ANNOUNCED:  # one line per scheme and process
            ANNOUNCED.add(str(self.scheme))
            logger.info("lazyxform: SGLang has no CPU kernel for %s linear layers; lazyxform's portable PyTorch kernel runs them", self.scheme)
        register_layout(
            layer, self.scheme, output_partition_sizes, input_size_per_partition, params_dtype,
            lambda kind, data, args: PARAMETER_CLASS[kind](data=data, weight_loader=weight_loader, **args),
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        decode_layer(self.scheme, layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(self.scheme, layer, x, bias)
