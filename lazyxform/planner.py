"""Headers + ModelOpt config -> Plan and compressed-tensors config. Reads no tensor data."""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

from .errors import ConfigError, MissingTensorError, UnexpectedTensorError
from .modelopt import ModelOptConfig, fnmatch_regex_source
from .plan import ModulePlan, Plan, Rule, coalesce
from .prequant import PQS, plan_pre_quant
from .recipes import Module, Recipe, Target, recipe_for
from .recipes.kv import KV_SCALE, kv_cache_args, kv_scale_rules
from .shards import TensorInfo

# Suffixes ModelOpt writes next to a quantized Linear's weight.
MODULE_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale", PQS, "bias")
# Fused in the engine (one GEMM): their activation scales must agree.
FUSED_LEAVES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_dtype(hf_config: dict[str, Any]) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"
    return MODEL_DTYPES.get(str(name), torch.bfloat16)


def build_plan(cfg: ModelOptConfig, tensors: dict[str, TensorInfo], hf_config: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    dtype = model_dtype(hf_config)
    modules = _quantized_modules(cfg, tensors, dtype)
    pre = plan_pre_quant(modules, tensors, hf_config, cfg.kv_cache_algo)

    rules: list[Rule] = list(pre.rules)
    for name, (m, recipe) in modules.items():
        rules += recipe.rules(m, pre.row_factors.get(name))
    for members in _fused_input_scale_sets(modules):
        rules.append(members[0][1].input_scale_rule([m for m, _ in members]))
    kv_rules = kv_scale_rules(tensors)
    if kv_rules and cfg.kv_cache_algo is None:
        raise ConfigError(f"{cfg.source}: tensors such as {kv_rules[0].inputs[0]} are KV-cache scales but the config has no kv_cache_quant_algo")
    rules += kv_rules
    groups = coalesce(rules)

    consumed = {n for g in groups for n in g.inputs}
    targets = {name: recipe.target(m.cfg) for name, (m, recipe) in modules.items()}
    group_names = _config_group_names(targets)
    module_plans = [
        ModulePlan(
            name=name,
            algo=m.cfg.algo,
            scheme=group_names[name],
            target=describe_target(targets[name]),
            inputs=sorted(m.tensors),
            outputs=sorted({o.removeprefix(name + ".") for g in groups for o in g.outputs if o.startswith(name + ".")}),
            folds=pre.notes.get(name, []),
        )
        for name, (m, recipe) in modules.items()
    ]
    plan = Plan(
        modules=module_plans,
        groups=groups,
        passthrough=[n for n in tensors if n not in consumed],
        runtime_pre_quant_scale=pre.runtime,
        tensors=tensors,
    )
    qc = _compressed_tensors_config(cfg, modules, targets, group_names, tensors)
    return plan, qc


def _quantized_modules(cfg: ModelOptConfig, tensors: dict[str, TensorInfo], dtype: torch.dtype) -> dict[str, tuple[Module, Recipe]]:
    names = sorted(n.removesuffix(".weight_scale") for n in tensors if n.endswith(".weight_scale"))
    modules: dict[str, tuple[Module, Recipe]] = {}
    for name in names:
        if cfg.is_excluded(name):
            raise ConfigError(f"{cfg.source}: {name} carries quantization scales but matches exclude_modules {cfg.exclude}")
        algo = cfg.algo_for(name)
        if algo is None:
            raise ConfigError(f"{cfg.source}: {name} carries quantization scales but no quant_algo covers it")
        recipe = recipe_for(algo.algo)
        own = {n[len(name) + 1:]: info for n, info in tensors.items() if n.startswith(name + ".") and not KV_SCALE.match(n)}
        allowed = set(recipe.consumes) | {PQS, "bias"} | ({"input_scale"} if recipe.has_input_scale else set())
        extra = sorted(set(own) - allowed)
        if extra:
            raise UnexpectedTensorError(
                f"{own[extra[0]].file.name}: {algo.algo} module {name} has tensors {extra} that the recipe does not "
                f"use (expected only {sorted(allowed)})"
            )
        m = Module(name, algo, own, dtype)
        for suffix in recipe.consumes + (("input_scale",) if recipe.has_input_scale else ()):
            m.info(suffix)
        modules[name] = (m, recipe)
    return modules


def _fused_input_scale_sets(modules: dict[str, tuple[Module, Recipe]]) -> list[list[tuple[Module, Recipe]]]:
    sets: list[list[tuple[Module, Recipe]]] = []
    seen: set[str] = set()
    for name, (_, recipe) in modules.items():
        if not recipe.has_input_scale or name in seen:
            continue
        parent, leaf = name.rsplit(".", 1)
        family = next((f for f in FUSED_LEAVES if leaf in f), (leaf,))
        siblings = [f"{parent}.{x}" for x in family]
        present = [s for s in siblings if s in modules]
        if len(present) != len(siblings):
            missing = sorted(set(siblings) - set(present))
            raise MissingTensorError(f"fused set {siblings}: {missing} missing or not quantized like {name}")
        algos = {modules[s][0].cfg for s in present}
        if len(algos) > 1:
            raise ConfigError(f"fused set {siblings} mixes formats {sorted(a.algo for a in algos)}; the engine runs them as one GEMM")
        seen.update(present)
        sets.append([modules[s] for s in present])
    return sets


def describe_target(t: Target) -> str:
    def args(a: Any) -> str:
        detail = {"group": f" g{a.group_size}", "block": f" {a.block_structure}"}.get(a.strategy, "")
        return f"{a.type}{a.num_bits} {a.strategy}{detail}{' dynamic' if a.dynamic else ''}"

    acts = args(t.input_activations) if t.input_activations else "none"
    return f"{t.format}: W {args(t.weights)}, A {acts}"


def _config_group_names(targets: dict[str, Target]) -> dict[str, str]:
    keys: dict[str, str] = {}
    names: dict[str, str] = {}
    for module, target in targets.items():
        key = repr((target.weights.model_dump(), target.input_activations and target.input_activations.model_dump(), target.format))
        names[module] = keys.setdefault(key, f"group_{len(keys)}")
    return names


def _compressed_tensors_config(
    cfg: ModelOptConfig,
    modules: dict[str, tuple[Module, Recipe]],
    targets: dict[str, Target],
    group_names: dict[str, str],
    tensors: dict[str, TensorInfo],
) -> dict[str, Any]:
    members: dict[str, list[str]] = {}
    for module, group in group_names.items():
        members.setdefault(group, []).append(module)
    single = len(members) == 1
    config_groups = {}
    for group, names in members.items():
        t = targets[names[0]]
        config_groups[group] = QuantizationScheme(
            targets=["Linear"] if single else names,
            weights=t.weights,
            input_activations=t.input_activations,
            format=t.format,
        )
    formats = {targets[n[0]].format for n in members.values()}
    qc = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=_ignore_list(cfg, modules, tensors),
        kv_cache_scheme=kv_cache_args(cfg.kv_cache_algo) if cfg.kv_cache_algo else None,
    )
    return qc.model_dump(mode="json", exclude_none=True)


def _ignore_list(cfg: ModelOptConfig, modules: dict[str, Any], tensors: dict[str, TensorInfo]) -> list[str]:
    """ModelOpt's fnmatch excludes as compressed-tensors entries, plus every 2-D float weight left
    unquantized that they miss (the engine would otherwise expect quantized parameters for it)."""
    ignore = ["re:" + fnmatch_regex_source(p) if "*" in p or "?" in p else p for p in cfg.exclude]
    for name, info in tensors.items():
        if not name.endswith(".weight") or len(info.shape) != 2 or not info.dtype.is_floating_point:
            continue
        module = name.removesuffix(".weight")
        if module not in modules and not cfg.is_excluded(module):
            ignore.append(module)
    return ignore
