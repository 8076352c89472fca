#!/usr/bin/env python3
"""Fixtures made by editing a real ModelOpt 0.47 export, for layouts ModelOpt 0.47 does not write on CPU.

    python scripts/edit_modelopt_fixture.py fp8_block_scales_inv deepseek_v3_nvfp4_mtp

fp8_block_scales_inv (from tests/fixtures/modelopt/fp8_2d_blockwise_wo, ModelOpt's FP8_2D_BLOCKWISE_WEIGHT_ONLY
export): the layout of NVIDIA's MIXED_PRECISION releases whose block-FP8 layers say `FP8_BLOCK_SCALES`
(e.g. the MTP experts of nvidia/Qwen3.8-Flash-Next-NVFP4, vllm-project/vllm#55496/#55498) and store the
DeepSeek-V3 layout: `quant_algo: MIXED_PRECISION`, every quantized module listed in `quantized_layers` as
`{quant_algo: FP8_BLOCK_SCALES, group_size: 128}`, and each module's 4-D ModelOpt `weight_scale`
[out/128, 1, in/128, 1] stored as `weight_scale_inv` [out/128, in/128] (same float32 values: despite the name
it is the dequant multiplier, W = weight * weight_scale_inv per 128x128 block, as in DeepSeek-V3). The FP8
weights and every other tensor are the export's bytes. The edit is recorded in the fixture's inspect.json.

deepseek_v3_nvfp4_mtp (from tests/fixtures/modelopt/deepseek_v3_nvfp4, ModelOpt's NVFP4_DEFAULT export of
a two-layer DeepSeek-V3): DeepSeek-V3's multi-token-prediction (MTP) layout, whose MTP layer is the decoder
layer after the last one, `model.layers.{num_hidden_layers}.*`, with its own `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, `shared_head.head` and `embed_tokens` (DeepSeek-V3's released checkpoint; vLLM
deepseek_mtp.py, SGLang deepseek_nextn.py). transformers 5.14 builds no MTP layer, so ModelOpt cannot
quantize one directly; instead the export's layer 1 (MLA attention, router, shared and 4 routed experts,
all quantized and calibrated by ModelOpt) becomes the MTP layer: config.json says `num_hidden_layers: 1`,
`num_nextn_predict_layers: 1`, and layer 1's tensors keep their names and bytes. The MTP-only tensors are
added in bf16, as every release keeps them (ModelOpt's hf_ptq re-attaches MTP weights unquantized;
NVIDIA's DeepSeek FP4 releases and Qwen3-Next's `mtp.fc` store them in bf16), from a seeded generator:
norms uniform in [0.5, 1.5), projections and embeddings normal with std 0.02 (transformers' init), so
that the MTP head and embedding differ from the main model's. Not listed in exclude_modules, as in the
Qwen3-Next NVFP4 release (vLLM qwen3_next_mtp.py: "mtp.fc ... missing from the checkpoint quant exclude
list").
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "modelopt"


def fp8_block_scales_inv() -> Path:
    src, dst = FIXTURES / "fp8_2d_blockwise_wo", FIXTURES / "fp8_block_scales_inv"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    modules = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
    for m in modules:
        s = tensors.pop(f"{m}.weight_scale")
        assert s.dim() == 4 and s.shape[1] == s.shape[3] == 1, (m, s.shape)
        tensors[f"{m}.weight_scale_inv"] = s.reshape(s.shape[0], s.shape[2]).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata)
    layers = {m: {"quant_algo": "FP8_BLOCK_SCALES", "group_size": 128} for m in modules}
    hqc = json.loads((src / "hf_quant_config.json").read_text())
    hqc["quantization"]["quant_algo"] = "MIXED_PRECISION"
    hqc["quantization"]["quantized_layers"] = layers
    (dst / "hf_quant_config.json").write_text(json.dumps(hqc, indent=4))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["quant_algo"] = "MIXED_PRECISION"
    cfg["quantization_config"]["quantized_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=4))
    inspect = json.loads((src / "inspect.json").read_text())
    inspect["recipe"] = "fp8_block_scales_inv"
    inspect["edits"] = (
        "edited from the real export fp8_2d_blockwise_wo by scripts/edit_modelopt_fixture.py: quant_algo "
        "MIXED_PRECISION with every quantized module FP8_BLOCK_SCALES (group_size 128) in quantized_layers; "
        "each <module>.weight_scale [out/128,1,in/128,1] renamed <module>.weight_scale_inv and reshaped to "
        "[out/128,in/128], values unchanged; all other bytes as exported"
    )
    inspect["hf_quant_config"] = hqc
    inspect["config_quantization_config"] = cfg["quantization_config"]
    inspect["tensors"] = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sorted(tensors.items())}
    inspect["files"] = {p.name: p.stat().st_size for p in sorted(dst.iterdir()) if p.name != "inspect.json"}
    (dst / "inspect.json").write_text(json.dumps(inspect, indent=1))
    return dst


MTP_SEED = 2024


def deepseek_v3_nvfp4_mtp() -> Path:
    src, dst = FIXTURES / "deepseek_v3_nvfp4", FIXTURES / "deepseek_v3_nvfp4_mtp"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads((src / "config.json").read_text())
    mtp = cfg["num_hidden_layers"] - 1  # the export's last decoder layer becomes the MTP layer
    assert cfg["num_nextn_predict_layers"] == 0 and mtp >= cfg["first_k_dense_replace"], "the MTP layer must be an MoE layer"
    cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"] = mtp, 1
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(MTP_SEED)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (torch.rand(hidden, generator=g) + 0.5).to(torch.bfloat16)

    added = {
        "enorm.weight": norm(),
        "hnorm.weight": norm(),
        "eh_proj.weight": normal(hidden, 2 * hidden),
        "shared_head.norm.weight": norm(),
        "shared_head.head.weight": normal(vocab, hidden),
        "embed_tokens.weight": normal(vocab, hidden),
    }
    tensors.update({f"model.layers.{mtp}.{k}": v for k, v in added.items()})
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata)
    (dst / "config.json").write_text(json.dumps(cfg, indent=4))
    inspect = json.loads((src / "inspect.json").read_text())
    inspect["recipe"] = "deepseek_v3_nvfp4_mtp"
    inspect["edits"] = (
        "edited from the real export deepseek_v3_nvfp4 by scripts/edit_modelopt_fixture.py: config.json "
        f"num_hidden_layers {mtp + 1} -> {mtp} and num_nextn_predict_layers 0 -> 1, so the exported layer {mtp} "
        f"(quantized and calibrated by ModelOpt, bytes and names unchanged) is the MTP layer; added bf16 "
        f"model.layers.{mtp}.{{{', '.join(added)}}} from torch.Generator seed {MTP_SEED} (norms uniform [0.5, 1.5), "
        "the rest normal std 0.02); hf_quant_config.json unchanged"
    )
    inspect["tensors"] = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sorted(tensors.items())}
    inspect["files"] = {p.name: p.stat().st_size for p in sorted(dst.iterdir()) if p.name != "inspect.json"}
    (dst / "inspect.json").write_text(json.dumps(inspect, indent=1))
    return dst


EDITS = {"fp8_block_scales_inv": fp8_block_scales_inv, "deepseek_v3_nvfp4_mtp": deepseek_v3_nvfp4_mtp}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(EDITS):
        print(EDITS[name]())
