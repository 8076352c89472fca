"""A dense reference of a ModelOpt checkpoint's function, for the vLLM tests.

Built from ModelOpt 0.47's export formulas only (the dequantization of its HF export),
read straight from the safetensors files: no lazyxform, no vLLM. Every quantized Linear gets its
dequantized weight, `pre_quant_scale` multiplies its input (a forward pre-hook), and, for
activation-quantized algos, its input is fake-quantized as ModelOpt's input quantizer does. An FP8
KV cache is fake-quantized with the exported k/v scales. The model itself is transformers' own
implementation of the architecture in config.json, computed in float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from recipe_reference import int4_values
from reference import load_tensors
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_GROUP = 128
ActQuant = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


# Mixtral checkpoints name what transformers' Mixtral calls mlp.gate and mlp.experts.*.{gate,up,down}_proj.
MIXTRAL_NAMES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def transformers_name(name: str) -> str:
    for checkpoint_part, module_part in MIXTRAL_NAMES.items():
        name = name.replace(checkpoint_part, module_part)
    return name


def read_algos(ckpt: Path) -> tuple[str, str | None]:
    q = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    return q["quant_algo"].upper(), q.get("kv_cache_quant_algo")


def dequantize(algo: str, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """W (float32) from a module's `weight` and `weight_scale`."""
    if algo == "FP8":
        return w.float() * ws.float()
    if algo in ("FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "W8A16"):
        return w.float() * ws.float()[:, None]
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        return int4_values(w).float() * ws.float().repeat_interleave(INT4_GROUP, dim=1)
    raise NotImplementedError(algo)


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def activation_quantizer(algo: str) -> ActQuant | None:
    """ModelOpt's input quantizer of the algo, as a function of (x, exported input_scale)."""
    if algo == "FP8":  # per-tensor, static
        return lambda x, s: fp8_round(x, s)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":  # per-token, dynamic
        return lambda x, _: fp8_round(x, x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX)
    if algo == "W8A8_SQ_PER_CHANNEL":  # per-tensor, static
        return lambda x, s: ((x / s).round().clamp(-INT8_MAX - 1, INT8_MAX) * s).to(x.dtype)
    return None  # weight-only


class Reference:
    """The function a ModelOpt checkpoint encodes, computed in `dtype`. `logprobs(ids)`: [len, vocab]
    float32, row i the distribution of token i + 1."""

    def __init__(
        self,
        ckpt: Path,
        *,
        dtype: torch.dtype = torch.float32,
        pre_quant_scale: bool = True,
        quantize_activations: bool = True,
        quantize_kv_cache: bool = True,
    ) -> None:
        algo, kv_algo = read_algos(ckpt)
        tensors = {transformers_name(k): v for k, v in load_tensors(ckpt).items()}
        config_dict = json.loads((ckpt / "config.json").read_text())
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        config._attn_implementation = "eager"
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        act = activation_quantizer(algo) if quantize_activations else None
        modules = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
        dense = {k: v.to(dtype) for k, v in tensors.items() if not k.startswith(tuple(m + "." for m in modules))}
        dense = {k: v for k, v in dense.items() if not k.endswith(("k_scale", "v_scale"))}
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for m in modules:
            w = dequantize(algo, tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]).to(dtype)
            pqs = tensors.get(f"{m}.pre_quant_scale") if pre_quant_scale else None
            scale = tensors.get(f"{m}.input_scale")
            if ".experts." in m:
                block, e, proj = m.rsplit(".", 2)[0].rsplit(".", 1)[0], int(m.rsplit(".", 2)[1]), m.rsplit(".", 1)[1]
                experts.setdefault(block, {}).setdefault(e, {})[proj] = w
                experts[block][e][proj + ".input_scale"] = scale
                if pqs is not None:
                    raise NotImplementedError(f"{m}: expert pre_quant_scale")
                continue
            dense[f"{m}.weight"] = w
            module = self.model.get_submodule(m)
            if pqs is not None:
                module.register_forward_pre_hook(_scale_input(pqs.to(dtype)))
            if act is not None:
                module.register_forward_pre_hook(_quantize_input(act, scale))
        for block, by_expert in experts.items():
            self._load_experts(block, by_expert, act)
        missing, unexpected = self.model.load_state_dict(dense, strict=False)
        missing = [k for k in missing if ".experts." not in k]
        assert not missing and not unexpected, (missing, unexpected)
        if kv_algo is not None and quantize_kv_cache:
            self._quantize_kv_cache(kv_algo, tensors)

    def _load_experts(self, block: str, by_expert: dict[int, dict[str, torch.Tensor]], act: ActQuant | None) -> None:
        parent = self.model.get_submodule(block)
        parent.experts = Experts([by_expert[e] for e in sorted(by_expert)], parent.experts.act_fn, act)

    def _quantize_kv_cache(self, kv_algo: str, tensors: dict[str, torch.Tensor]) -> None:
        """K and V (after RoPE) rounded to FP8 with the exported per-tensor k/v scales."""
        if kv_algo.upper() != "FP8":
            raise NotImplementedError(kv_algo)
        eager = ALL_ATTENTION_FUNCTIONS["sdpa"]
        scales = {
            i: (
                tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"],
                tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"],
            )
            for i in range(self.model.config.num_hidden_layers)
        }

        def attention(module, query, key, value, *args, **kwargs):
            k_scale, v_scale = scales[module.layer_idx]
            return eager(module, query, fp8_round(key, k_scale), fp8_round(value, v_scale), *args, **kwargs)

        transformers.AttentionInterface.register("fp8_kv_reference", attention)
        self.model.set_attn_implementation("fp8_kv_reference")

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)


def _scale_input(pqs: torch.Tensor):
    return lambda module, args: (args[0] * pqs,)


def _quantize_input(act: ActQuant, scale: torch.Tensor | None):
    return lambda module, args: (act(args[0], scale),)


class Experts(nn.Module):
    """Stands in for transformers' fused experts module (same call): each expert is
    down(act(gate(x)) * up(x)), with ModelOpt's input quantizer before each projection. One input
    quantizer per projection type serves every expert of a layer (section 3, MoE)."""

    def __init__(self, experts: list[dict[str, torch.Tensor]], act_fn: nn.Module, act: ActQuant | None) -> None:
        super().__init__()
        self.experts = experts
        self.act_fn = act_fn
        self.act = act

    def _input(self, x: torch.Tensor, proj: str) -> torch.Tensor:
        return x if self.act is None else self.act(x, self.experts[0][proj + ".input_scale"])

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, w in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            x = hidden[token]
            gate = self._input(x, "gate_proj") @ w["gate_proj"].T
            up = self._input(x, "up_proj") @ w["up_proj"].T
            y = self._input(self.act_fn(gate) * up, "down_proj") @ w["down_proj"].T
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out
