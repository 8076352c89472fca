"""Independent references for tests: ModelOpt's dequant formulas as written in the export-format
notes (modelopt-export-format.md sections 3-4), read with the safetensors library itself, and
compressed-tensors' own decompressor. The one decoder of every ModelOpt weight format: the tests,
tests/vllm/modelopt_reference.py (the dense model reference) and the portable-kernel tests use it.

Nothing here imports lazyxform: a bug shared with the code under test cannot hide here
(tests/test_modelopt_reference.py checks it).

Precision: FP8 and INT8 weights are decoded in float32 (the product ModelOpt's own dequant forms:
one fp32 rounding of code x scale); INT4, NVFP4 and MX weights in float64, where every ModelOpt
product is exact (at most 4 + 3 + 24 significant bits), so they give the exact real value the
export encodes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures" / "modelopt"

# E2M1 code -> value: bit 3 is the sign, bits 0-2 index {0, .5, 1, 1.5, 2, 3, 4, 6}.
E2M1_TABLE = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
SVD_A = "weight_quantizer._svdquant_lora_a"
SVD_B = "weight_quantizer._svdquant_lora_b"
# Weight formats decoded in float32 (code x scale, one rounding); the others in float64 (exact).
FP32_DECODED = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "FP8_PB_REAL", "FP8_BLOCK_SCALES", "W8A8_SQ_PER_CHANNEL", "W8A16")
# FP8 128x128 block formats: ModelOpt's FP8_PB_WO (scale [out/128, 1, in/128, 1]) and fp8_pb_real
# (its export of weights already block-quantized, scale [out/128, in/128]); TensorRT-LLM's
# FP8_BLOCK_SCALES, whose scale NVIDIA's releases store as `weight_scale_inv` [out/128, in/128], a
# multiplier despite the name (DeepSeek-V3's convention; vLLM issue #54126).
FP8_BLOCK = ("FP8_PB_WO", "FP8_PB_REAL", "FP8_BLOCK_SCALES")
# Names of a module's weight scale: ModelOpt's, and the block formats' other one.
WEIGHT_SCALES = ("weight_scale", "weight_scale_inv")


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def hf_quant_algo(ckpt: Path) -> str:
    """quant_algo of hf_quant_config.json, upper-cased (ModelOpt leaks some in lower case)."""
    return json.loads((Path(ckpt) / "hf_quant_config.json").read_text())["quantization"]["quant_algo"].upper()


def algo_of(algo: str) -> str:
    """The format a quant_algo stores its weights in (W4A8_MXFP4_FP8 weights are MXFP4)."""
    return {"W4A8_MXFP4_FP8": "MXFP4"}.get(algo, algo)


def quantized_modules(t: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.rpartition(".")[0] for k in t if k.rpartition(".")[2] in WEIGHT_SCALES)


def weight_scale(t: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """The module's weight scale, under whichever of WEIGHT_SCALES the checkpoint uses."""
    return next(t[f"{module}.{s}"] for s in WEIGHT_SCALES if f"{module}.{s}" in t)


# --- ModelOpt's weight formats ---------------------------------------------------------------------


def int4_values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in], byte = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4 -> signed q [out, in]."""
    nibbles = torch.empty(packed.shape[0] * 2, packed.shape[1], dtype=torch.int64)
    nibbles[0::2] = (packed & 0x0F).long()
    nibbles[1::2] = (packed >> 4).long()
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2], low nibble = even column -> E2M1 values [out, in] (float64)."""
    codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int64)
    codes[:, 0::2] = (packed & 0x0F).long()
    codes[:, 1::2] = (packed >> 4).long()
    return E2M1_TABLE[codes]


def per_column(scale: torch.Tensor, block: int) -> torch.Tensor:
    """Block scales [out, in/block] -> one scale per element [out, in] (float64)."""
    return scale.double().repeat_interleave(block, dim=1)


def modelopt_weight(algo: str, t: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """W as ModelOpt's formulas define it (section 3 table, section 4): float32 for FP32_DECODED,
    float64 otherwise. NVFP4_SVD: the whole weight, W_res + B @ A."""
    algo = algo_of(algo)
    w, ws = t[f"{module}.weight"], weight_scale(t, module)
    if algo == "FP8":
        return w.float() * ws.float()
    if algo in ("FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "W8A16"):
        return w.float() * ws.float()[:, None]
    if algo in FP8_BLOCK:
        out, inp = w.shape
        block = ws.float().reshape(-(-out // 128), -(-inp // 128))  # [out/128, 1, in/128, 1] or already 2-D
        full = block.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inp]
        return w.float() * full
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        q = int4_values(w).double()
        return q * per_column(ws, q.shape[1] // ws.shape[1])
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "W4A8_NVFP4_FP8", "NVFP4_SVD"):
        v = fp4_values(w)
        residual = v * per_column(ws, v.shape[1] // ws.shape[1]) * t[f"{module}.weight_scale_2"].double()
        if algo != "NVFP4_SVD":
            return residual
        return residual + t[f"{module}.{SVD_B}"].double() @ t[f"{module}.{SVD_A}"].double()
    exponent = ws.double() - 127  # E8M0
    if algo == "MXFP8":
        return w.double() * torch.pow(2.0, exponent).repeat_interleave(32, dim=1)
    if algo == "MXFP4":
        return fp4_values(w) * torch.pow(2.0, exponent).repeat_interleave(32, dim=1)
    raise NotImplementedError(algo)


def fp32_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x rounded once to fp32 (via float64: the quotient of two fp32 values cannot sit on an
    fp32 rounding boundary unless it is exact)."""
    return (1.0 / x.double()).float().reshape(1)


# --- compressed-tensors ----------------------------------------------------------------------------


def ct_decompress(quantization_config: dict, module: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' decompressor applied to one module of lazyxform's output."""
    groups = quantization_config["config_groups"]
    group = next(g for g in groups.values() if "Linear" in g["targets"] or module in g["targets"])
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or quantization_config["format"])
    local = {n: out[f"{module}.{n}"] for n in compressor.compression_param_names(scheme) if f"{module}.{n}" in out}
    return compressor.decompress(local, scheme)["weight"]
