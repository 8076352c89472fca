"""Stream a ModelOpt checkpoint as compressed-tensors and decompress one layer with compressed-tensors."""

import sys
import time

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
    w, s = f.get_tensor(f"{module}.weight"), f.get_tensor(f"{module}.weight_scale")
print(f"{module}: compressed-tensors decompress vs ModelOpt (w * weight_scale): max abs diff "
      f"{(dense - w.float() * s.float().reshape(-1, *[1] * (w.dim() - 1))).abs().max().item():.3g} "
      "(row scales may carry a folded pre_quant_scale: see 'folds' above)")
