"""A dense reference of a ModelOpt checkpoint's function, for the vLLM tests.

Built from ModelOpt 0.47's export formulas only (the dequantization of its HF export,
shared/docs/modelopt-export-format.md, "the doc" below), read straight from the safetensors files:
no lazyxform, no vLLM. Every quantized Linear gets its dequantized weight (the shared decoders of
tests/reference.py), `pre_quant_scale` multiplies its input (a forward
pre-hook), and, for activation-quantized algos, its input is fake-quantized as ModelOpt's input
quantizer does at inference of the fake-quantized model. A quantized KV cache (FP8 or NVFP4) is
fake-quantized with the exported k/v scales. The model itself is transformers' own implementation
of the architecture in config.json, computed in `dtype` (float32 by default).

Where ModelOpt's fake quant and the export disagree, the export wins: static scales are the
exported `input_scale` / `k_scale` / `v_scale` (x / scale, rounded, times scale), not the amax
they were computed from.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from reference import SVD_A, SVD_B, WEIGHT_SCALES, load_tensors, modelopt_weight, quantized_modules
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import eager_mask

FP8_MAX = 448.0
E2M1_MAX = 6.0
INT8_MAX = 127.0
# E2M1 magnitudes and the midpoints between them (ModelOpt's e2m1_values / e2m1_bounds).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
ActQuant = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# Tensors a quantized module exports besides its weight; none of them is a transformers parameter.
QUANT_SUFFIXES = (*WEIGHT_SCALES, "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale", SVD_A, SVD_B)

# Mixtral checkpoints name what transformers' Mixtral calls mlp.gate and mlp.experts.*.{gate,up,down}_proj.
MIXTRAL_NAMES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def transformers_name(name: str) -> str:
    for checkpoint_part, module_part in MIXTRAL_NAMES.items():
        name = name.replace(checkpoint_part, module_part)
    return name


def mtp_layers(config: dict) -> tuple[str, ...]:
    """Name prefixes of the multi-token-prediction layers (DeepSeek-V3's layout: the decoder layers
    after the last one, `num_nextn_predict_layers` of them): a speculative draft's weights, which
    transformers does not build and vLLM's main model skips."""
    first = config["num_hidden_layers"]
    return tuple(f"model.layers.{i}." for i in range(first, first + (config.get("num_nextn_predict_layers") or 0)))


def read_algos(ckpt: Path) -> tuple[str, str | None]:
    """(quant_algo, kv_cache_quant_algo), upper-cased: ModelOpt writes some raw internal names
    in lower case ("fp8_pb_wo", "mxfp4"; doc section 6, item 7)."""
    q = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    kv = q.get("kv_cache_quant_algo")
    return q["quant_algo"].upper(), kv.upper() if kv else None


def module_algos(ckpt: Path, modules: list[str]) -> dict[str, str]:
    """Each quantized module's algo: the checkpoint's, or, for MIXED_PRECISION, the module's own
    entry in `quantized_layers` (doc section 4, "Excluded layers")."""
    q = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    if q["quant_algo"].upper() != "MIXED_PRECISION":
        return {m: q["quant_algo"].upper() for m in modules}
    layers = {transformers_name(k): v for k, v in q["quantized_layers"].items()}
    return {m: layers[m]["quant_algo"].upper() for m in modules}


def dequantize(algo: str, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """The module's W in float32 (doc sections 3-4). NVFP4_SVD: W_res + B @ A, the whole weight."""
    return modelopt_weight(algo, tensors, module).float()


# --- ModelOpt's quantizers, as functions of (x, exported scale) ----------------------------------
# Each computes in float32 and returns x's dtype, as ModelOpt's fake-quant ops do.


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to E4M3, to nearest even, saturating at 448 (as CUDA's __nv_fp8_e4m3 and
    Triton's satfinite conversion do; torch's own cast would give NaN above the range)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """Round |x| to the nearest E2M1 magnitude, ties to the even code, saturating at 6
    (ModelOpt's round_to_even over e2m1_table_bounds; fp4_round_magnitude in its Triton kernel)."""
    bounds = E2M1_BOUNDS.to(magnitude.device)
    down = torch.bucketize(magnitude, bounds)  # a tie goes to the lower value
    up = torch.bucketize(magnitude, bounds, right=True)  # a tie goes to the upper value
    index = torch.where(down % 2 == 1, up, down)  # tie on bound i: lower value when i is even
    return E2M1_VALUES.to(magnitude.device)[index]


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 per-tensor with a static exported scale: fp8(x / scale) * scale."""
    s = scale.float()
    return (fp8_e4m3(x.float() / s) * s).to(x.dtype)


def fp8_with_amax(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's FP8 fake quant from an amax (tensor_quant._fp8_eager): scale = 448 / amax; an
    amax <= 2^-24 counts as 1."""
    amax = amax.float()
    scale = FP8_MAX / torch.where(amax <= 2.0**-24, torch.ones_like(amax), amax)
    return (fp8_e4m3(x.float() * scale) * (1 / scale)).to(x.dtype)


def fp8_per_token(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """FP8_PER_CHANNEL_PER_TOKEN's input quantizer: block_sizes {-1: None}, dynamic, i.e. one amax
    per token over the hidden dimension, computed on the fly."""
    return fp8_with_amax(x, x.abs().amax(dim=-1, keepdim=True))


def fp8_per_tensor_dynamic(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """An FP8 per-tensor quantizer never calibrated (W4A8_MXFP4_FP8: algorithm None): ModelOpt
    takes the amax of the whole input of each call (TensorQuantizer._get_amax, reduce over all axes)."""
    return fp8_with_amax(x, x.abs().amax())


def fp8_group128(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """Not a ModelOpt input quantizer: FP8 dynamic per token-group of 128, what vLLM runs for
    FP8_PB_WO (whose ModelOpt input quantizer is disabled); for `activation="fp8_group128"`."""
    groups = x.reshape(*x.shape[:-1], -1, 128)
    return fp8_with_amax(groups, groups.abs().amax(dim=-1, keepdim=True)).reshape(x.shape)


def int8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT8 per-tensor static: round-half-even(x / scale) clamped to [-128, 127] (narrow_range is
    False by default), times scale; a zero scale (amax 0) gives zeros."""
    s = scale.float()
    if float(s) == 0:
        return torch.zeros_like(x)
    return ((x.float() / s).round().clamp(-INT8_MAX - 1, INT8_MAX) * s).to(x.dtype)


def nvfp4_block(x: torch.Tensor, global_scale: torch.Tensor, block: int = 16) -> torch.Tensor:
    """NVFP4 fake quant with a static global scale and dynamic per-block E4M3 scales, as ModelOpt's
    Triton kernel fp4_fake_quant_block / fp8_quantize_scale does it: block scale
    fp8(min(block_amax / (6 * gs), 448)) * gs, replaced by 1 when below 1e-5; values rounded to E2M1."""
    v = x.float().reshape(-1, block)
    gs = global_scale.float()
    gs = torch.where(gs > 0, gs, torch.full_like(gs, 1e-12))
    block_amax = v.abs().amax(dim=-1, keepdim=True)
    scale = fp8_e4m3(torch.clamp(block_amax / (E2M1_MAX * gs), max=FP8_MAX)) * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    q = e2m1(v.abs() / scale) * scale
    return torch.where(v >= 0, q, -q).reshape(x.shape).to(x.dtype)


def nvfp4_input(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 (W4A4) input quantizer: the exported input_scale = amax / (6 * 448) is exactly the
    kernel's global scale (same float32 division)."""
    return nvfp4_block(x, input_scale)


def mx_block(x: torch.Tensor, element_max: float, cast: Callable[[torch.Tensor], torch.Tensor], block: int = 32) -> torch.Tensor:
    """MX fake quant (ModelOpt's CUDA fused_amax_convert, compute_scale_e8m0_NV): per block of 32,
    unscale = 2^ceil(log2(fp32(block_amax / element_max))), 1 for a zero block; |x| / unscale cast to
    the element format."""
    v = x.float().reshape(-1, block)
    amax = v.abs().amax(dim=-1, keepdim=True)
    mantissa, exponent = torch.frexp(amax / element_max)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # a power of two is its own ceil
    unscale = torch.where((amax == 0) | ~torch.isfinite(amax), 1.0, torch.ldexp(torch.ones_like(amax), exponent))
    q = cast(v.abs() / unscale) * unscale
    return torch.where(v >= 0, q, -q).reshape(x.shape).to(x.dtype)


def mxfp8(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return mx_block(x, FP8_MAX, fp8_e4m3)


def mxfp4(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return mx_block(x, E2M1_MAX, e2m1)


# Named input quantizers; the ones in STATIC read the module's exported input_scale.
ACTIVATIONS: dict[str, ActQuant] = {
    "fp8_tensor": fp8_round,
    "fp8_token": fp8_per_token,
    "fp8_tensor_dynamic": fp8_per_tensor_dynamic,
    "fp8_group128": fp8_group128,
    "int8_tensor": int8_round,
    "nvfp4": nvfp4_input,
    "mxfp8": mxfp8,
    "mxfp4": mxfp4,
}
STATIC = {"fp8_tensor", "int8_tensor", "nvfp4"}
# ModelOpt's input quantizer per algo (the *_CFG presets of modelopt 0.47: the `*input_quantizer`
# entry, and `algorithm`, which decides whether an amax was calibrated). None: weight-only.
ALGO_ACTIVATION: dict[str, str | None] = {
    "FP8": "fp8_tensor",  # FP8_DEFAULT_CFG: e4m3, axis None, max calibration
    "FP8_PER_CHANNEL_PER_TOKEN": "fp8_token",  # e4m3, block_sizes {-1: None}, type dynamic
    "FP8_PB_WO": None,  # FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG: input quantizer disabled
    "FP8_PB_REAL": None,  # the same config, exported after mtq.compress
    "FP8_BLOCK_SCALES": None,  # TensorRT-LLM's name for FP8_PB_WO's weight-only blocks
    "W8A8_SQ_PER_CHANNEL": "int8_tensor",  # INT8_DEFAULT / INT8_SMOOTHQUANT: 8 bits, axis None
    "W8A16": None,
    "W4A16_AWQ": None,  # INT4_AWQ_CFG, INT4_BLOCKWISE_WEIGHT_ONLY_CFG
    "W4A8_AWQ": "fp8_tensor",  # W4A8_AWQ_BETA_CFG: e4m3 per tensor, awq_lite calibrates its amax
    "NVFP4": "nvfp4",  # e2m1, block 16 dynamic, e4m3 scales; the static amax is the global scale
    "NVFP4_AWQ": "nvfp4",
    "NVFP4_SVD": "nvfp4",
    "W4A16_NVFP4": None,
    "W4A8_NVFP4_FP8": "fp8_tensor",  # e4m3 per tensor, max calibration
    "MXFP8": "mxfp8",  # e4m3, block 32 dynamic, e8m0 scales
    "MXFP4": "mxfp4",  # e2m1, block 32 dynamic, e8m0 scales
    "W4A8_MXFP4_FP8": "fp8_tensor_dynamic",  # e4m3 per tensor, algorithm None: never calibrated
}


def cutlass_w4a8_weight(w: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """A W4A8_AWQ weight (q * weight_scale, float32) as vLLM's CUTLASS W4A8 kernel computes with it
    (CutlassW4A8LinearKernel and convert_bf16_scales_to_fp8, vLLM 0.26; docs/recipes.md, W4A8_AWQ):
    the group scales, held in the model dtype, become chan * fp8(fp8(s / chan) / 8) with chan =
    rowmax / 448 per output row, and the kernel rounds each q * fp8 scale to FP8 before the matrix
    product, then multiplies by 8 * chan. Not ModelOpt's function: the FP8 rounding of both is the
    kernel's."""
    ws = weight_scale.float()
    group = w.shape[1] // ws.shape[1]
    q = torch.round(w / ws.repeat_interleave(group, dim=1))  # w = q * ws exactly enough to recover q
    s = ws.to(torch.bfloat16).float()
    chan = s.abs().amax(dim=1, keepdim=True) / FP8_MAX
    s8 = fp8_e4m3(fp8_e4m3(s / chan) / 8)
    return fp8_e4m3(q * s8.repeat_interleave(group, dim=1)) * chan * 8


def activation_quantizer(algo: str) -> ActQuant | None:
    """ModelOpt's input quantizer of the algo, as a function of (x, exported input_scale)."""
    name = ALGO_ACTIVATION[algo]
    return None if name is None else ACTIVATIONS[name]


def kv_quantizer(kv_algo: str, scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """ModelOpt's k/v_bmm_quantizer on K or V (after RoPE, before the GQA repeat). The export
    writes amax / 448 for both formats (doc section 4, KV cache). NVFP4: the FP4 kernel over
    16-element blocks of head_dim with the global scale amax / (6 * 448)."""
    if kv_algo == "FP8":
        return lambda t: fp8_round(t, scale)
    if kv_algo == "NVFP4":
        global_scale = (scale.float() * FP8_MAX) / (E2M1_MAX * FP8_MAX)
        return lambda t: nvfp4_block(t, global_scale)
    raise NotImplementedError(kv_algo)


def _kv_quantized_attention(module: nn.Module, query, key, value, *args, **kwargs):
    """transformers' eager attention of the module's architecture, K and V fake-quantized with the
    quantizers stored on the attention module (so several References can coexist)."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    quant_k, quant_v = module.reference_kv_quantizers
    return eager(module, query, quant_k(key), quant_v(value), *args, **kwargs)


transformers.AttentionInterface.register("modelopt_kv_reference", _kv_quantized_attention)
# The causal mask eager attention takes: transformers builds the mask by the name of the attention
# implementation and, for a name it has no mask function for, builds none (every position would
# then attend to the whole prompt).
transformers.AttentionMaskInterface.register("modelopt_kv_reference", eager_mask)


class Reference:
    """The function a ModelOpt checkpoint encodes, computed in `dtype`. `logprobs(ids)`: [len, vocab]
    float32, row i the distribution of token i + 1.

    `activation` names an entry of ACTIVATIONS to use on every quantized Linear instead of
    ModelOpt's own input quantizer of the algo, for an engine that quantizes otherwise (e.g.
    "fp8_token": vLLM's W4A8_AWQ and W4A8_MXFP4_FP8 schemes quantize per token, dynamically).
    `cutlass_w4a8`: W4A8_AWQ weights as vLLM's Hopper CUTLASS W4A8 kernel holds them
    (cutlass_w4a8_weight)."""

    def __init__(
        self,
        ckpt: Path,
        *,
        dtype: torch.dtype = torch.float32,
        pre_quant_scale: bool = True,
        quantize_activations: bool = True,
        quantize_kv_cache: bool = True,
        activation: str | None = None,
        cutlass_w4a8: bool = False,
    ) -> None:
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        ckpt = Path(ckpt)
        _, kv_algo = read_algos(ckpt)
        config_dict = json.loads((ckpt / "config.json").read_text())
        self.mtp = mtp_layers(config_dict)  # not the main model's: left out
        tensors = {transformers_name(k): v for k, v in load_tensors(ckpt).items() if not k.startswith(self.mtp)}
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        config._attn_implementation = "eager"
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        modules = quantized_modules(tensors)
        self.algos = algos = module_algos(ckpt, modules)  # quantized module (transformers name) -> algo
        quantized = {f"{m}.weight" for m in modules} | {k for k in tensors if k.endswith(QUANT_SUFFIXES)}
        dense = {k: v.to(dtype) for k, v in tensors.items() if k not in quantized}
        experts: dict[str, dict[int, dict[str, torch.Tensor | None]]] = {}
        expert_act: dict[str, ActQuant | None] = {}
        low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks: dict[str, tuple[torch.Tensor | None, ActQuant | None, torch.Tensor | None]] = {}
        for m in modules:
            algo = algos[m]
            act = None
            if quantize_activations:
                name = activation if activation is not None else ALGO_ACTIVATION[algo]
                act = None if name is None else ACTIVATIONS[name]
                if name in STATIC and f"{m}.input_scale" not in tensors:
                    raise ValueError(f"{m}: the {name} input quantizer needs an exported input_scale")
            pqs = tensors.get(f"{m}.pre_quant_scale") if pre_quant_scale else None
            scale = tensors.get(f"{m}.input_scale")
            if algo == "NVFP4_SVD":
                # SVDQuantLinear: y = input_quantizer(x') @ W_res^T + (x' @ A^T) @ B^T, x' = x * pqs.
                w = modelopt_weight("NVFP4", tensors, m).to(dtype)
                low_rank[m] = (tensors[f"{m}.{SVD_A}"].to(dtype), tensors[f"{m}.{SVD_B}"].to(dtype))
            elif algo == "W4A8_AWQ" and cutlass_w4a8:
                w = cutlass_w4a8_weight(dequantize(algo, tensors, m), tensors[f"{m}.weight_scale"]).to(dtype)
            else:
                w = dequantize(algo, tensors, m).to(dtype)
            if ".experts." in m:
                block, e, proj = m.rsplit(".", 3)[0], int(m.rsplit(".", 2)[1]), m.rsplit(".", 1)[1]
                if m in low_rank:
                    raise NotImplementedError(f"{m}: expert low-rank term")
                experts.setdefault(block, {}).setdefault(e, {})[proj] = w
                experts[block][e][proj + ".input_scale"] = scale
                experts[block][e][proj + ".pre_quant_scale"] = None if pqs is None else pqs.to(dtype)
                expert_act[block] = act
                continue
            dense[f"{m}.weight"] = w
            hooks[m] = (None if pqs is None else pqs.to(dtype), act, scale)
        missing, unexpected = self.model.load_state_dict(dense, strict=False)
        # Experts are replaced below; a tied lm_head (Gemma 3) is the embedding, which was loaded.
        tied = getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False)
        missing = [k for k in missing if ".experts." not in k and not (tied and k == "lm_head.weight")]
        assert not missing and not unexpected, (missing, unexpected)
        for m, (pqs, act, scale) in hooks.items():
            self._hook(m, pqs, act, scale, low_rank.get(m))
        for block, by_expert in experts.items():
            parent = self.model.get_submodule(block)
            parent.experts = Experts([by_expert[e] for e in sorted(by_expert)], parent.experts.act_fn, expert_act[block])
        if kv_algo is not None and quantize_kv_cache:
            self._quantize_kv_cache(kv_algo, tensors)

    def _hook(
        self,
        m: str,
        pqs: torch.Tensor | None,
        act: ActQuant | None,
        scale: torch.Tensor | None,
        low_rank: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """pre_quant_scale, then the input quantizer, in front of the module (ModelOpt's
        TensorQuantizer.forward multiplies by pre_quant_scale before quantizing)."""
        linear = self.model.get_submodule(m)
        outer = linear
        if low_rank is not None:
            outer = LowRank(linear, *low_rank)
            parent, leaf = m.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), leaf, outer)
        if pqs is not None:
            outer.register_forward_pre_hook(lambda module, args: (args[0] * pqs,))
        if act is not None:
            linear.register_forward_pre_hook(lambda module, args: (act(args[0], scale),))

    def _quantize_kv_cache(self, kv_algo: str, tensors: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            attn.reference_kv_quantizers = (
                kv_quantizer(kv_algo, tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"]),
                kv_quantizer(kv_algo, tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"]),
            )
        self.model.set_attn_implementation("modelopt_kv_reference")

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)


class LowRank(nn.Module):
    """An NVFP4_SVD Linear: the residual NVFP4 Linear (which carries the input quantizer) plus the
    low-rank term on the unquantized input, as ModelOpt's SVDQuantLinear.forward computes it."""

    def __init__(self, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.a = a  # [rank, in]
        self.b = b  # [out, rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + F.linear(F.linear(x, self.a), self.b)


class Experts(nn.Module):
    """Stands in for transformers' fused experts module (same call): each expert is
    down(act(gate(x)) * up(x)), with the projection's own pre_quant_scale (AWQ exports of experts
    built as nn.Linear give each expert its own) and then ModelOpt's input quantizer before each
    projection. One input quantizer per projection type serves every expert of a layer (doc
    section 3, MoE), so expert 0's input_scale is everyone's."""

    def __init__(self, experts: list[dict[str, torch.Tensor | None]], act_fn: nn.Module, act: ActQuant | None) -> None:
        super().__init__()
        self.experts = experts
        self.act_fn = act_fn
        self.act = act

    def _input(self, x: torch.Tensor, e: int, proj: str) -> torch.Tensor:
        pqs = self.experts[e][proj + ".pre_quant_scale"]
        x = x if pqs is None else x * pqs
        return x if self.act is None else self.act(x, self.experts[0][proj + ".input_scale"])

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, w in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            x = hidden[token]
            gate = self._input(x, e, "gate_proj") @ w["gate_proj"].T
            up = self._input(x, e, "up_proj") @ w["up_proj"].T
            y = self._input(self.act_fn(gate) * up, e, "down_proj") @ w["down_proj"].T
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


@dataclass(frozen=True)
class BoundCase:
    """An engine test's fixture: the reference its logprobs are compared with, the bound they must stay
    `within`, and the errors that bound must be shown to catch. Each engine's Case adds its options."""

    bound: float = 2.0
    wrong_scale: float = 1.25  # one module's weight times this must fall outside the bound
    # That module: layer 0's down_proj or o_proj, which feed the residual stream directly, unless named.
    wrong_module: str | None = None
    reference: dict = field(default_factory=dict)  # Reference options: the target's documented function
    # Whether losing the pre_quant_scales the engine applies at run time moves logprobs past the bound
    # (it does except where noted).
    lost_pre_quant_scale_seen: bool = True


def within(err: torch.Tensor, noise: torch.Tensor, factor: float) -> bool:
    """The engine tests' bound: max and mean deviation each within `factor` x the reference's noise."""
    return bool(err.max() <= factor * noise.max() and err.mean() <= factor * noise.mean())


def deviation(ckpt: Path, ids: list[list[int]], got: torch.Tensor, options: dict, bound: float) -> dict:
    """An engine's prompt logprobs (rows of all prompts stacked, as both engines' harnesses record
    them) against this reference with `options`: |got - reference| and the reference's own bf16
    noise, max and mean, and whether got is `within` bound (the GPU harnesses' report)."""

    def logprobs(**extra) -> torch.Tensor:
        ref = Reference(ckpt, **{**options, **extra})
        return torch.cat([ref.logprobs(p)[:-1] for p in ids])

    want = logprobs()
    noise = (logprobs(dtype=torch.bfloat16) - want).abs()
    err = (got - want).abs()
    return {
        "reference": options,
        "max": float(err.max()),
        "mean": float(err.mean()),
        "noise_max": float(noise.max()),
        "noise_mean": float(noise.mean()),
        "bound": bound,
        "within": within(err, noise, bound),
    }


def dense_twin(ckpt: Path, dst: Path) -> Path:
    """The function `ckpt` encodes as a plain bf16 checkpoint (no quantization config): each quantized
    weight decoded by the reference's ModelOpt formulas, its pre_quant_scale multiplied into its
    columns; everything else as exported. What an engine computes for it is vLLM's own deviation from the
    reference on this architecture, with no quantization and no lazyxform involved."""
    tensors = load_tensors(ckpt)
    modules = quantized_modules(tensors)
    algos = module_algos(ckpt, modules)
    dense = {}
    for m in modules:
        w = dequantize(algos[m], tensors, m).float()
        pqs = tensors.get(f"{m}.pre_quant_scale")
        dense[f"{m}.weight"] = (w if pqs is None else w * pqs.float()[None, :]).to(torch.bfloat16)
    quantized = {k for m in modules for k in tensors if k.startswith(f"{m}.") and k != f"{m}.bias"}
    dense |= {k: v for k, v in tensors.items() if k not in quantized and k not in dense}
    dst.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors" and f.name != "hf_quant_config.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in dense.items()}, str(dst / "model.safetensors"))
    return dst
