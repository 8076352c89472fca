"""Linear schemes lazyxform hands SGLang's compressed-tensors linear method (which delegates every
step to `layer.scheme`), so the layer keeps SGLang's own method, parameter loaders and fused-shard
handling:

- `PreQuantScaleScheme` wraps SGLang's scheme of a layer whose AWQ / SmoothQuant `pre_quant_scale`
  lazyxform could not fold (ck.plan.runtime_pre_quant_scale): y = (x * pre_quant_scale) @ W^T.
- `StaticInt8InputScheme` wraps SGLang's static W8A8 int8 scheme on a GPU: a fused layer's
  per-tensor input scale gets one element per fused member, where SGLang's loaders put them, and
  the input is quantized with that static scale, as ModelOpt's SmoothQuant does, where SGLang's
  scheme quantizes it per token.
- `PortableScheme` computes a compressed-tensors layer in PyTorch on a CPU, where SGLang has no
  compressed-tensors kernel (its scheme selection asks for a CUDA device capability): the
  compressed-tensors tensors as SGLang's parameter classes, decoded once to float32 after loading,
  exactly (lazyxform.emulate), the input fake-quantized as the scheme prescribes, one float32 GEMM
  rounded to the model dtype. Slow; for CPU serving, tests and development.
- `PortableMoEScheme`, the same for routed experts inside SGLang's compressed-tensors fused-MoE
  method: each expert's gate/up and down as above (lazyxform.emulate.experts), every token through
  its routed experts; an expert's own gate/up pre_quant_scale, where lazyxform left one, multiplies
  that expert's tokens first.
- `PreQuantScaleMoEScheme`, mixed into SGLang's own fused-MoE scheme on a GPU (scale_experts_input)
  for routed experts that all keep one gate/up `pre_quant_scale` (ModelOpt's INT4 AWQ exports of
  Qwen3-MoE average them per layer; lazyxform cannot fold it into the norm in front, which the router
  also reads): it loads every expert's scale, requires them equal after loading, keeps one [hidden]
  vector and multiplies the routed experts' input by it after routing, then SGLang's scheme runs
  unchanged. SGLang's kernels take one input for every expert; experts whose scales differ reach it
  only where lazyxform cannot stream them dense (config.experts_input_scale), and stop loading.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import sglang.srt.layers.parameter
import torch
from sglang.srt.layers.moe import MoeRunnerConfig
from sglang.srt.layers.moe.token_dispatcher import CombineInput, StandardCombineInput, StandardDispatchOutput
from sglang.srt.layers.parameter import PerTensorScaleParameter
from sglang.srt.layers.quantization.compressed_tensors.schemes import (
    CompressedTensorsLinearScheme,
    CompressedTensorsMoEScheme,
)

from lazyxform import InconsistentScalesError, MissingTensorError, UnsupportedAlgoError
from lazyxform.emulate import (
    Scheme,
    announce_once,
    decode_experts,
    decode_layer,
    experts,
    experts_unlike_the_first,
    linear,
    load_expert_input_scale,
    mix_in,
    parameter_classes,
    register_experts,
    register_layout,
    require_expert_input_scales,
    round_int,
)

logger = logging.getLogger(__name__)

PRE_QUANT_SCALE = "pre_quant_scale"


class UnsupportedSglangSchemeError(UnsupportedAlgoError):
    """SGLang has no kernel path for a layer's compressed-tensors scheme."""


class PreQuantScaleScheme(CompressedTensorsLinearScheme):
    def __init__(self, inner: CompressedTensorsLinearScheme, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix  # the layer's name (an lm_head keeps none)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, params_dtype: torch.dtype, **kwargs: Any) -> None:
        self.inner.create_weights(layer=layer, input_size_per_partition=input_size_per_partition, params_dtype=params_dtype, **kwargs)
        # NaN until loaded: a scale that never arrives is caught after loading, not run as garbage.
        scale = torch.nn.Parameter(torch.full((input_size_per_partition,), torch.nan, dtype=params_dtype), requires_grad=False)
        scale.weight_loader = functools.partial(load_pre_quant_scale, layer, self.prefix)
        layer.register_parameter(PRE_QUANT_SCALE, scale)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if torch.isnan(layer.pre_quant_scale).any():
            raise MissingTensorError(f"{self.prefix}: the checkpoint stream carried no {PRE_QUANT_SCALE} for it")
        self.inner.process_weights_after_loading(layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.apply_weights(layer, x * layer.pre_quant_scale, bias)


def load_pre_quant_scale(
    layer: torch.nn.Module, prefix: str, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
) -> None:
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
            f"{prefix}: the {PRE_QUANT_SCALE} of fused member {shard_id} differs from one already loaded for "
            "another member; members of one fused GEMM share their input and need one scale"
        )


INT8_MAX = 127
# The per-tensor input quantizer parameters of SGLang's CompressedTensorsW8A8Int8 (static inputs).
SHARD_INPUT_PARAMETERS = ("input_scale", "input_zero_point")


class StaticInt8InputScheme(CompressedTensorsLinearScheme):
    """SGLang's CompressedTensorsW8A8Int8 for a static per-tensor INT8 input (W8A8_SQ_PER_CHANNEL),
    made to compute it. Two gaps of that scheme, read in SGLang 0.5.17 and 0.5.23:

    - Loading: its create_weights registers the input scale (and zero point) as one-element
      PerTensorScaleParameters, but SGLang's fused loaders (load_qkv_weight / load_merged_column_weight,
      and the fused-in-checkpoint case) write each member's scale at the member's index: loading k, v
      or up fails with IndexError. Here they get one element per member, only where SGLang registered
      fewer; its process_weights_after_loading already reduces several (the max of the scales).
    - Running: its apply_weights quantizes the input per token, dynamically (per_token_quant_int8),
      and never reads the loaded input_scale: another function than the checkpoint's, whose input
      quantizer is static per tensor and clips at the calibrated range (on the H200, 2.8x the
      reference's noise for int8_sq, 4.7x for gemma3_int8_sq; 0.95x against a per-token reference).
      Here the input is quantized with the static scale (lazyxform.emulate.round_int: round half to
      even, [-128, 127], ModelOpt's rule) and SGLang's own int8 GEMM runs with that scale for every token."""

    def __init__(self, inner: CompressedTensorsLinearScheme) -> None:
        self.inner = inner

    def create_weights(self, layer: torch.nn.Module, output_partition_sizes: list[int], **kwargs: Any) -> None:
        self.inner.create_weights(layer=layer, output_partition_sizes=output_partition_sizes, **kwargs)
        members = len(output_partition_sizes)
        for name in SHARD_INPUT_PARAMETERS:
            param = layer._parameters.get(name)
            if isinstance(param, PerTensorScaleParameter) and param.numel() < members:
                per_member = torch.empty(members, dtype=param.dtype, device=param.device)
                layer.register_parameter(name, PerTensorScaleParameter(data=per_member, weight_loader=param.weight_loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.inner.process_weights_after_loading(layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from sgl_kernel import int8_scaled_mm  # CUDA builds only; this scheme is handed out on a GPU

        if getattr(layer, "input_zero_point", None) is not None:  # SGLang registers it for asymmetric inputs only
            raise NotImplementedError(
                f"{type(self).__name__}: an asymmetric static INT8 input (no ModelOpt export has one, and lazyxform writes none)"
            )
        rows = x.reshape(-1, x.shape[-1])
        scale = layer.input_scale.float().reshape(1, 1)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # a zero scale (amax 0) quantizes to zeros
        x_q = round_int(rows.float() / safe, INT8_MAX).to(torch.int8)
        out = int8_scaled_mm(x_q, layer.weight, scale.expand(len(rows), 1).contiguous(), layer.weight_scale, out_dtype=x.dtype, bias=bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


# SGLang's parameter class for each kind of tensor of lazyxform.emulate.layout.
PARAMETER_CLASS = parameter_classes(sglang.srt.layers.parameter)


def announce(kind: str, scheme: Scheme) -> None:
    """One log line per layer kind and scheme, in each process."""
    announce_once(logger, kind, scheme, "lazyxform: SGLang has no CPU kernel for %s %s layers; lazyxform's portable PyTorch kernel runs them", scheme, kind)


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
        announce("linear", self.scheme)
        register_layout(
            layer, self.scheme, output_partition_sizes, input_size_per_partition, params_dtype, PARAMETER_CLASS, weight_loader
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        decode_layer(self.scheme, layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(self.scheme, layer, x, bias)


EXPERTS_PRE_QUANT_SCALE = "w13_pre_quant_scale"  # experts.{e}.{gate,up}_proj.pre_quant_scale, as SGLang maps expert names


class PortableMoEScheme(CompressedTensorsMoEScheme):
    def __init__(self, scheme: Scheme, input_scaled: bool) -> None:
        self.scheme = scheme
        self.input_scaled = input_scaled  # the experts' gate/up keep a pre_quant_scale at run time

    # weight_attrs: the expert weight_loader and other attributes SGLang's FusedMoE gives every parameter.
    def create_weights(self, layer: torch.nn.Module, *, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, with_bias: bool = False, **weight_attrs: Any) -> None:  # fmt: skip
        if with_bias:
            raise NotImplementedError(f"{layer.layer_name}: lazyxform's portable fused-MoE kernel runs experts without bias")
        announce("fused-MoE", self.scheme)
        register_experts(layer, self.scheme, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, weight_attrs)
        if self.input_scaled:
            register_experts_pre_quant_scale(layer, num_experts, hidden_size, params_dtype)

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config: MoeRunnerConfig) -> None:
        config = moe_runner_config
        if config.activation != "silu" or config.gemm1_alpha is not None or config.apply_router_weight_on_input:
            raise NotImplementedError(
                f"{layer.layer_name}: lazyxform's portable fused-MoE kernel runs SiLU experts weighted after the down "
                f"projection (activation {config.activation}, gemm1_alpha {config.gemm1_alpha}, "
                f"apply_router_weight_on_input {config.apply_router_weight_on_input})"
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.input_scaled:
            require_expert_input_scales(getattr(layer, EXPERTS_PRE_QUANT_SCALE).data, layer.layer_name)
        decode_experts(self.scheme, layer)

    def apply_weights(self, layer: torch.nn.Module, dispatch_output: StandardDispatchOutput) -> StandardCombineInput:
        topk_weights, topk_ids, _ = dispatch_output.topk_output
        scale = getattr(layer, EXPERTS_PRE_QUANT_SCALE, None)
        return StandardCombineInput(hidden_states=experts(self.scheme, layer, dispatch_output.hidden_states, topk_weights, topk_ids, scale))


def load_expert_pre_quant_scale(
    layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor, weight_name: str, shard_id: str, expert_id: int
) -> None:
    """SGLang's expert weight loader for w13_pre_quant_scale: this rank's experts' gate (w1) and up (w3) scales."""
    local = layer._map_global_expert_id_to_local_expert_id(expert_id)
    if local != -1:  # -1: another rank's expert
        load_expert_input_scale(param.data, local, loaded, layer.layer_name, expert_id)


def register_experts_pre_quant_scale(layer: torch.nn.Module, num_experts: int, hidden_size: int, params_dtype: torch.dtype) -> None:
    """The experts' [experts, hidden] gate/up scales, filled per expert by SGLang's expert weight
    mapping (experts.{e}.gate_proj / up_proj -> experts.w13_). NaN until loaded: an expert whose scale
    never arrives is caught after loading."""
    scale = torch.nn.Parameter(torch.full((num_experts, hidden_size), torch.nan, dtype=params_dtype), requires_grad=False)
    scale.weight_loader = functools.partial(load_expert_pre_quant_scale, layer)
    layer.register_parameter(EXPERTS_PRE_QUANT_SCALE, scale)


def scale_experts_input(scheme: CompressedTensorsMoEScheme) -> CompressedTensorsMoEScheme:
    """SGLang's fused-MoE `scheme`, made to apply its experts' one gate/up pre_quant_scale (see the
    module docstring). A mixin, not a wrapper object: SGLang's expert weight loader dispatches on the
    scheme's class name (FusedMoE._weight_loader_impl transposes the weights of
    CompressedTensorsWNA16MoE, INT4 AWQ's scheme) and on isinstance, so the scheme keeps both."""
    scheme.__class__ = mix_in(PreQuantScaleMoEScheme, type(scheme))
    return scheme


# A CompressedTensorsMoEScheme itself, so that the combined class has the instance layout of the scheme.
class PreQuantScaleMoEScheme(CompressedTensorsMoEScheme):
    """Mixed in front of an SGLang fused-MoE scheme class by scale_experts_input; every method it does
    not define is the scheme's own."""

    def create_weights(self, layer: torch.nn.Module, *, num_experts: int, hidden_size: int, params_dtype: torch.dtype, **kwargs: Any) -> None:
        super().create_weights(layer=layer, num_experts=num_experts, hidden_size=hidden_size, params_dtype=params_dtype, **kwargs)
        register_experts_pre_quant_scale(layer, num_experts, hidden_size, params_dtype)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        scales = getattr(layer, EXPERTS_PRE_QUANT_SCALE).data
        require_expert_input_scales(scales, layer.layer_name)
        differ = experts_unlike_the_first(scales)
        if differ:
            raise UnsupportedSglangSchemeError(
                f"{layer.layer_name}: the experts' gate/up pre_quant_scale differs between experts (local expert 0 vs "
                f"{differ}); SGLang's {type(self).__name__} runs every expert on one input. lazyxform streams such "
                "experts dense for SGLang on a GPU only where it can dequantize their format (INT4 AWQ); on a CPU "
                "lazyxform's portable fused-MoE kernel computes them"
            )
        layer.experts_input_scale = scales[0].clone()
        delattr(layer, EXPERTS_PRE_QUANT_SCALE)
        super().process_weights_after_loading(layer)

    def apply_weights(self, layer: torch.nn.Module, dispatch_output: StandardDispatchOutput) -> CombineInput:
        if any(getattr(dispatch_output, f, None) is not None for f in ("hidden_states_scale", "hidden_states_pre_quant")):
            raise UnsupportedSglangSchemeError(
                f"{layer.layer_name}: SGLang quantized the experts' input before the experts ran, so lazyxform cannot "
                "multiply it by the experts' gate/up pre_quant_scale"
            )
        # After routing: SGLang chose topk_output from the unscaled input, which the router reads.
        scaled = dispatch_output.hidden_states * layer.experts_input_scale
        return super().apply_weights(layer, dispatch_output._replace(hidden_states=scaled))
