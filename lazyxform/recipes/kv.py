"""KV-cache scales. ModelOpt writes `self_attn.k_proj.k_scale` / `v_proj.v_scale` as 0-d fp32
(amax / 448); compressed-tensors names them `self_attn.k_scale` / `v_scale`, shape [1]."""

from __future__ import annotations

import re

import torch

from ..errors import UnexpectedTensorError, UnsupportedAlgoError
from ..plan import Rule
from ..shards import TensorInfo
from .base import Args, expect, scale_rule

KV_SCALE = re.compile(r"^(?P<attn>.+?)\.(?:[kv]_proj\.)?(?P<kind>[kv])_scale$")


def kv_cache_args(algo: str) -> Args:
    """FP8: static per-tensor. NVFP4: FP4 in 16-element blocks with dynamic FP8 block scales, as
    compressed-tensors' NVFP4 activation preset; ModelOpt's k/v_scale are amax/448 for both
    (unified_export_hf.py), the per-tensor values vLLM's native ModelOpt path loads either way."""
    if algo == "FP8":
        return Args(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
    if algo == "NVFP4":
        return Args(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16, dynamic="local")
    raise UnsupportedAlgoError(f"kv_cache_quant_algo {algo!r} is not supported{UNSUPPORTED_KV.get(algo, '')} (supported: FP8, NVFP4)")


# Why the KV-cache formats ModelOpt names but lazyxform refuses have no compressed-tensors form.
UNSUPPORTED_KV = {
    "NVFP4_AFFINE": ": NVFP4 with a per-channel offset (k_bias, v_bias), which compressed-tensors' float formats cannot carry",
    "INT8": ": ModelOpt 0.47 does not export it, and no engine's compressed-tensors path runs an int8 KV cache",
}


def kv_scale_rules(tensors: dict[str, TensorInfo]) -> list[Rule]:
    rules = []
    source: dict[str, str] = {}
    for name, info in tensors.items():
        match = KV_SCALE.match(name)
        if match is None:
            continue
        expect(info, (torch.float32,), ())
        dst = f"{match['attn']}.{match['kind']}_scale"
        if dst in source:  # `attn.k_proj.k_scale` next to `attn.k_scale`: which one would the engine get?
            raise UnexpectedTensorError(f"{info.file.name}: {source[dst]} and {name} are both the {match['kind']}_scale of {match['attn']}")
        source[dst] = name
        rules.append(scale_rule(f"{match['kind']}_scale: 0-d -> [1] at the attention", name, dst, lambda s: s.reshape(1)))
    return rules
