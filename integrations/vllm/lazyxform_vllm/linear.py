"""Run-time terms of a quantized Linear that the rewritten weight stream cannot express.

`PreQuantScaleLinearMethod` wraps the compressed-tensors linear method of a layer and scales
its input: y = (x * pre_quant_scale) @ W^T, ModelOpt's AWQ / SmoothQuant formula, for the
modules lazyxform could not fold the scale into (ck.plan.runtime_pre_quant_scale). Another
run-time term (NVFP4_SVD's low-rank x @ A^T @ B^T) is a sibling wrapper of the same shape: its
own parameters registered in create_weights, its term added in apply.
"""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.utils import set_weight_attrs

from lazyxform import InconsistentScalesError, MissingTensorError

PRE_QUANT_SCALE = "pre_quant_scale"


# The layer hands vLLM-parameter loaders to the inner method only when the method's class is
# registered as supporting them (linear.py, WEIGHT_LOADER_V2_SUPPORTED).
@register_weight_loader_v2_supported_method
class PreQuantScaleLinearMethod(LinearMethodBase):
    def __init__(self, inner: LinearMethodBase) -> None:
        self.inner = inner

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
        self.inner.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        # NaN until loaded: a scale that never arrives is caught after loading, not run as garbage.
        scale = torch.nn.Parameter(
            torch.full((input_size_per_partition,), torch.nan, dtype=params_dtype), requires_grad=False
        )
        layer.register_parameter(PRE_QUANT_SCALE, scale)
        set_weight_attrs(scale, {"weight_loader": functools.partial(load_pre_quant_scale, layer)})
        # vLLM may fuse the producer of this layer's input with its input quantization
        # (fusion/fused_act_quant.py); the scale must come first, so the layer takes plain input.
        layer.requires_unquantized_input = True

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if torch.isnan(layer.pre_quant_scale).any():
            raise MissingTensorError(f"{layer.prefix}: the checkpoint stream carried no {PRE_QUANT_SCALE} for it")
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.apply(layer, x * layer.pre_quant_scale, bias)


def load_pre_quant_scale(
    layer: torch.nn.Module, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
) -> None:
    """Loads a [in] scale. Under tensor parallelism a row-parallel layer holds one slice of the
    input; the members of a fused layer (q/k/v, gate/up) read one input, so their scales must be
    identical (ModelOpt exports them so) and are loaded once."""
    size = param.shape[0]
    if loaded.shape[0] != size:
        loaded = loaded.narrow(0, layer.tp_rank * size, size)
    loaded = loaded.to(device=param.device, dtype=param.dtype)
    if torch.isnan(param).all():
        param.copy_(loaded)
    elif not torch.equal(param, loaded):
        raise InconsistentScalesError(
            f"{layer.prefix}: the {PRE_QUANT_SCALE} of fused member {shard_id} differs from the one already loaded for "
            f"another member (max abs diff {float((param.float() - loaded.float()).abs().max()):.3g}); members of one "
            "fused GEMM share their input and need one scale"
        )
