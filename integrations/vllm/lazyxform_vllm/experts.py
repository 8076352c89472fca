"""Routed experts whose gate/up projections keep an AWQ `pre_quant_scale` at run time.

ModelOpt's AWQ exports of MoE models give each expert's gate_proj and up_proj a pre_quant_scale
that lazyxform cannot fold (the post-attention norm in front also feeds the router and any shared
expert). vLLM's fused-MoE kernels take one input for every expert, with no per-expert input scale.
Two cases, told apart by the loaded values:

- every expert of the layer has the same scale (ModelOpt's MoE resmoothing averages them, e.g.
  Qwen3-MoE): the routed experts' input is scaled once, after routing, then any inner MoE method
  (vLLM's compressed-tensors one on a GPU, lazyxform's portable one on a CPU) runs unchanged. Exact:
  x * s is what each expert's gate and up read. Cost: one elementwise multiply of [tokens, hidden] per
  MoE layer, and one [experts, hidden] scale tensor per layer kept until loading ends.
- the scales differ per expert (DeepSeek-V3, whose MoE block ModelOpt does not resmooth): only a
  kernel that scales each expert's tokens can compute it. lazyxform's portable CPU kernel does
  (portable.PortableMoEMethod, `scales_each_experts_input`). For any other kernel the plugin opens
  the checkpoint with experts_input_scale="dense" (quant_config.experts_input_scale): such a layer's
  experts then arrive as dense weights with the scales multiplied in, listed in `ignore`, and vLLM
  runs its unquantized fused MoE for it; this class never sees them. Where lazyxform cannot
  dequantize the experts' format (only INT4 AWQ experts are densified), loading stops here with a
  typed error naming the layer.

A run-time scale on the experts' down_proj (its input lives inside the fused kernel) is refused when
the method is chosen; lazyxform folds it into up_proj's rows wherever the format allows (INT4, INT8).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from lazyxform import UnsupportedAlgoError
from lazyxform.emulate import experts_unlike_the_first, load_expert_input_scale, mix_in, require_expert_input_scales

PARAM = "w13_pre_quant_scale"


def scale_experts_input(method: FusedMoEMethodBase, layer: Any, scaled: list[str]) -> FusedMoEMethodBase:
    """`method`, made to apply the gate/up pre_quant_scale of the checkpoint modules `scaled` (under
    the layer's prefix). The method keeps its class name: vLLM's expert weight loader dispatches on it
    (RoutedExperts.weight_loader reads `quant_method.__class__.__name__`)."""
    leaves = {name.rsplit(".", 1)[1] for name in scaled}
    if layer.ckpt_down_proj_name in leaves:
        raise UnsupportedAlgoError(
            f"{layer.layer_name}: the experts' {layer.ckpt_down_proj_name}.pre_quant_scale scales an input inside "
            "the fused-MoE kernel; lazyxform folds it into the up projection's rows only where the format's "
            "weight scales are per row (INT4, INT8), and this checkpoint's are not"
        )
    method.__class__ = mix_in(ExpertsInputScale, type(method))
    return method


# A FusedMoEMethodBase itself, so that the combined class has the instance layout of the method
# (CPython refuses the __class__ assignment from a plain mixin).
class ExpertsInputScale(FusedMoEMethodBase):
    """Mixed in front of a FusedMoEMethodBase class by scale_experts_input (see the module docstring).
    A method whose apply scales each expert's tokens by layer.w13_pre_quant_scale[e] says so with a
    class attribute `scales_each_experts_input = True`."""

    def create_weights(
        self,
        layer: Any,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs)
        # NaN until loaded: an expert whose scale never arrives is caught after loading.
        scale = torch.nn.Parameter(torch.full((num_experts, hidden_size), torch.nan, dtype=params_dtype), requires_grad=False)
        layer.register_parameter(PARAM, scale)
        set_weight_attrs(scale, {"weight_loader": functools.partial(load_expert_scale, layer)})

    def process_weights_after_loading(self, layer: Any) -> None:
        scales = layer.w13_pre_quant_scale.data
        require_expert_input_scales(scales, layer.layer_name)
        differ = experts_unlike_the_first(scales)
        if not differ:
            layer.experts_input_scale = scales[0].clone()
            delattr(layer, PARAM)
        elif not getattr(self, "scales_each_experts_input", False):
            raise UnsupportedAlgoError(
                f"{layer.layer_name}: the experts' gate/up pre_quant_scale differs between experts (0 vs {differ}); "
                f"{type(self).__name__} runs every expert on one input and has no per-expert input scale. lazyxform's "
                "portable CPU kernel computes this layer (vLLM on a CPU), and lazyxform streams such experts dense "
                "for other kernels only where it can dequantize their format (INT4 AWQ)"
            )
        super().process_weights_after_loading(layer)

    def apply(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # After routing (the runner selected the experts from the unscaled input); the shared
        # experts get their own input, shared_experts_input, untouched.
        scale = getattr(layer, "experts_input_scale", None)
        return super().apply(layer, x if scale is None else x * scale, *args, **kwargs)

    def apply_monolithic(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Monolithic kernels route from router_logits, computed before this call from the unscaled input.
        scale = getattr(layer, "experts_input_scale", None)
        return super().apply_monolithic(layer, x if scale is None else x * scale, *args, **kwargs)


def load_expert_scale(
    layer: Any,
    param: torch.nn.Parameter,
    loaded_weight: torch.Tensor,
    weight_name: str,
    shard_id: str,
    expert_id: int,
    return_success: bool = False,
) -> bool | None:
    """vLLM's expert weight loader for w13_pre_quant_scale: this rank's experts' gate (w1) and up (w3) scales."""
    local = layer._map_global_expert_id_to_local_expert_id(expert_id)
    if local == -1:  # another rank's expert under expert parallelism
        return False if return_success else None
    load_expert_input_scale(param.data, local, loaded_weight, layer.layer_name, expert_id)
    return True if return_success else None
