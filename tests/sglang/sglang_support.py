"""Helpers for the SGLang tests: servable fixture copies, one engine per process, prompt log-probabilities;
real SGLang layers built in the test process (one-rank group: conftest's one_rank_group) and filled
through their own weight loaders as SGLang's model loaders fill them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "lazyxform rewrites ModelOpt weights at load time!",
    "0123456789 abc XYZ",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
]
BOS = 1
VOCAB = 1024  # every bundled fixture's vocab_size
ROUTE_ENV = "LAZYXFORM_SGLANG_ROUTE"  # what lazyxform_sglang reads; spelled out so a rename breaks the tests
WORKER = Path(__file__).parent / "engine_worker.py"
WORKER_TIMEOUT_S = 600


def prompt_ids(model: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [[BOS, *tokenizer.encode(p, add_special_tokens=False).ids] for p in PROMPTS]


class EngineFailed(AssertionError):
    pass


def run_engine(
    model: Path, workdir: Path, env: dict[str, str] | None = None, weights: list[str] | None = None, **engine
) -> dict:
    """sglang.Engine on the CPU in a process of its own (engine_worker.py): its result dict, with the
    process's log under "log". A failing engine fails this call with its output."""
    request, result = workdir / "request.json", workdir / "result.pt"
    request.write_text(json.dumps({"model": str(model), "ids": prompt_ids(model), "weights": weights or [], "engine": engine}))
    done = subprocess.run(
        [sys.executable, str(WORKER), str(request), str(result)],
        env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    log = done.stdout + done.stderr
    if done.returncode != 0 or not result.exists():
        raise EngineFailed(f"{model.name}: the engine exited with {done.returncode}:\n{log[-6000:]}")
    return {**torch.load(result, weights_only=False), "log": log}



def describe(name: str, err: torch.Tensor, noise: torch.Tensor) -> str:
    return f"{name}: |SGLang - reference| max {err.max():.4f} mean {err.mean():.5f}; bf16 noise max {noise.max():.4f} mean {noise.mean():.5f}"


# Layer 0's fused q/k/v and gate/up of a Llama fixture, as SGLang 0.5.23's
# LlamaForCausalLM._legacy_load_weights (its default loader; the v2 loader's STANDARD_QKV_MAPPING and
# STANDARD_GATE_UP_MAPPING make the same calls) fills them: stacked_params_mapping, shard ids
# "q"/"k"/"v" and 0/1.
LAYER = "model.layers.0"
STACKED_PARAMS_MAPPING = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]
MEMBERS = {"self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"], "mlp.gate_up_proj": ["gate_proj", "up_proj"]}


def fused_layers(hf: dict[str, Any], quant_config: Any) -> dict[str, Any]:
    """Layer 0's qkv_proj and gate_up_proj of the Llama config `hf`, built by SGLang with `quant_config`."""
    from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    common: dict[str, Any] = dict(bias=False, params_dtype=torch.bfloat16, quant_config=quant_config)
    return {
        "self_attn.qkv_proj": QKVParallelLinear(
            hf["hidden_size"], head_dim, hf["num_attention_heads"], hf["num_key_value_heads"], prefix=f"{LAYER}.self_attn.qkv_proj", **common
        ),
        "mlp.gate_up_proj": MergedColumnParallelLinear(
            hf["hidden_size"], [hf["intermediate_size"]] * 2, prefix=f"{LAYER}.mlp.gate_up_proj", **common
        ),
    }


def member_key(fused: str, member: str, tensor: str) -> str:
    return f"{LAYER}.{fused.split('.')[0]}.{member}.{tensor}"


def fused_members(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Layer 0's q/k/v and gate/up tensors among `tensors` (a checkpoint's, or lazyxform's stream of them)."""
    members = {m for ms in MEMBERS.values() for m in ms}
    return {n: t for n, t in tensors if n.startswith(f"{LAYER}.") and n.split(".")[-2] in members}


def distinct_input_scales(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each fused member's input scale multiplied by 1, 2, 3 in member order (ModelOpt
    exports them equal: the members read one input)."""
    tensors = dict(tensors)
    for fused, members in MEMBERS.items():
        for i, member in enumerate(members):
            name = member_key(fused, member, "input_scale")
            tensors[name] = tensors[name] * (i + 1)
    return tensors


def load(layers: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """As SGLang's Llama loader: a member's tensor goes to the fused parameter with the member's shard id."""
    params = {n: p for prefix, layer in layers.items() for n, p in layer.named_parameters(prefix=f"{LAYER}.{prefix}")}
    for name, tensor in tensors.items():
        param_name, weight_name, shard_id = next(m for m in STACKED_PARAMS_MAPPING if m[1] in name)
        param = params[name.replace(weight_name, param_name)]
        param.weight_loader(param, tensor, shard_id)


def fused_moe(hf: dict[str, Any], quant_config: Any, prefix: str, experts: int, top_k: int) -> Any:
    """SGLang's FusedMoE `prefix` (model.layers.<i>.mlp.experts) of the config `hf`, built with `quant_config`."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    return FusedMoE(
        num_experts=experts,
        top_k=top_k,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["moe_intermediate_size"],
        layer_id=int(prefix.split(".")[2]),
        quant_config=quant_config,
        prefix=prefix,
        params_dtype=torch.bfloat16,
    )


def load_experts(layer: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """The tensors of `layer`'s experts among `tensors` put in place by SGLang's expert weight loader,
    under the names its expert_params_mapping gives them; how many."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    prefix = layer.layer_name
    params = dict(layer.named_parameters(prefix="experts"))
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", layer.num_experts)
    loaded = 0
    for tensor_name, tensor in tensors:
        if not tensor_name.startswith(f"{prefix}."):
            continue
        short = tensor_name.removeprefix(f"{prefix.rsplit('.', 1)[0]}.")  # experts.{e}.{proj}.{tensor}
        param_name, weight_name, expert, shard = next(m for m in mapping if m[1] in short)
        param = params[short.replace(weight_name, param_name)]
        param.weight_loader(param, tensor, short.replace(weight_name, param_name), shard_id=shard, expert_id=expert)
        loaded += 1
    return loaded
