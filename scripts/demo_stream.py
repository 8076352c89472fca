"""Stream a ModelOpt checkpoint as compressed-tensors and decompress one layer with compressed-tensors."""

import sys
import time

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open

import lazyxform

path = sys.argv[1]
ck = lazyxform.open(path)
start = time.perf_counter()
out = dict(ck)
seconds = time.perf_counter() - start
nbytes = sum(t.numel() * t.element_size() for t in out.values())
print(f"\nstreamed {len(out)} tensors ({nbytes / 1e6:.1f} MB) on {ck.device} in {seconds * 1e3:.0f} ms")

module = ck.plan.modules[0].name
group = ck.quantization_config["config_groups"][ck.plan.modules[0].scheme]
compressor = BaseCompressor.get_value_from_registry(group["format"])
scheme = QuantizationScheme.model_validate(group)
local = {n: out[f"{module}.{n}"].cpu() for n in compressor.compression_param_names(scheme) if f"{module}.{n}" in out}
dense = compressor.decompress(local, scheme)["weight"].float()
with safe_open(f"{path}/model.safetensors", framework="pt") as f:
    w, s = f.get_tensor(f"{module}.weight"), f.get_tensor(f"{module}.weight_scale").float()
if w.dtype == torch.uint8:  # INT4: two output rows per byte, signed nibbles, low nibble = even row
    nibbles = torch.stack([w & 15, w >> 4], dim=1).reshape(-1, w.shape[1]).to(torch.int16)
    q = (nibbles - 16 * (nibbles > 7)).float()
    modelopt = q * s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)
else:  # FP8 / INT8: one code per element, per-tensor or per-row scale
    modelopt = w.float() * s.reshape(-1, *[1] * (w.dim() - 1))
rel = ((dense - modelopt).abs() / modelopt.abs().clamp_min(1e-30)).max().item()
print(f"{module}: compressed-tensors decompress vs ModelOpt's dequant formula: max relative diff {rel:.3g} "
      "(row scales may carry a folded pre_quant_scale: see 'folds' above)")
