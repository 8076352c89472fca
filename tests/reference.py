"""Independent references for tests: ModelOpt's dequant formulas as written in the export-format
notes, read with the safetensors library itself, and compressed-tensors' own decompressor.

Nothing here imports lazyxform: a bug shared with the code under test cannot hide here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures" / "modelopt"


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def hf_quant_algo(ckpt: Path) -> str:
    return json.loads((Path(ckpt) / "hf_quant_config.json").read_text())["quantization"]["quant_algo"].upper()


def modelopt_dequant(algo: str, t: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """W in fp32 from ModelOpt's stored tensors (modelopt-export-format.md section 3 and 4)."""
    w, ws = t[f"{module}.weight"], t[f"{module}.weight_scale"]
    if algo == "FP8":
        return w.float() * ws.float()
    if algo in ("FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "W8A16"):
        return w.float() * ws.float()[:, None]
    if algo == "FP8_PB_WO":
        out, inp = w.shape
        block = ws.float().squeeze(-1).squeeze(1)  # [out/128, 1, in/128, 1] -> [out/128, in/128]
        full = block.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inp]
        return w.float() * full
    raise NotImplementedError(algo)


def quantized_modules(t: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".weight_scale") for k in t if k.endswith(".weight_scale"))


def ct_decompress(quantization_config: dict, module: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' decompressor applied to one module of lazyxform's output."""
    groups = quantization_config["config_groups"]
    group = next(g for g in groups.values() if "Linear" in g["targets"] or module in g["targets"])
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or quantization_config["format"])
    local = {n: out[f"{module}.{n}"] for n in compressor.compression_param_names(scheme) if f"{module}.{n}" in out}
    return compressor.decompress(local, scheme)["weight"]


def folded_row_factor(module: str, orig: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The pre_quant_scale of the module reading this module's output rows, when the stream dropped
    it: folded into these rows."""
    parent, leaf = module.rsplit(".", 1)
    consumer = {"up_proj": "down_proj", "w3": "w2", "v_proj": "o_proj"}.get(leaf)
    key = f"{parent}.{consumer}.pre_quant_scale"
    return orig[key] if consumer and key in orig and key not in out else None
