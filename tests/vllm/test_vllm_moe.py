"""Qwen3-MoE FP8 through lazyxform: what vLLM loads from the rewritten stream.

The test stops vLLM right after `model.load_weights` consumed lazyxform's stream, before its
post-processing (which decodes or requantizes weights for a kernel), and checks every loaded
parameter against the ModelOpt tensors it must carry: dequantized weights equal ModelOpt's
`w * weight_scale` exactly, per expert and per fused shard. The model's logprobs against the
reference are checked in test_vllm_fixtures.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import vllm.model_executor.model_loader.base_loader as base_loader
from reference import load_tensors, modelopt_weight
from vllm_support import engine

NAME = "qwen3moe_fp8"


class LoadedWeights(Exception):
    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__("stopped after loading")
        self.params = params


def capture(model: torch.nn.Module, model_config, target_device) -> None:
    raise LoadedWeights({n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.fixture(scope="module")
def loaded(checkpoint: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base_loader, "process_weights_after_loading", capture)
        with pytest.raises(LoadedWeights) as stop, engine(checkpoint(NAME), "all"):
            pass
    return stop.value.params


@pytest.fixture(scope="module")
def modelopt(checkpoint: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    return load_tensors(checkpoint(NAME))


def one(params: dict[str, torch.Tensor], prefix: str, suffix: str) -> torch.Tensor:
    """The parameter under `prefix` named `...suffix` (vLLM nests the experts' own module name)."""
    (found,) = [v for k, v in params.items() if k.startswith(prefix) and k.endswith(suffix)]
    return found


def test_experts_carry_modelopt_weights(loaded: dict[str, torch.Tensor], modelopt: dict[str, torch.Tensor]) -> None:
    for layer in (0, 1):
        mlp = f"model.layers.{layer}.mlp."
        w13, w13_scale = one(loaded, mlp, ".w13_weight"), one(loaded, mlp, ".w13_weight_scale")
        w2, w2_scale = one(loaded, mlp, ".w2_weight"), one(loaded, mlp, ".w2_weight_scale")
        inter = w2.shape[2]
        for e in range(w13.shape[0]):
            expert = f"{mlp}experts.{e}."
            for shard, proj in enumerate(("gate_proj", "up_proj")):
                got = w13[e, shard * inter : (shard + 1) * inter].float() * w13_scale[e, shard]
                want = modelopt_weight("FP8", modelopt, f"{expert}{proj}")
                assert torch.equal(got, want), f"{expert}{proj}"
            want = modelopt_weight("FP8", modelopt, f"{expert}down_proj")
            assert torch.equal(w2[e].float() * w2_scale[e], want), f"{expert}down_proj"
            # One input quantizer per projection type serves all experts; gate and up share theirs.
            assert one(loaded, mlp, ".w13_input_scale")[e] == modelopt[f"{expert}gate_proj.input_scale"]
            assert one(loaded, mlp, ".w2_input_scale")[e] == modelopt[f"{expert}down_proj.input_scale"]
        assert torch.equal(loaded[f"{mlp}gate.weight"], modelopt[f"{mlp}gate.weight"])  # the router stays dense


def test_attention_carries_modelopt_weights(loaded: dict[str, torch.Tensor], modelopt: dict[str, torch.Tensor]) -> None:
    for layer in (0, 1):
        attn = f"model.layers.{layer}.self_attn."
        qkv, scales = loaded[f"{attn}qkv_proj.weight"], loaded[f"{attn}qkv_proj.weight_scale"]
        start = 0
        for shard, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            w = modelopt[f"{attn}{proj}.weight"]
            got = qkv[start : start + w.shape[0]].float() * scales[shard]
            assert torch.equal(got, modelopt_weight("FP8", modelopt, f"{attn}{proj}")), f"{attn}{proj}"
            assert loaded[f"{attn}qkv_proj.input_scale"][shard] == modelopt[f"{attn}{proj}.input_scale"]
            start += w.shape[0]
        o = modelopt_weight("FP8", modelopt, f"{attn}o_proj")
        assert torch.equal(loaded[f"{attn}o_proj.weight"].float() * loaded[f"{attn}o_proj.weight_scale"], o)
        assert loaded[f"{attn}attn.k_scale"] == modelopt[f"{attn}k_proj.k_scale"]
        assert loaded[f"{attn}attn.v_scale"] == modelopt[f"{attn}v_proj.v_scale"]
