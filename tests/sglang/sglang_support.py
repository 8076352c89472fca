"""Helpers for the SGLang tests: servable fixture copies, one engine per process, prompt log-probabilities;
real SGLang layers built in the test process (one-rank group: conftest's one_rank_group) and filled
through their own weight loaders as SGLang's model loaders fill them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
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


def answer_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] = (9, 0)) -> None:
    """The plugin's GPU branches on this CPU: is_cpu() answered False where lazyxform_sglang reads it
    (the checkpoint it opens, the methods it hands out), and a GPU of `capability` where SGLang asks."""
    from lazyxform_sglang import config, quant_config

    for module in (config, quant_config):
        monkeypatch.setattr(module, "is_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


def lazyxform_config(path: Path, packed_modules_mapping: dict[str, list[str]] | None = None) -> Any:
    """What SGLang's get_quant_config builds for a checkpoint lazyxform serves, through the hook."""
    from lazyxform_sglang.config import MARK, open_checkpoint
    from lazyxform_sglang.quant_config import LazyxformConfig

    config = open_checkpoint(path, "cpu").quantization_config
    return LazyxformConfig.from_config({**config, MARK: {"checkpoint": str(path)}, "packed_modules_mapping": packed_modules_mapping or {}})


def plugin_stream(path: Path, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The plugin's rewrite of `tensors` (the checkpoint's, or altered), on the CPU, as its weight hook opens it."""
    import lazyxform
    from lazyxform_sglang.config import open_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # e.g. distinct input scales merged by a conversion
        return list(open_checkpoint(path, "cpu").wrap(iter(tensors.items())))


def assert_same_layer(got: torch.nn.Module, want: torch.nn.Module, what: str, config_fields: tuple[str, ...]) -> None:
    """The same parameters, attributes and method state: tensors of the same dtype, shape, strides and
    bits; other values equal, objects without an equality of their own (MoE runners, dispatchers)
    compared attribute by attribute, references to the layer (or to another object compared) as such.
    The config a layer and its method were built with differs by construction (lazyxform's, or
    SGLang's from the checkpoint): of it, `config_fields`, what the method reads, are compared."""
    assert type(got.quant_method) is type(want.quant_method), what
    for field in config_fields:
        assert getattr(got.quant_method.quant_config, field) == getattr(want.quant_method.quant_config, field), f"{what}: {field}"
    pairs: dict[int, Any] = {id(want): got}
    params = dict(want.named_parameters())
    assert params.keys() == dict(got.named_parameters()).keys(), what
    for name, value in params.items():
        assert_same(getattr(got, name), value, f"{what}.{name}", pairs)
    for a, b, where in ((got, want, what), (got.quant_method, want.quant_method, f"{what}.quant_method")):
        attrs = {k: v for k, v in vars(b).items() if not k.startswith("_") and k not in (BUILT_WITH, "quant_method")}
        assert attrs.keys() == {k for k in vars(a) if not k.startswith("_") and k not in (BUILT_WITH, "quant_method")}, where
        for name, value in attrs.items():
            assert_same(getattr(a, name), value, f"{where}.{name}", pairs)


BUILT_WITH = "quant_config"  # the attribute holding the config a layer or method was built with


def assert_same(mine: Any, value: Any, what: str, pairs: dict[int, Any]) -> None:
    if mine is value:
        return
    if id(value) in pairs:
        assert mine is pairs[id(value)], what
    elif isinstance(value, torch.Tensor):
        assert (mine.dtype, mine.shape, mine.stride()) == (value.dtype, value.shape, value.stride()), what
        assert torch.equal(bits(mine), bits(value)), what
    elif dataclasses.is_dataclass(value) or type(value).__eq__ is object.__eq__:
        assert type(mine) is type(value), what
        pairs[id(value)] = mine
        fields = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else list(vars(value))
        for name in fields:
            assert_same(getattr(mine, name), getattr(value, name), f"{what}.{name}", pairs)
    else:
        assert mine == value, what


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)
