"""KV-cache scales. ModelOpt writes `self_attn.k_proj.k_scale` / `v_proj.v_scale` as 0-d fp32
(amax / 448); compressed-tensors names them `self_attn.k_scale` / `v_scale`, shape [1]."""

from __future__ import annotations

import re

import torch
from compressed_tensors.quantization import QuantizationArgs

from ..errors import UnsupportedAlgoError
from ..plan import Rule
from ..shards import TensorInfo
from .base import expect, scale_rule

KV_SCALE = re.compile(r"^(?P<attn>.+?)\.(?:[kv]_proj\.)?(?P<kind>[kv])_scale$")


def kv_cache_args(algo: str) -> QuantizationArgs:
    if algo != "FP8":
        raise UnsupportedAlgoError(f"kv_cache_quant_algo {algo!r} is not supported (supported: FP8)")
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)


def kv_scale_rules(tensors: dict[str, TensorInfo]) -> list[Rule]:
    rules = []
    for name, info in tensors.items():
        match = KV_SCALE.match(name)
        if match is None:
            continue
        expect(info, (torch.float32,), ())
        dst = f"{match['attn']}.{match['kind']}_scale"
        rules.append(scale_rule(f"{match['kind']}_scale: 0-d -> [1] at the attention", name, dst, lambda s: s.reshape(1)))
    return rules
