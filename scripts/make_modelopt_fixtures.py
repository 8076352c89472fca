#!/usr/bin/env python3
"""Generate tiny ModelOpt-exported HF checkpoints (test fixtures) on CPU, and inspect them.

Runs in a virtualenv of its own (ModelOpt pins transformers<5.15, which the project's vLLM does not
accept), never in the project's:

    python3 -m venv /work/venv-modelopt
    /work/venv-modelopt/bin/pip install torch==2.13.0 nvidia-modelopt==0.47.0 transformers==5.14.1 \
        accelerate safetensors requests

Usage:
    venv/bin/python scripts/make_modelopt_fixtures.py --list
    venv/bin/python scripts/make_modelopt_fixtures.py --only phi3_int4_awq   # one recipe, in-process
    venv/bin/python scripts/make_modelopt_fixtures.py --only a b c           # each in a subprocess
    venv/bin/python scripts/make_modelopt_fixtures.py --out /tmp/x ...       # default: tests/fixtures/modelopt

Adapted from the shared fixture tool (Llama / Qwen / Mixtral recipes); this copy adds Phi-3, Gemma 3
text, DeepSeek-V3 (MLA + shared/routed experts), quantized lm_head, and Qwen3-MoE with per-expert
nn.Linear experts (the transformers-4 layout, which ModelOpt 0.47's AWQ MoE export needs). Each
fixture directory gets the tokenizer files of tests/fixtures/modelopt/int4_awq (copied) and an
`inspect.json`; a fixture whose export needed an edit records it under "edits" there.

For every recipe it:
  1. builds a tiny random-init model from a config (no hub access),
  2. runs mtq.quantize(model, cfg, forward_loop) with random-token calibration,
  3. snapshots the fake-quantized weights (a) right after mtq.quantize and (b) at export time
     (after the exporter's resmoothing / amax unification, just before packing),
  4. exports with modelopt.torch.export.export_hf_checkpoint to ckpts/<recipe>/,
  5. re-reads the safetensors, dequantizes every quantized Linear with an independent
     re-implementation of the format, and records max-abs errors,
  6. writes <out>/<recipe>/inspect.json (configs, tensor table, errors) or _error.txt, and copies
     the tiny tokenizer's files next to the checkpoint.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPTS = ROOT / "tests" / "fixtures" / "modelopt"
TOKENIZER_FROM = ROOT / "tests" / "fixtures" / "modelopt" / "int4_awq"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# name -> (model arch, main cfg attr name in mtq, optional kv cfg attr name[, options])
# options: {"lm_head": True} quantizes lm_head (drops ModelOpt's "*lm_head*" disable entries);
#          {"compress": True} runs mtq.compress (real quantization) before export.
RECIPES = {
    # --- dense llama, one per recipe config ---
    "fp8": ("llama", "FP8_DEFAULT_CFG", None),
    "fp8_kv_fp8": ("llama", "FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "fp8_pc_pt": ("llama", "FP8_PER_CHANNEL_PER_TOKEN_CFG", None),
    "fp8_2d_blockwise_wo": ("llama", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None),
    "int8_default": ("llama", "INT8_DEFAULT_CFG", None),
    "int8_sq": ("llama", "INT8_SMOOTHQUANT_CFG", None),
    "int8_wo": ("llama", "INT8_WEIGHT_ONLY_CFG", None),
    "int4_awq": ("llama", "INT4_AWQ_CFG", None),
    "int4_blockwise_wo": ("llama", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None),
    "w4a8_awq": ("llama", "W4A8_AWQ_BETA_CFG", None),
    "nvfp4": ("llama", "NVFP4_DEFAULT_CFG", None),
    "nvfp4_kv_fp8": ("llama", "NVFP4_DEFAULT_CFG", "FP8_KV_CFG"),
    "nvfp4_kv_nvfp4": ("llama", "NVFP4_DEFAULT_CFG", "NVFP4_KV_CFG"),
    "nvfp4_awq_lite": ("llama", "NVFP4_AWQ_LITE_CFG", None),
    "nvfp4_awq_clip": ("llama", "NVFP4_AWQ_CLIP_CFG", None),
    "nvfp4_mlp_only": ("llama", "NVFP4_MLP_ONLY_CFG", None),
    "nvfp4_svdquant": ("llama", "NVFP4_SVDQUANT_DEFAULT_CFG", None),
    "w4a16_nvfp4": ("llama", "W4A16_NVFP4_CFG", None),
    "w4a8_nvfp4_fp8": ("llama", "W4A8_NVFP4_FP8_CFG", None),
    "mxfp8": ("llama", "MXFP8_DEFAULT_CFG", None),
    "mxfp4": ("llama", "MXFP4_DEFAULT_CFG", None),
    "w4a8_mxfp4_fp8": ("llama", "W4A8_MXFP4_FP8_CFG", None),
    "mxfp6": ("llama", "MXFP6_DEFAULT_CFG", None),
    "mxint8": ("llama", "MXINT8_DEFAULT_CFG", None),
    # --- other architectures ---
    "qwen3_fp8": ("qwen3", "FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "qwen3_nvfp4": ("qwen3", "NVFP4_DEFAULT_CFG", None),
    "qwen2_int4_awq": ("qwen2", "INT4_AWQ_CFG", None),
    "qwen3moe_fp8": ("qwen3_moe", "FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "qwen3moe_nvfp4": ("qwen3_moe", "NVFP4_DEFAULT_CFG", None),
    "mixtral_nvfp4": ("mixtral", "NVFP4_DEFAULT_CFG", None),
    "mixtral_fp8": ("mixtral", "FP8_DEFAULT_CFG", None),
    # --- issue 12: more architectures ---
    "phi3_int4_awq": ("phi3", "INT4_AWQ_CFG", None),
    "phi3_fp8": ("phi3", "FP8_DEFAULT_CFG", None),
    "phi3_nvfp4": ("phi3", "NVFP4_DEFAULT_CFG", None),
    "gemma3_int4_awq": ("gemma3", "INT4_AWQ_CFG", None),
    "gemma3_int8_sq": ("gemma3", "INT8_SMOOTHQUANT_CFG", None),
    "gemma3_fp8": ("gemma3", "FP8_DEFAULT_CFG", None),
    "deepseek_v3_fp8": ("deepseek_v3", "FP8_DEFAULT_CFG", None),
    "deepseek_v3_nvfp4": ("deepseek_v3", "NVFP4_DEFAULT_CFG", None),
    # ModelOpt 0.47 cannot export INT4 AWQ of transformers-5 fused experts (pack_int4_in_uint8:
    # IndexError in moe_utils._export_fused_experts); the routed experts are per-expert nn.Linear
    # here, as in DeepSeek's own remote-code model (see build_model).
    "deepseek_v3_int4_awq": ("deepseek_v3_list", "INT4_AWQ_CFG", None),
    # --- quantized lm_head (Llama shape) ---
    "lm_head_nvfp4": ("llama", "NVFP4_DEFAULT_CFG", None, {"lm_head": True}),
    "lm_head_fp8": ("llama", "FP8_DEFAULT_CFG", None, {"lm_head": True}),
    "lm_head_int4_awq": ("llama", "INT4_AWQ_CFG", None, {"lm_head": True}),
    # --- INT4 AWQ MoE: experts as an nn.ModuleList of MLPs (see build_model) ---
    "qwen3moe_int4_awq": ("qwen3_moe_list", "INT4_AWQ_CFG", None),
    # --- unquantized (no mtq.quantize; save_pretrained): for checking that an engine serves the
    # architecture at all. Not bundled fixtures; write them elsewhere with --out. ---
    "dense_phi3": ("phi3", None, None),
    "dense_gemma3": ("gemma3", None, None),
    "dense_deepseek_v3": ("deepseek_v3", None, None),
    # --- KV-cache algos beside FP8/NVFP4 ---
    "fp8_kv_nvfp4_affine": ("llama", "FP8_DEFAULT_CFG", "NVFP4_AFFINE_KV_CFG"),
    # --- FP8 2-D block weights, real-quantized (mtq.compress): quant_algo "fp8_pb_real" ---
    "fp8_pb_real": ("llama", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None, {"compress": True}),
}

VOCAB = 1024
SEED = 1234


def build_model(arch):
    import torch
    import transformers as tf

    common = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    # every fixture uses the same tiny tokenizer (bos 1, eos 2)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, architectures=["LlamaForCausalLM"])
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=64, architectures=["Qwen3ForCausalLM"])
        cls = tf.Qwen3ForCausalLM
    elif arch in ("qwen3_moe", "qwen3_moe_list"):
        cfg = tf.Qwen3MoeConfig(
            **common,
            head_dim=64,
            moe_intermediate_size=128,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            architectures=["Qwen3MoeForCausalLM"],
        )
        cls = tf.Qwen3MoeForCausalLM
    elif arch == "mixtral":
        c = dict(common)
        c["intermediate_size"] = 256
        cfg = tf.MixtralConfig(
            **c, num_local_experts=4, num_experts_per_tok=2, architectures=["MixtralForCausalLM"]
        )
        cls = tf.MixtralForCausalLM
    elif arch == "phi3":
        # Phi-3: one fused qkv_proj [q+2kv, H] and one fused gate_up_proj [2I, H] per layer.
        cfg = tf.Phi3Config(**common, **ids, architectures=["Phi3ForCausalLM"])
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma3":
        # Gemma 3 text: RMSNorm computes x * (1 + w); four norms per layer (input, post_attention,
        # pre_feedforward, post_feedforward) plus q_norm/k_norm; embeddings tied to lm_head as in
        # the released models; one sliding-window and one global layer.
        c = dict(common)
        c["tie_word_embeddings"] = True
        cfg = tf.Gemma3TextConfig(
            **c,
            **ids,
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            architectures=["Gemma3ForCausalLM"],
        )
        cls = tf.Gemma3ForCausalLM
    elif arch in ("deepseek_v3", "deepseek_v3_list"):
        # DeepSeek-V3: MLA (q_a_proj/q_b_proj, kv_a_proj_with_mqa/kv_b_proj, q_a/kv_a layernorms),
        # first layer dense, second layer MoE with 1 shared expert + 4 routed experts (top-2,
        # sigmoid router with e_score_correction_bias).
        c = dict(common)
        c["num_key_value_heads"] = 4
        cfg = tf.DeepseekV3Config(
            **c,
            **ids,
            q_lora_rank=128,
            # 512 + 64: the MLA latent size (576) of DeepSeek-V2/V3, the only one vLLM's CPU MLA
            # backends run (cpu_mla.py / amx_mla.py get_supported_head_sizes)
            kv_lora_rank=512,
            # DeepSeek-V3's own head dims: on Hopper, CUDA vLLM's only MLA prefill backend
            # (FlashAttention, v1/attention/backends/mla/prefill/flash_attn.py
            # supports_mla_dimensions) accepts (nope, rope, v) = (128, 64, 128), (192, 64, 256),
            # (64, 64, 128) or (256, 0, 256), and refuses the (64, 64, 64) used before
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            moe_intermediate_size=128,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            num_mtp_layers=0,
            # as in DeepSeek-V3's released config.json (transformers 5 no longer writes them; vLLM
            # builds the router's e_score_correction_bias only for topk_method "noaux_tc")
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            architectures=["DeepseekV3ForCausalLM"],
        )
        cls = tf.DeepseekV3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(SEED)
    model = cls(cfg).to(torch.bfloat16).eval()
    # random init gives std 0.02 everywhere; give the norms some non-trivial values so that
    # layernorm folding of AWQ scales is visible (Gemma's norms multiply by 1 + w).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                if arch == "gemma3":
                    p.uniform_(-0.5, 0.5)
                else:
                    p.uniform_(0.5, 1.5)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    if arch in ("qwen3_moe_list", "deepseek_v3_list"):
        listify_moe_experts(model)
    return model


def listify_moe_experts(model):
    """Replace transformers-5's fused experts (3-D gate_up_proj/down_proj) by an nn.ModuleList of
    per-expert MLPs with the same weights (same routing, same function): the transformers-4 /
    DeepSeek remote-code layout, which ModelOpt 0.47's AWQ MoE export path was written for
    (get_experts_list calls len(experts); the fused-experts INT4 packing fails). Exported names
    are the same `mlp.experts.{e}.gate_proj|up_proj|down_proj` as the fused export's."""
    import torch
    from torch import nn

    if model.config.model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP as MLP
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP as MLP

    class ListExperts(nn.ModuleList):
        def __init__(self, mlps, num_experts):
            super().__init__(mlps)
            self.num_experts = num_experts

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e, mlp in enumerate(self):
                token, slot = torch.where(top_k_index == e)
                if token.numel() == 0:
                    continue
                y = mlp(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
            return out

    cfg = model.config
    inter = cfg.moe_intermediate_size
    for layer in model.model.layers:
        fused = getattr(layer.mlp, "experts", None)
        if fused is None:  # a dense layer
            continue
        mlps = []
        for e in range(fused.gate_up_proj.shape[0]):
            m = MLP(cfg, intermediate_size=inter).to(torch.bfloat16)
            with torch.no_grad():
                m.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
                m.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
                m.down_proj.weight.copy_(fused.down_proj[e])
            mlps.append(m)
        layer.mlp.experts = ListExperts(mlps, len(mlps))


def calib_data():
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(0, VOCAB, (4, 64), generator=g) for _ in range(8)]


def get_cfg(main, kv, options=None):
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.utils.core_utils import update_quant_cfg_with_kv_cache_quant

    cfg = copy.deepcopy(getattr(mtq, main))
    if kv:
        cfg = update_quant_cfg_with_kv_cache_quant(cfg, getattr(mtq, kv)["quant_cfg"])
    if (options or {}).get("lm_head"):
        # quantize lm_head like every other Linear: drop the preset's "*lm_head*" disable entries
        cfg = copy.deepcopy(cfg)
        cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if not (isinstance(e, dict) and e.get("quantizer_name") == "*lm_head*")]
    return cfg


# ------------------------------------------------------------------------------------------
# Fake-quant snapshots
# ------------------------------------------------------------------------------------------
def snapshot_fakequant(model):
    """name -> {fq: fake-quantized weight (fp32), pqs: input pre_quant_scale or None}.

    Covers dense quantized Linears and transformers-5 fused MoE experts (3-D gate_up_proj/down_proj
    with per-expert weight quantizer ModuleLists), which are recorded per expert under the
    per-expert names the exporter emits (<experts>.<E>.gate_proj / up_proj / down_proj).
    """
    import torch

    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            wq = getattr(m, "weight_quantizer", None)
            w = getattr(m, "weight", None)
            if wq is not None and isinstance(w, torch.Tensor) and w.dim() == 2:
                if type(w).__name__ == "QTensorWrapper":  # mtq.compress'ed: no fake quant to snapshot
                    continue
                enabled = getattr(wq, "is_enabled", False)
                if not enabled:
                    continue
                iq = getattr(m, "input_quantizer", None)
                pqs = getattr(iq, "pre_quant_scale", None) if iq is not None else None
                out[name] = {
                    "fq": wq(w.detach().clone()).float().cpu(),
                    "pqs": None if pqs is None else pqs.detach().float().cpu().clone(),
                    "w": w.detach().float().cpu().clone(),
                }
            if hasattr(m, "gate_up_proj_weight_quantizers") and hasattr(m, "gate_up_proj"):
                gu = m.gate_up_proj
                dn = m.down_proj
                inter = gu.shape[1] // 2
                iq_gu = getattr(m, "gate_up_proj_input_quantizer", None)
                iq_dn = getattr(m, "down_proj_input_quantizer", None)
                for e in range(gu.shape[0]):
                    q = m.gate_up_proj_weight_quantizers[e]
                    if not q.is_enabled:
                        continue
                    fq = q(gu[e].detach().clone()).float().cpu()
                    pqs = getattr(iq_gu, "pre_quant_scale", None)
                    pqs = None if pqs is None else pqs.detach().float().cpu().clone()
                    out[f"{name}.{e}.gate_proj"] = {"fq": fq[:inter], "pqs": pqs, "w": gu[e, :inter].float().cpu()}
                    out[f"{name}.{e}.up_proj"] = {"fq": fq[inter:], "pqs": pqs, "w": gu[e, inter:].float().cpu()}
                    qd = m.down_proj_weight_quantizers[e]
                    pqs = getattr(iq_dn, "pre_quant_scale", None)
                    pqs = None if pqs is None else pqs.detach().float().cpu().clone()
                    out[f"{name}.{e}.down_proj"] = {
                        "fq": qd(dn[e].detach().clone()).float().cpu(),
                        "pqs": pqs,
                        "w": dn[e].float().cpu(),
                    }
    return out


# ------------------------------------------------------------------------------------------
# Independent dequantization of exported tensors (the formulas documented in REPORT.md)
# ------------------------------------------------------------------------------------------
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def unpack_fp4_lastdim(packed):
    """uint8 [..., K/2] -> fp32 [..., K]; low nibble = even column, high nibble = odd column."""
    import torch

    lut = torch.tensor(E2M1)
    lo = (packed & 0x0F).long()
    hi = (packed >> 4).long()
    out = torch.stack([lut[lo], lut[hi]], dim=-1)  # [..., K/2, 2]
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def unpack_int4_rows(packed):
    """uint8 [N/2, K] -> int [N, K]; low nibble = even row (2i), high nibble = odd row (2i+1),
    4-bit two's complement (signed, range [-8, 7], no zero point)."""
    import torch

    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.stack([lo, hi], dim=1)  # [N/2, 2, K]
    return out.reshape(packed.shape[0] * 2, packed.shape[1])


def expand_blocks(scale, shape):
    """Repeat a per-block scale [.., r, c] to the full weight shape."""
    s = scale
    if s.dim() == 4:  # FP8 2-D block scale is exported as [out/B, 1, in/B, 1]
        s = s.reshape(s.shape[0], s.shape[2])
    if s.dim() == 2:
        s = s.repeat_interleave(shape[0] // s.shape[0], 0).repeat_interleave(shape[1] // s.shape[1], 1)
    return s


def n_mismatch(a, b):
    """Elements that differ by more than bf16 rounding (the fake-quant output is bf16)."""
    return int(((a - b).abs() > (2.0**-8) * b.abs() + 1e-12).sum().item())


def fp8_round(x):
    import torch

    return x.to(torch.float8_e4m3fn).float()


def dequant(fmt, t, prefix, group_size=None):
    """Return (dequantized fp32 weight, dict of extra info) for module `prefix` of format `fmt`."""
    import torch

    w = t[prefix + ".weight"]
    ws = t.get(prefix + ".weight_scale")
    ws2 = t.get(prefix + ".weight_scale_2")
    info = {}
    if fmt in ("FP8",):
        return w.float() * ws.float(), info
    if fmt == "FP8_PER_CHANNEL_PER_TOKEN":
        return w.float() * ws.float().reshape(-1, 1), info
    if fmt in ("fp8_pb_wo", "FP8_PB_WO", "FP8_BLOCK", "fp8_pb_real", "FP8_PB_REAL"):
        return w.float() * expand_blocks(ws.float(), w.shape), info
    if fmt in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        return w.float() * ws.float().reshape(-1, 1), info
    if fmt in ("W4A16_AWQ", "W4A8_AWQ"):
        q = unpack_int4_rows(w).float()
        deq = q * expand_blocks(ws.float(), q.shape)
        if fmt == "W4A8_AWQ" and ws2 is not None:
            # what the fake-quant does: int4 dequant, then per-tensor FP8 with scale weight_scale_2
            info["deq_int4_only"] = deq
            deq = fp8_round(deq / ws2.float()) * ws2.float()
        return deq, info
    if fmt in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "W4A8_NVFP4_FP8", "NVFP4_SVD"):
        q = unpack_fp4_lastdim(w)
        return q * expand_blocks(ws.float(), q.shape) * ws2.float(), info
    if fmt in ("MXFP4", "W4A8_MXFP4_FP8", "mxfp4", "w4a8_mxfp4_fp8"):
        q = unpack_fp4_lastdim(w)
        return q * expand_blocks(torch.exp2(ws.float() - 127), q.shape), info
    if fmt in ("MXFP8",):
        return w.float() * expand_blocks(torch.exp2(ws.float() - 127), w.shape), info
    raise NotImplementedError(fmt)


# ------------------------------------------------------------------------------------------
# CPU workaround: modelopt 0.47's dynamic block fake-quant (NVFP4 / MX*) needs CUDA
# (tensor_quant._dynamic_block_quantize_impl asserts amax.is_cuda for E4M3 scales and uses the
# CUDA extension modelopt_cuda_ext_mx for E8M0 scales). We replace the module-level
# `dynamic_block_quantize_op` with a pure-PyTorch emulation built from modelopt's own
# NVFP4QTensor / MXFP4QTensor / MXFP8QTensor quantize+dequantize (the same code the exporter uses).
# ------------------------------------------------------------------------------------------
def install_cpu_dynamic_block_quant():
    import torch
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor import MXFP4QTensor, MXFP8QTensor, NVFP4QTensor

    def cpu_dynamic_block_quant(
        inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
    ):
        scale_bits = (scale_exponent_bits, scale_num_bits - scale_exponent_bits - 1)
        nb = (exponent_bits, num_bits - exponent_bits - 1) if exponent_bits != 0 else num_bits
        dtype = inputs.dtype
        x = inputs.detach().float()
        if nb == (2, 1) and scale_bits == (4, 3):  # NVFP4: global scale = amax / (6 * 448)
            s2 = amax.detach().float().amax() / (6.0 * 448.0)
            qt, sc, s2 = NVFP4QTensor.quantize(x.clone(), block_size, None, s2)
            out = qt.dequantize(
                dtype=torch.float32, scale=sc, double_scale=s2, block_sizes={-1: block_size}
            )
        elif nb == (2, 1) and scale_bits == (8, 0):  # MXFP4
            qt, e8 = MXFP4QTensor.quantize(x, block_size)
            out = qt.dequantize(dtype=torch.float32, scale=e8, block_sizes={-1: block_size})
        elif nb == (4, 3) and scale_bits == (8, 0) and block_size == 32:  # MXFP8
            qt, e8 = MXFP8QTensor.quantize(x)
            out = qt.dequantize(dtype=torch.float32, scale=e8)
        else:
            raise NotImplementedError(f"CPU emulation: num_bits={nb} scale_bits={scale_bits}")
        return out.reshape(inputs.shape).to(dtype)

    tensor_quant.dynamic_block_quantize_op = cpu_dynamic_block_quant


# ------------------------------------------------------------------------------------------
def run_one(name):
    import torch

    warnings.filterwarnings("ignore")
    import modelopt
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export import unified_export_hf as ueh
    from safetensors.torch import load_file

    arch, main, kv, *rest = RECIPES[name]
    options = rest[0] if rest else {}
    cpu_patch = os.environ.get("MODELOPT_CPU_PATCH", "1") == "1"
    if cpu_patch:
        install_cpu_dynamic_block_quant()
    outdir = CKPTS / name
    if outdir.exists():
        for p in outdir.iterdir():
            p.unlink()
    outdir.mkdir(parents=True, exist_ok=True)
    result = {
        "recipe": name,
        "arch": arch,
        "mtq_cfg": main,
        "kv_cfg": kv,
        "options": options,
        "edits": (
            "model edited before mtq.quantize (not after export): the transformers-5 fused experts "
            "(3-D gate_up_proj/down_proj) were replaced by an nn.ModuleList of per-expert MLPs holding "
            "the same weights (listify_moe_experts), because ModelOpt 0.47 cannot export INT4 AWQ of "
            "fused experts; quantization, calibration and export are ModelOpt's own"
            if arch.endswith("_list")
            else None
        ),
        "cpu_dynamic_block_quant_patch": cpu_patch,
        "versions": {
            "modelopt": modelopt.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    t0 = time.time()
    stage = "build"
    try:
        model = build_model(arch)
        orig_norms = {n: p.detach().float().clone() for n, p in model.named_parameters() if "norm" in n}
        data = calib_data()

        def forward_loop(m):
            with torch.no_grad():
                for d in data:
                    m(d)

        if main is None:
            stage = "save_pretrained"
            model.save_pretrained(str(outdir))
            for f in TOKENIZER_FILES:
                shutil.copyfile(TOKENIZER_FROM / f, outdir / f)
            result["status"] = "ok"
            result["files"] = {p.name: p.stat().st_size for p in sorted(outdir.iterdir())}
            (outdir / "inspect.json").write_text(json.dumps(result, indent=1, default=str))
            print(f"[{name}] ok (dense)")
            return result
        stage = "quantize"
        model = mtq.quantize(model, get_cfg(main, kv, options), forward_loop)
        result["quantize_s"] = round(time.time() - t0, 2)
        snap_calib = snapshot_fakequant(model)
        if options.get("compress"):
            # real quantization (weights stored as QTensorWrapper): the exporter's FP8_PB_REAL path
            stage = "compress"
            mtq.compress(model)

        # Patch the exporter to snapshot fake-quant weights right before packing,
        # and to record the AWQ pre_quant_scales it folds into layernorms.
        snap_export = {}
        folded = {}
        orig_proc = ueh._process_quantized_modules
        orig_fuse_ln = ueh.fuse_prequant_layernorm

        def proc(model_, *a, **k):
            snap_export.update(snapshot_fakequant(model_))
            return orig_proc(model_, *a, **k)

        def fuse_ln(ln, modules):
            if hasattr(modules[0].input_quantizer, "_pre_quant_scale"):
                for mm in modules:
                    folded[mm.name] = mm.input_quantizer._pre_quant_scale.detach().float().cpu().clone()
                folded["__ln__" + ln.name] = True
            return orig_fuse_ln(ln, modules)

        ueh._process_quantized_modules = proc
        ueh.fuse_prequant_layernorm = fuse_ln
        stage = "export"
        try:
            export_hf_checkpoint(model, export_dir=str(outdir))
        finally:
            ueh._process_quantized_modules = orig_proc
            ueh.fuse_prequant_layernorm = orig_fuse_ln
        for f in TOKENIZER_FILES:
            shutil.copyfile(TOKENIZER_FROM / f, outdir / f)
        result["export_s"] = round(time.time() - t0, 2)

        stage = "inspect"
        hqc_path = outdir / "hf_quant_config.json"
        result["hf_quant_config"] = json.loads(hqc_path.read_text()) if hqc_path.exists() else None
        cfg_json = json.loads((outdir / "config.json").read_text())
        result["config_quantization_config"] = cfg_json.get("quantization_config")
        result["config_dtype"] = cfg_json.get("dtype", cfg_json.get("torch_dtype"))
        files = sorted(p.name for p in outdir.iterdir())
        result["files"] = {f: (outdir / f).stat().st_size for f in files}
        tensors = {}
        for f in files:
            if f.endswith(".safetensors"):
                tensors.update(load_file(str(outdir / f)))
        result["tensors"] = {
            k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(tensors.items())
        }
        # scalar values of small scale tensors in layer 0, for the report
        result["scalars_layer0"] = {
            k: v.float().item()
            for k, v in tensors.items()
            if ".layers.0." in k and v.numel() == 1
        }
        # normalization weights changed by export (AWQ layernorm folding)
        changed = {}
        for n, p in orig_norms.items():
            if n in tensors:
                d = (tensors[n].float() - p).abs().max().item()
                if d > 0:
                    changed[n] = d
        result["norm_weights_changed_by_export"] = changed
        result["awq_scales_folded_into_layernorm_for"] = sorted(
            k for k in folded if not k.startswith("__ln__")
        )

        # ---- verification ----
        q = (result["hf_quant_config"] or {}).get("quantization", {})
        algo = q.get("quant_algo")
        per_layer = q.get("quantized_layers") or {}
        ver = {}
        if options.get("compress"):
            # compressed weights have no fake quant at export: compare with the one before compress
            snap_export = dict(snap_calib)
        for mod, s in sorted(snap_export.items()):
            fmt = per_layer.get(mod, {}).get("quant_algo", algo) if per_layer else algo
            # fused experts may have been renamed by the reverse weight conversion
            cands = [mod]
            if ".experts." in mod:
                w123 = mod.replace(".gate_proj", ".w1").replace(".up_proj", ".w3").replace(".down_proj", ".w2")
                cands += [w123, w123.replace(".mlp.experts.", ".block_sparse_moe.experts.")]
            key = next((c for c in cands if c + ".weight" in tensors), None)
            if key is None or fmt is None:
                ver[mod] = {"status": "not found in export" if key is None else "no format"}
                continue
            if tensors[key + ".weight"].dtype in (torch.bfloat16, torch.float16, torch.float32):
                ver[mod] = {"status": "exported unquantized", "dtype": str(tensors[key + ".weight"].dtype)}
                continue
            try:
                deq, info = dequant(fmt, tensors, key)
            except Exception as e:  # noqa: BLE001
                ver[mod] = {"status": f"dequant failed: {e!r}"}
                continue
            r = {"format": fmt, "exported_name": key}
            r["max_abs_err_vs_fakequant_at_export"] = (deq - s["fq"]).abs().max().item()
            r["n_mismatch_vs_fakequant_at_export"] = n_mismatch(deq, s["fq"])
            r["numel"] = deq.numel()
            if fmt == "FP8":
                # exporter computes (bf16 weight / fp32 0-dim scale) -> stays bf16 -> fp8 (double rounding)
                ws_ = tensors[key + ".weight_scale"].float()
                emul = (s["w"].to(torch.bfloat16) / ws_).to(torch.float8_e4m3fn)
                r["n_diff_exported_vs_bf16_division_emulation"] = int(
                    (emul.float() != tensors[key + ".weight"].float()).sum().item()
                )
            r["fakequant_at_export_absmax"] = s["fq"].abs().max().item()
            if "deq_int4_only" in info:
                r["max_abs_err_int4_only_vs_fakequant_at_export"] = (
                    (info["deq_int4_only"] - s["fq"]).abs().max().item()
                )
            # effective-weight comparison with the model right after mtq.quantize:
            # W_eff = W_deq * pre_quant_scale (along in-features)
            c = snap_calib.get(mod)
            if c is not None:
                pqs_exp = tensors.get(key + ".pre_quant_scale")
                pqs_eff = None
                if pqs_exp is not None:
                    pqs_eff = pqs_exp.float()
                    r["pre_quant_scale_exported"] = True
                elif mod in folded:
                    pqs_eff = folded[mod]
                    r["pre_quant_scale_folded_into_layernorm"] = True
                w_eff_exp = deq * (pqs_eff.reshape(1, -1) if pqs_eff is not None else 1.0)
                w_eff_cal = c["fq"] * (c["pqs"].reshape(1, -1) if c["pqs"] is not None else 1.0)
                r["max_abs_err_vs_fakequant_after_mtq_quantize"] = (w_eff_exp - w_eff_cal).abs().max().item()
                r["max_abs_err_vs_original_bf16_weight"] = (
                    w_eff_exp - c["w"] * (c["pqs"].reshape(1, -1) if c["pqs"] is not None else 1.0)
                ).abs().max().item()
            if fmt in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "W4A8_NVFP4_FP8"):
                # re-derive the packed bytes with modelopt's own NVFP4QTensor and the exported weight_scale_2
                from modelopt.torch.quantization.qtensor import NVFP4QTensor

                bs = 32 if fmt == "W4A8_NVFP4_FP8" else 16
                qt, sc, _ = NVFP4QTensor.quantize(
                    s["w"].to(torch.bfloat16), bs, None, tensors[key + ".weight_scale_2"].float()
                )
                r["n_bytes_diff_vs_NVFP4QTensor_requant"] = int(
                    (qt._quantized_data != tensors[key + ".weight"]).sum().item()
                )
                r["n_scale_diff_vs_NVFP4QTensor_requant"] = int(
                    (sc.float() != tensors[key + ".weight_scale"].float()).sum().item()
                )
            ver[mod] = r
        result["verification"] = ver

        # Are scales of modules that share an input (q/k/v, gate/up) unified by the exporter?
        fusion = {}
        groups = {
            "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
            "expert0_gate_up": ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"],
            "mixtral_expert0_w1_w3": ["block_sparse_moe.experts.0.w1", "block_sparse_moe.experts.0.w3"],
            "mla_q_a_kv_a": ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"],
            "shared_experts_gate_up": ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"],
        }
        for (gname, mods), pre in [(g, p) for p in ("model.layers.0.", "model.layers.1.") for g in groups.items()]:
            if not all(pre + m + ".weight" in tensors for m in mods):
                continue
            gname = pre + gname
            g = {}
            for suf in ("input_scale", "weight_scale", "weight_scale_2", "pre_quant_scale"):
                ts = [tensors.get(pre + m + "." + suf) for m in mods]
                if any(t is None for t in ts):
                    continue
                ts = [t.float() for t in ts]  # torch.equal has no CPU kernel for float8
                if ts[0].numel() == 1:
                    g[suf] = "identical" if all(torch.equal(ts[0], t) for t in ts) else (
                        "differ: " + ", ".join(f"{t.float().item():.6g}" for t in ts)
                    )
                elif all(t.shape == ts[0].shape for t in ts):
                    g[suf] = "identical" if all(torch.equal(ts[0], t) for t in ts) else "differ (per-channel/block)"
                else:
                    g[suf] = "different shapes (per-row)"
            fusion[gname] = g
        result["fused_scale_checks_layer0"] = fusion
        result["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        result["status"] = "failed"
        result["failed_stage"] = stage
        result["error"] = repr(e)
        tb = traceback.format_exc()
        result["traceback_tail"] = tb.splitlines()[-25:]
        (outdir / "_error.txt").write_text(tb)
    result["total_s"] = round(time.time() - t0, 2)
    (outdir / "inspect.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"[{name}] {result['status']} ({result.get('failed_stage', '')}) {result.get('error', '')}")
    return result


def main():
    global CKPTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", help="parent directory of the fixture directories (default tests/fixtures/modelopt)")
    args = ap.parse_args()
    if args.out:
        CKPTS = Path(args.out).resolve()
    if args.list:
        for k, v in RECIPES.items():
            print(k, v)
        return
    if args.only and len(args.only) == 1:
        run_one(args.only[0])
        return
    names = args.only or list(RECIPES)
    for n in names:
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--out", str(CKPTS), "--only", n], capture_output=True, text=True)
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"make_modelopt_fixtures.{n}.log"
        log.write_text(r.stdout[-20000:] + "\n--- stderr ---\n" + r.stderr[-20000:])
        last = [line for line in r.stdout.splitlines() if line.startswith(f"[{n}]")]
        print(last[-1] if last else f"[{n}] crashed rc={r.returncode}", f"{time.time() - t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
