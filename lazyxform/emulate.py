"""Compressed-tensors layers computed in plain PyTorch, engine-neutral: the parameters a layer of a
scheme holds (a linear layer's, or a fused-MoE layer's stacked per expert), their exact float32
decoding, the scheme's input quantizer, and the linear and routed-experts computations.

The engine integrations' portable CPU kernels (lazyxform_vllm.portable, lazyxform_sglang.schemes)
build on this: the engine's loaders fill the compressed-tensors tensors, `decode` turns them into
the real weight they encode (values times scales, the NVFP4 global scale divided first, so nothing
is rounded), and `quantize_input` fake-quantizes activations as the scheme prescribes (static or
dynamic; per tensor, token, group or block; NVFP4 and MX blocks as compressed-tensors computes
them) before a float32 GEMM. Nothing here imports an engine; the engines' fused-MoE layers share
the few conventions used (`w13_`/`w2_` parameter names, a scale's kind in `quant_method`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from .errors import InconsistentScalesError, MissingTensorError, TensorMismatchError
from .recipes.base import describe_args

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
# E2M1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
E2M1_MAGNITUDES = E2M1[:8]
MX_ELEMENT_EXPONENT = {4: 2, 8: 8}  # floor(log2(max)) of E2M1 (6) and E4M3 (448), as compressed-tensors


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group as a layer sees it: storage format, weight and input args."""

    format: str
    weights: QuantizationArgs
    activations: QuantizationArgs | None

    @classmethod
    def of(cls, scheme_dict: dict[str, Any] | None) -> Scheme | None:
        """From an engine's per-layer scheme dict ({format, weights, input_activations}); None when unquantized."""
        if not scheme_dict or scheme_dict.get("weights") is None:
            return None
        return cls(str(scheme_dict["format"]), scheme_dict["weights"], scheme_dict.get("input_activations"))

    def __str__(self) -> str:  # as `lazyxform inspect` describes a target
        acts = describe_args(self.activations) if self.activations else "none"
        return f"{self.format}: W {describe_args(self.weights)}, A {acts}"


# The (layer kind, scheme) pairs this process has logged: an engine builds a model's layers one by
# one, and says once per kind and scheme that the portable kernel runs them.
ANNOUNCED: set[tuple[str, str]] = set()


def announce_once(log: logging.Logger, kind: str, scheme: Scheme, message: str, *args: object) -> None:
    """Log `message % args` for this process's first `kind` layer ("linear", "fused-MoE") of `scheme`."""
    if (kind, str(scheme)) not in ANNOUNCED:
        ANNOUNCED.add((kind, str(scheme)))
        log.info(message, *args)


# --- parameters: what a layer of the scheme holds, for the engine's parameter classes ----------------

# How an engine loads a tensor: a [O, I] matrix ("matrix"; "packed" when packed along I), scales per
# output row ("channel"), per input group ("group"), per 2-D block ("block"), one per fused member
# ("tensor"), or a tensor loaded whole ("base").
Kind = Literal["matrix", "packed", "channel", "group", "block", "tensor", "base"]
Param = tuple[Kind, torch.Tensor, dict[str, Any]]
# The class that loads each kind, by its name in vLLM's vllm.model_executor.parameter and in SGLang's
# copy of that module, sglang.srt.layers.parameter (the classes their compressed-tensors schemes
# declare, whose loaders shard fused and tensor-parallel layers).
PARAMETER_CLASS_NAME: dict[Kind, str] = {
    "matrix": "ModelWeightParameter",
    "packed": "PackedvLLMParameter",
    "channel": "ChannelQuantScaleParameter",
    "group": "GroupQuantScaleParameter",
    "block": "BlockQuantScaleParameter",
    "tensor": "PerTensorScaleParameter",
    "base": "BasevLLMParameter",
}
ParameterClass = Callable[..., torch.nn.Parameter]


def parameter_classes(module: ModuleType) -> dict[Kind, ParameterClass]:
    """The engine's class for each kind, from its parameter module (vLLM's or SGLang's)."""
    return {kind: getattr(module, name) for kind, name in PARAMETER_CLASS_NAME.items()}


def layout(scheme: Scheme, out_sizes: list[int], in_size: int, params_dtype: torch.dtype) -> dict[str, Param]:
    """name -> (kind, empty data, loader arguments) for one (possibly fused) layer whose members have
    `out_sizes` output rows and `in_size` inputs on this rank: the tensors compressed-tensors stores."""
    w, a, out = scheme.weights, scheme.activations, sum(out_sizes)
    rows = {"output_dim": 0}
    matrix = {"output_dim": 0, "input_dim": 1}
    shards = len(out_sizes)
    params: dict[str, Param] = {}
    if scheme.format == "pack-quantized":
        factor = 32 // w.num_bits
        packed = {**matrix, "packed_dim": 1, "packed_factor": factor}
        params["weight_packed"] = ("packed", torch.empty(out, in_size // factor, dtype=torch.int32), packed)
        params["weight_shape"] = ("base", torch.empty(2, dtype=torch.int64), {})
    elif scheme.format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        params["weight_packed"] = ("matrix", torch.empty(out, in_size // 2, dtype=torch.uint8), matrix)
    else:
        dtype = torch.int8 if w.type == "int" else FP8
        params["weight"] = ("matrix", torch.empty(out, in_size, dtype=dtype), matrix)
    if scheme.format == "nvfp4-pack-quantized":
        params["weight_scale"] = ("group", torch.empty(out, in_size // w.group_size, dtype=FP8), matrix)
        params["weight_global_scale"] = ("tensor", torch.empty(shards, dtype=torch.float32), {})
        if a is not None:
            params["input_global_scale"] = ("tensor", torch.empty(shards, dtype=torch.float32), {})
        return params
    if scheme.format in ("mxfp4-pack-quantized", "mxfp8-quantized"):
        params["weight_scale"] = ("group", torch.empty(out, in_size // 32, dtype=torch.uint8), matrix)
    else:
        scale_dtype = params_dtype if scheme.format == "pack-quantized" else torch.float32
        if w.strategy == QuantizationStrategy.TENSOR:
            params["weight_scale"] = ("tensor", torch.empty(shards, dtype=scale_dtype), {})
        elif w.strategy == QuantizationStrategy.CHANNEL:
            params["weight_scale"] = ("channel", torch.empty(out, 1, dtype=scale_dtype), rows)
        elif w.strategy == QuantizationStrategy.GROUP:
            params["weight_scale"] = ("group", torch.empty(out, in_size // w.group_size, dtype=scale_dtype), matrix)
        elif w.strategy == QuantizationStrategy.BLOCK:
            bo, bi = w.block_structure
            params["weight_scale"] = ("block", torch.empty(-(-out // bo), -(-in_size // bi), dtype=scale_dtype), matrix)
        else:
            raise NotImplementedError(f"portable kernel: weight strategy {w.strategy} of {scheme}")
    if a is not None and not a.dynamic:
        params["input_scale"] = ("tensor", torch.empty(shards, dtype=torch.float32), {})
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


def register_layout(
    layer: torch.nn.Module,
    scheme: Scheme,
    out_sizes: list[int],
    in_size: int,
    params_dtype: torch.dtype,
    parameter_class: dict[Kind, ParameterClass],
    weight_loader: Callable[..., None],
) -> None:
    """Register a (possibly fused) layer's compressed-tensors tensors (`layout`), each as the engine's
    `parameter_class` of its kind (`parameter_classes`) with the layer's `weight_loader`, so that the
    engine's loaders fill them, and note what `decode_layer` reads after loading."""
    params = layout(scheme, out_sizes, in_size, params_dtype)
    for name, (kind, data, args) in params.items():
        layer.register_parameter(name, parameter_class[kind](data=data, weight_loader=weight_loader, **args))
    layer.portable_parameters = list(params)
    layer.portable_out_sizes = list(out_sizes)


def decode_layer(scheme: Scheme, layer: torch.nn.Module) -> None:
    """After loading: the layer's compressed-tensors parameters (`portable_parameters`, of fused shards
    `portable_out_sizes`) replaced by the float32 `weight`, its input scales kept for `linear`."""
    weight, layer.portable_input_scales = decode(scheme, take(layer, layer.portable_parameters), layer.portable_out_sizes)
    layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))


def linear(scheme: Scheme, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = quantize_input(x) @ W^T (+ bias) in float32, rounded once to x's dtype."""
    y = F.linear(quantize_input(scheme, x.float(), layer.portable_input_scales), layer.weight)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --- routed experts: each expert a gate/up and a down layer of the scheme ----------------------------


# The kinds of scale a fused-MoE layer's expert loader places by the parameter's `quant_method`
# attribute (FusedMoeWeightScaleSupported, the same four values in vLLM and SGLang).
EXPERT_SCALE_KINDS = frozenset({"tensor", "channel", "group", "block"})


def register_experts(
    layer: torch.nn.Module,
    scheme: Scheme,
    num_experts: int,
    hidden: int,
    inter: int,
    params_dtype: torch.dtype,
    weight_attrs: dict[str, Any],
) -> None:
    """Register a fused-MoE layer's compressed-tensors tensors: each expert's `layout`, stacked over
    its `num_experts` local experts, for w13 (gate rows then up rows, `inter` each, over `hidden`
    inputs) and w2 (down), named `<w13|w2>_<tensor>` as the engines' expert loaders map checkpoint
    names. Each parameter carries the engine's `weight_attrs` (its expert weight loader) and, for a
    scale, its kind as `quant_method`. Notes what `decode_experts` reads."""
    layer.portable_experts = {}
    for stem, out_sizes, in_size in (("w13", [inter, inter], hidden), ("w2", [hidden], inter)):
        params = layout(scheme, out_sizes, in_size, params_dtype)
        for name, (kind, data, _) in params.items():
            # One static input scale per expert, shared by gate and up: the engines load it so.
            shape = () if name == "input_scale" else data.shape
            param = torch.nn.Parameter(data.new_empty(num_experts, *shape), requires_grad=False)
            for attr, value in {**weight_attrs, **({"quant_method": kind} if kind in EXPERT_SCALE_KINDS else {})}.items():
                setattr(param, attr, value)
            layer.register_parameter(f"{stem}_{name}", param)
        layer.portable_experts[stem] = (list(params), out_sizes)


def decode_experts(scheme: Scheme, layer: torch.nn.Module) -> None:
    """After loading: the experts' compressed-tensors parameters replaced by float32 `w13_weight` and
    `w2_weight` [experts, O, I], each expert's input scales kept for `experts`."""
    for stem, (names, out_sizes) in layer.portable_experts.items():
        tensors = take(layer, [f"{stem}_{n}" for n in names])
        count = len(tensors[f"{stem}_{names[0]}"])
        weights, scales = zip(
            *(decode(scheme, {n: tensors[f"{stem}_{n}"][e] for n in names}, out_sizes) for e in range(count)), strict=True
        )
        layer.register_parameter(f"{stem}_weight", torch.nn.Parameter(torch.stack(weights), requires_grad=False))
        setattr(layer, f"portable_{stem}_input_scales", list(scales))


def experts(
    scheme: Scheme,
    layer: torch.nn.Module,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    pre_quant_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed SiLU experts after `decode_experts`: each token [T, H] through its experts (topk_ids
    [T, k], local ids; a negative id routes to none), the scheme's input quantizer before both
    projections, SiLU(gate) * up between them, weighted by topk_weights; float32, rounded once to x's
    dtype. `pre_quant_scale` [experts, H]: each expert's own gate/up input scale, applied first."""
    hidden = x.float()
    out = torch.zeros_like(hidden)
    for e in topk_ids.unique().tolist():
        if e < 0:
            continue
        token, slot = torch.where(topk_ids == e)
        x_e = hidden[token] if pre_quant_scale is None else hidden[token] * pre_quant_scale[e].float()
        gate_up = F.linear(quantize_input(scheme, x_e, layer.portable_w13_input_scales[e]), layer.w13_weight[e])
        gate, up = gate_up.chunk(2, dim=-1)
        down_in = quantize_input(scheme, F.silu(gate) * up, layer.portable_w2_input_scales[e])
        y = F.linear(down_in, layer.w2_weight[e])
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def load_expert_input_scale(scales: torch.Tensor, local: int, loaded: torch.Tensor, layer_name: str, expert_id: int) -> None:
    """Expert `expert_id`'s gate or up pre_quant_scale into row `local` of its MoE layer's [experts,
    hidden] scales (NaN until loaded). Gate and up read the expert's one input, so they must be equal
    (ModelOpt exports them so)."""
    if loaded.shape != scales.shape[1:]:
        raise TensorMismatchError(
            f"{layer_name}: expert {expert_id}'s gate/up pre_quant_scale has shape {tuple(loaded.shape)}, expected {tuple(scales.shape[1:])}"
        )
    row = scales[local]
    loaded = loaded.to(dtype=row.dtype, device=row.device)
    if not torch.isnan(row).all() and not torch.equal(row, loaded):
        raise InconsistentScalesError(f"{layer_name}: expert {expert_id}'s gate and up pre_quant_scale differ; the two projections read one input")
    row.copy_(loaded)


def require_expert_input_scales(scales: torch.Tensor, layer_name: str) -> None:
    """After loading: every local expert of the layer got its gate/up pre_quant_scale."""
    if torch.isnan(scales).any():
        missing = sorted(set(torch.isnan(scales).any(dim=1).nonzero().flatten().tolist()))
        raise MissingTensorError(f"{layer_name}: no gate/up pre_quant_scale was loaded for local experts {missing}")


def experts_unlike_the_first(scales: torch.Tensor) -> list[int]:
    """The local experts whose gate/up pre_quant_scale differs from expert 0's: none where one scale
    serves the whole layer (ModelOpt's resmoothed MoE exports), and the engine may then scale the
    routed input once."""
    return [e for e in range(len(scales)) if not torch.equal(scales[e], scales[0])]


@functools.cache
def mix_in(mixin: type, cls: type) -> type:
    """`cls` with `mixin` in front, under cls's name and qualname: both engines' expert weight loaders
    dispatch on the class name of the method (vLLM's RoutedExperts) or scheme (SGLang's FusedMoE). The
    plugins assign it to an instance's __class__, so `mixin` derives from cls's base (the same instance
    layout)."""
    return type(cls)(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


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
    q = round_fp8(q) if a.type == "float" else round_int(q, top)
    return q * safe


def round_int(q: torch.Tensor, top: float) -> torch.Tensor:
    """Integer steps: round half to even, saturating to [-top - 1, top] (ModelOpt's integer quantizers)."""
    return q.round().clamp(-top - 1, top)
