#!/usr/bin/env python3
"""Fixtures made by editing a real ModelOpt 0.47 export, for layouts ModelOpt 0.47 does not write on CPU.

    python scripts/edit_modelopt_fixture.py fp8_block_scales_inv

fp8_block_scales_inv (from tests/fixtures/modelopt/fp8_2d_blockwise_wo, ModelOpt's FP8_2D_BLOCKWISE_WEIGHT_ONLY
export): the layout of NVIDIA's MIXED_PRECISION releases whose block-FP8 layers say `FP8_BLOCK_SCALES`
(e.g. the MTP experts of nvidia/Qwen3.8-Flash-Next-NVFP4, vllm-project/vllm#55496/#55498) and store the
DeepSeek-V3 layout: `quant_algo: MIXED_PRECISION`, every quantized module listed in `quantized_layers` as
`{quant_algo: FP8_BLOCK_SCALES, group_size: 128}`, and each module's 4-D ModelOpt `weight_scale`
[out/128, 1, in/128, 1] stored as `weight_scale_inv` [out/128, in/128] (same float32 values: despite the name
it is the dequant multiplier, W = weight * weight_scale_inv per 128x128 block, as in DeepSeek-V3). The FP8
weights and every other tensor are the export's bytes. The edit is recorded in the fixture's inspect.json.
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


EDITS = {"fp8_block_scales_inv": fp8_block_scales_inv}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(EDITS):
        print(EDITS[name]())
