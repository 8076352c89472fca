"""Every bundled Llama fixture and one fixture per other architecture x recipe that matters (Qwen3-MoE,
Phi-3, Gemma 3, a quantized lm_head) served by sglang.Engine on the CPU with no quantization argument,
each engine in a process of its own (engine_worker.py): SGLang loads it through lazyxform, every
quantized linear layer and fused-MoE layer runs lazyxform's portable scheme (SGLang has no
compressed-tensors kernel on a CPU), and

- the weights SGLang's loaders put into its parameters, read back from the running model, equal
  compressed-tensors' own decompressor applied to lazyxform's stream (tests/reference.py: no
  lazyxform decoding, no SGLang), on the Llama fixtures: SGLang reads parameters back by checkpoint
  name only for Llama (LlamaForCausalLM.get_weights_by_name; its Qwen3-MoE and Gemma 3 have none,
  and it maps Phi-3's pre-fused qkv_proj to its v member);
- the prompt log-probabilities match the function the checkpoint encodes, computed independently
  (tests/vllm/modelopt_reference.py: transformers' model, ModelOpt's formulas and input quantizers).

Bound: SGLang runs in bf16, the reference in fp32; `noise` is the same reference run in bf16 (max and
mean |delta logprob| over every prompt position and vocabulary entry). SGLang must stay within
`bound` x noise, max and mean, and the bound is shown to catch one module's weight scaled by
`wrong_scale` and, where a pre_quant_scale runs at run time, the reference without it. Where
lazyxform's compressed-tensors target computes a documented other function than ModelOpt's
(docs/recipes.md), the reference computes that function, as in the vLLM tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from algos import FIXTURE_TABLE
from modelopt_reference import BoundCase, Reference, within
from reference import ct_decompress, load_tensors
from sglang_support import describe, prompt_ids, run_engine

import lazyxform


@dataclass(frozen=True)
class Case(BoundCase):
    engine: dict = field(default_factory=dict)  # sglang.Engine arguments


# W4A4 (NVFP4, MXFP4 activations): the bf16 noise is 4-5x the other recipes' (a bf16 difference moves
# a 4-bit activation by a whole step); a 1.25x scale moves logprobs by about 1.3x that noise, so
# these use a 1.5x bound and a 2x wrong scale.
W4A4 = Case(bound=1.5, wrong_scale=2.0)
NO_KV = {"quantize_kv_cache": False}
# SGLang's CPU engine runs an FP8 KV cache only with Intel AMX ("CPU FP8 KV cache requires Intel AMX
# support", mem_cache/kv_cache_configurator.py); elsewhere the cache stays bf16, and the reference
# leaves K and V unrounded. With AMX the cache is FP8 and prompt log-probabilities (prefill) are
# still compared with unrounded K and V, as in the vLLM tests.
KV_FP8 = {} if torch.cpu._is_amx_tile_supported() else {"kv_cache_dtype": "bfloat16"}
# Gemma normalizes the attention's and the MLP's outputs: a whole module's weight times a factor is
# normalized away everywhere but before the MLP's GELU (tests/vllm/test_vllm_fixtures.py).
GEMMA_GATE = "model.layers.0.mlp.gate_proj"

CASES = {
    "fp8": Case(),
    "fp8_2d_blockwise_wo": Case(reference={"activation": "fp8_group128"}),
    "fp8_kv_fp8": Case(reference=NO_KV, engine=KV_FP8),
    "fp8_pc_pt": Case(),
    "int4_awq": Case(),
    "int4_blockwise_wo": Case(),
    "int8_default": Case(),
    "int8_sq": Case(),
    "int8_wo": Case(),
    "mxfp4": W4A4,
    "mxfp8": Case(),
    "nvfp4": W4A4,
    "nvfp4_awq_clip": W4A4,
    # Its o_proj pre_quant_scale is mild: without it logprobs stay inside the W4A4 bound; the same
    # run-time scheme is shown to matter on int4_awq, int8_sq and w4a8_awq.
    "nvfp4_awq_lite": Case(bound=1.5, wrong_scale=2.0, lost_pre_quant_scale_seen=False),
    "nvfp4_kv_fp8": Case(bound=1.5, wrong_scale=2.0, reference=NO_KV, engine=KV_FP8),
    "nvfp4_kv_nvfp4": Case(bound=1.5, wrong_scale=2.0, reference=NO_KV),
    "nvfp4_mlp_only": Case(),
    "nvfp4_svdquant": Case(reference={"quantize_activations": False}),
    "w4a16_nvfp4": Case(),
    "w4a8_awq": Case(bound=1.5, reference={"activation": "fp8_token"}),
    "w4a8_mxfp4_fp8": Case(reference={"activation": "fp8_token"}),
    "w4a8_nvfp4_fp8": Case(reference={"quantize_activations": False}),
    # Other architectures, one engine per architecture x recipe that matters (the rest: config tests).
    # Qwen3-MoE: the portable fused-MoE scheme; FP8 experts with static input scales, INT4 AWQ experts
    # with their gate/up pre_quant_scale at run time.
    "qwen3moe_fp8": Case(reference=NO_KV, engine=KV_FP8),
    "qwen3moe_int4_awq": Case(),
    # Phi-3: pre-fused qkv_proj / gate_up_proj; o_proj and down_proj keep a run-time pre_quant_scale.
    "phi3_int4_awq": Case(),
    # Gemma 3: (1 + w) norms, no fold: q/k/v, o_proj and gate/up keep theirs.
    "gemma3_int8_sq": Case(wrong_module=GEMMA_GATE),
    # A quantized lm_head with a run-time pre_quant_scale (SGLang's ParallelLMHead).
    "lm_head_int4_awq": Case(),
}
# SGLang reads parameters back by checkpoint name only for Llama (module docstring).
READ_BACK = sorted(n for n in CASES if FIXTURE_TABLE[n].model_type == "llama")


@dataclass
class Served:
    name: str
    path: Path
    result: dict


def quantized_modules(path: Path) -> list[str]:
    ck = lazyxform.open(path, device="cpu")
    return [m.name for m in ck.plan.modules if m.scheme != "ignore"]


@pytest.fixture(scope="module")
def serve(checkpoint: Callable[[str], Path], tmp_path_factory) -> Callable[[str], Served]:
    """serve(name): the fixture served by one engine, run once per module."""
    served: dict[str, Served] = {}

    def get(name: str) -> Served:
        if name not in served:
            path = checkpoint(name)
            weights = [f"{m}.weight" for m in quantized_modules(path)] if name in READ_BACK else []
            result = run_engine(path, tmp_path_factory.mktemp(name), weights=weights, **CASES[name].engine)
            served[name] = Served(name, path, result)
        return served[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_served_by_lazyxform(name: str, serve: Callable[[str], Served]) -> None:
    served = serve(name)
    log = served.result["log"]
    assert f"lazyxform serves {served.path}" in log
    assert f"{len(FIXTURE_TABLE[name].runtime_pqs)} with a run-time pre_quant_scale" in log
    assert "quant=compressed-tensors" in log  # SGLang's own load line
    if quantized_modules(served.path):
        assert "lazyxform's portable PyTorch kernel runs them" in log
    if FIXTURE_TABLE[name].moe:
        assert "fused-MoE layers; lazyxform's portable PyTorch kernel runs them" in log


@pytest.mark.parametrize("name", READ_BACK)
def test_loaded_weights_are_the_decompressed_stream(name: str, serve: Callable[[str], Served]) -> None:
    """SGLang's loaders (fused q/k/v and gate/up shards, per-member scales) put each tensor where the
    portable scheme decodes it from: the decoded weights equal compressed-tensors' decompression of
    lazyxform's stream, module by module, in the decompressor's dtype."""
    served = serve(name)
    ck = lazyxform.open(served.path, device="cpu")
    stream = dict(ck.wrap(iter(load_tensors(served.path).items())))
    got = served.result["weights"]
    assert len(got) == len(quantized_modules(served.path))
    for module_weight, weight in got.items():
        want = ct_decompress(ck.quantization_config, module_weight.removesuffix(".weight"), stream)
        assert torch.equal(weight.to(want.dtype), want), module_weight


def reference_logprobs(served: Served, **options) -> torch.Tensor:
    ref = Reference(served.path, **{**CASES[served.name].reference, **options})
    return torch.cat([ref.logprobs(ids)[:-1] for ids in prompt_ids(served.path)])


@pytest.mark.parametrize("name", sorted(CASES))
def test_logprobs_match_the_reference(name: str, serve: Callable[[str], Served]) -> None:
    served = serve(name)
    case = CASES[name]
    got = served.result["logprobs"]
    want = reference_logprobs(served)
    err = (got - want).abs()
    noise = (reference_logprobs(served, dtype=torch.bfloat16) - want).abs()
    report = describe(f"{name} bound {case.bound}x", err, noise)
    print(report)
    assert within(err, noise, case.bound), report
    # The bound has power: one module's weight scaled by a wrong factor falls outside it.
    wrong = Reference(served.path, **case.reference)
    module_name = case.wrong_module or next(m for m in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj") if m in wrong.algos)
    module = wrong.model.get_submodule(module_name)
    getattr(module, "linear", module).weight.data.mul_(case.wrong_scale)
    blind = (got - torch.cat([wrong.logprobs(ids)[:-1] for ids in prompt_ids(served.path)])).abs()
    assert not within(blind, noise, case.bound), describe(f"{name} against a wrong scale", blind, noise)
    if FIXTURE_TABLE[name].runtime_pqs and case.lost_pre_quant_scale_seen:
        skipped = (got - reference_logprobs(served, pre_quant_scale=False)).abs()
        assert not within(skipped, noise, case.bound), describe(f"{name} without pre_quant_scale", skipped, noise)
