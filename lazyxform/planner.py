"""Headers + ModelOpt config -> Plan and compressed-tensors config. Reads no tensor data.

Each quantized module's recipe and target are found once; the dense fallback, the pre_quant_scale
folds and the recipes' rules all work from them, and every rule a recipe makes is checked against
what the recipe declares it reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch

from .errors import ConfigError, MissingTensorError, UnexpectedTensorError, UnplaceableModuleError
from .fallback import ExpertsInputScale, Fallback, Read, plan_dense_experts, plan_dense_fallback
from .modelopt import ModelOptConfig, fnmatch_regex_source
from .plan import ModulePlan, Plan, Rule, Tensors, coalesce
from .prequant import PQS, plan_pre_quant
from .recipes import RECIPES, Module, Recipe, Target, recipe_for
from .recipes.base import Args, RowFactor, check_scale, describe_target
from .recipes.kv import KV_SCALE, kv_cache_args, kv_scale_rules
from .shards import TensorInfo
from .topology import Topology, topology_of

# Tensors any quantized module may carry besides what its recipe reads.
EVERY_MODULE_MAY_HAVE = (PQS, "bias")

MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Weight dtypes that hold quantized codes: meaningless without a scale.
CODE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8)

Quantized = dict[str, tuple[Module, Recipe]]


def model_dtype(hf_config: dict[str, Any]) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"
    return MODEL_DTYPES.get(str(name), torch.bfloat16)


def build_plan(
    cfg: ModelOptConfig, tensors: dict[str, TensorInfo], hf_config: dict[str, Any], fallback: Fallback = "dequantize"
) -> tuple[Plan, dict[str, Any]]:
    plan, config = plan_and_config(cfg, tensors, hf_config, fallback)
    return plan, config()


def plan_and_config(
    cfg: ModelOptConfig,
    tensors: dict[str, TensorInfo],
    hf_config: dict[str, Any],
    fallback: Fallback = "dequantize",
    experts_input_scale: ExpertsInputScale = "runtime",
    read: Read | None = None,
    as_exported: Collection[str] = (),
) -> tuple[Plan, Callable[[], dict[str, Any]]]:
    """The plan, and a function that builds the compressed-tensors config: only it imports
    compressed-tensors (seconds), which `lazyxform inspect` without --json never needs.
    experts_input_scale="dense" is the one case that reads tensor values (`read`): the routed
    experts' gate/up pre_quant_scales (fallback.plan_dense_experts). `as_exported`: quantized
    modules whose tensors stream as ModelOpt exported them (checkpoint.open)."""
    dtype = model_dtype(hf_config)
    topology = topology_of(hf_config)
    kv_args = kv_cache_args(cfg.kv_cache_algo) if cfg.kv_cache_algo else None  # an unknown one is refused first
    quantized = _quantized_modules(cfg, tensors, dtype)
    all_targets = {name: recipe.target(m.cfg) for name, (m, recipe) in quantized.items()}
    dense = plan_dense_fallback({n: mr for n, mr in quantized.items() if all_targets[n] is None}, fallback, dtype)
    modules = {name: mr for name, mr in quantized.items() if name not in dense.modules}
    _refuse_never_quantized(modules, topology, hf_config, dtype)  # a dequantized one is a plain weight
    experts = plan_dense_experts(modules, experts_input_scale, read, dtype)
    modules = {name: mr for name, mr in modules.items() if name not in experts.modules}
    targets: dict[str, Target] = {name: t for name, t in all_targets.items() if t is not None and name in modules}
    pre = plan_pre_quant(modules, tensors, topology, cfg.kv_cache_algo)
    fused_sets = _fused_scale_sets(modules, topology)
    exported = _checked_as_exported(as_exported, modules, fused_sets, pre.row_factors)

    rules: list[Rule] = list(pre.rules)
    for m, recipe in [*dense.modules.values(), *experts.modules.values()]:
        rules += _declared(recipe, recipe.dense_rules(m), [m], recipe.reads + (PQS,), ("weight",))
    # A module streamed as exported still gets its recipe's rules made: that is where its headers are checked.
    for name, (m, recipe) in modules.items():
        row_factor = pre.row_factors.get(name)
        own = tuple(s for s in recipe.reads if s not in recipe.shared)
        converted = _declared(recipe, recipe.rules(m, row_factor), [m], own, recipe.writes, row_factor)
        rules += [_as_exported_rule(m, recipe)] if name in exported else converted
    for members in fused_sets:
        recipe = members[0][1]
        fused = [m for m, _ in members]
        converted = _declared(recipe, recipe.fused_rules(fused), fused, recipe.shared, recipe.writes)
        rules += [_checks_only(r) for r in converted] if fused[0].name in exported else converted
    kv_rules = kv_scale_rules(tensors)
    if kv_rules and cfg.kv_cache_algo is None:
        raise ConfigError(f"{cfg.source}: tensors such as {kv_rules[0].inputs[0]} are KV-cache scales but the config has no kv_cache_quant_algo")
    rules += kv_rules
    groups = coalesce(rules)

    consumed = {n for g in groups for n in g.inputs}
    group_names = _config_group_names(targets)
    module_plans = [
        ModulePlan(
            name=name,
            algo=m.cfg.algo,
            scheme=group_names[name],
            target=describe_target(targets[name]),
            inputs=sorted(m.source(s).removeprefix(name + ".") for s in m.tensors),  # checkpoint names
            outputs=sorted({o.removeprefix(name + ".") for g in groups for o in g.outputs if o.startswith(name + ".")}),
            folds=pre.notes.get(name, []),
        )
        for name, (m, recipe) in modules.items()
    ]
    plan = Plan(
        modules=sorted(module_plans + dense.module_plans() + experts.module_plans(), key=lambda p: p.name),
        groups=groups,
        passthrough=[n for n in tensors if n not in consumed],
        runtime_pre_quant_scale=pre.runtime,
        tensors=tensors,
        as_exported=sorted(exported),
    )
    plan.warnings += [w for w in (dense.warning, experts.warning) if w]
    plan.warnings += pre.warnings
    ignore = _ignore_list(cfg, quantized, tensors) + sorted(dense.modules) + sorted(experts.modules)

    def config() -> dict[str, Any]:
        return _compressed_tensors_config(targets, group_names, ignore, kv_args)

    return plan, config


def _declared(
    recipe: Recipe,
    rules: list[Rule],
    members: Iterable[Module],
    reads: Iterable[str],
    writes: Iterable[str],
    row_factor: RowFactor | None = None,
) -> list[Rule]:
    """`rules`, after checking that they read and write only what `recipe` declares (a recipe bug
    otherwise: a tensor read twice or written unannounced would reach the engine wrong)."""
    members = list(members)
    allowed_in = {m.source(s) for m in members for s in reads} | ({row_factor.name} if row_factor else set())
    allowed_out = {m.key(s) for m in members for s in writes}
    for rule in rules:
        undeclared = sorted((set(rule.inputs) - allowed_in) | (set(rule.outputs) - allowed_out))
        if undeclared:
            raise AssertionError(f"{type(recipe).__name__}: rule {rule.label!r} uses {undeclared}, which the recipe does not declare")
    return rules


def _checked_as_exported(
    names: Collection[str], modules: Quantized, fused_sets: list[list[tuple[Module, Recipe]]], row_factors: dict[str, RowFactor]
) -> frozenset[str]:
    """The modules to stream as exported, after checking that each can be: a quantized module with a
    compressed-tensors target, whose rows no consumer's pre_quant_scale is folded into (that changes
    its scales), and with it every sibling it shares scales with in one GEMM."""
    exported = frozenset(names)
    for name in sorted(exported):
        if name not in modules:
            raise ConfigError(f"{name} is to stream as exported, but it is not a quantized module with a compressed-tensors target")
        if name in row_factors:
            raise ConfigError(f"{name} is to stream as exported, but {row_factors[name].name} is folded into its rows")
    for members in fused_sets:
        names_in_set = [m.name for m, _ in members]
        chosen = [n for n in names_in_set if n in exported]
        if chosen and len(chosen) != len(names_in_set):
            raise ConfigError(f"as_exported names {', '.join(chosen)} but not the rest of the fused set {names_in_set}, which shares its scales")
    return exported


def _as_exported_rule(m: Module, recipe: Recipe) -> Rule:
    """Every tensor the recipe reads, under its checkpoint name and unchanged; the module's own float
    scales checked (finite, > 0) as a conversion checks them. What fused siblings share (every module of
    a recipe that shares anything is in a fused set, if only of one) is checked by _checks_only."""
    names = tuple(m.source(s) for s in recipe.reads)
    own = [s for s in recipe.reads if s != "weight" and s not in recipe.shared]
    scales = [m.source(s) for s in own if m.info(s).dtype.is_floating_point]

    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        for n in scales:
            check_scale(n, t[n])
        return {n: t[n] for n in names}

    return Rule("as exported, for the engine's own ModelOpt method (scales checked)", names, names, fn)


def _checks_only(rule: Rule) -> Rule:
    """A conversion rule over the scales fused siblings share, run for its checks alone (equal where the
    format needs them equal, or the warning where they differ), its outputs dropped: the tensors it
    reads stream as exported."""

    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        rule.fn(t)
        return {}

    return Rule(f"checked only, streamed as exported: {rule.label}", rule.inputs, (), fn)


def _quantized_modules(cfg: ModelOptConfig, tensors: dict[str, TensorInfo], dtype: torch.dtype) -> Quantized:
    """Every module with a weight scale (under any name a recipe reads it as), and its recipe."""
    scale_names = {"weight_scale"} | {alt for r in RECIPES.values() for alt, own in r.read_as.items() if own == "weight_scale"}
    names = sorted({n.rpartition(".")[0] for n in tensors if n.rpartition(".")[2] in scale_names})
    modules: Quantized = {}
    for name in names:
        if cfg.is_excluded(name):
            raise ConfigError(f"{cfg.source}: {name} carries quantization scales but matches exclude_modules {cfg.exclude}")
        algo = cfg.algo_for(name)
        if algo is None:
            raise ConfigError(f"{cfg.source}: {name} carries quantization scales but no quant_algo covers it")
        recipe = recipe_for(algo.algo)
        own: dict[str, TensorInfo] = {}
        for n, info in tensors.items():
            if n.startswith(name + ".") and not KV_SCALE.match(n):
                suffix = recipe.read_as.get(n[len(name) + 1:], n[len(name) + 1:])
                if suffix in own:
                    raise UnexpectedTensorError(f"{info.file.name}: {own[suffix].name} and {n} are both the {suffix} of {name}")
                own[suffix] = info
        allowed = set(recipe.reads) | set(EVERY_MODULE_MAY_HAVE)
        extra = sorted(set(own) - allowed)
        if extra:
            raise UnexpectedTensorError(
                f"{own[extra[0]].file.name}: {algo.algo} module {name} has tensors {extra} that the recipe does not "
                f"use (expected only {sorted(allowed)})"
            )
        m = Module(name, algo, own, dtype)
        for suffix in recipe.reads:
            m.info(suffix)
        modules[name] = (m, recipe)
    for n, info in tensors.items():
        if n.endswith(".weight") and n.removesuffix(".weight") not in modules and info.dtype in CODE_DTYPES:
            # Passed through, the engine would cast the codes to the model dtype: silently wrong.
            raise MissingTensorError(f"{info.describe()}: quantized codes with no {n.removesuffix('.weight')}.weight_scale")
    return modules


def _refuse_never_quantized(modules: Quantized, topology: Topology, hf_config: dict[str, Any], dtype: torch.dtype) -> None:
    """Quantized modules the engine builds without a quantization method (Topology.never_quantized)."""
    for name, (m, _) in modules.items():
        leaf = name.rpartition(".")[2]
        if leaf in topology.never_quantized:
            weight = m.info("weight")
            raise UnplaceableModuleError(
                f"{weight.describe()}: {name} is quantized ({m.cfg.algo}), but engines build a {hf_config.get('model_type')} "
                f"model's {leaf} as a plain Linear with no quantization method, which loads only a {dtype} weight: "
                "export it unquantized (exclude it from quantization)"
            )


def _fused_scale_sets(modules: Quantized, topology: Topology) -> list[list[tuple[Module, Recipe]]]:
    sets: list[list[tuple[Module, Recipe]]] = []
    seen: set[str] = set()
    for name, (_, recipe) in modules.items():
        if not recipe.shared or name in seen:
            continue
        parent, dot, leaf = name.rpartition(".")  # a top-level module has no parent
        siblings = [f"{parent}{dot}{x}" for x in topology.fused_family(leaf)]
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


def _config_group_names(targets: dict[str, Target]) -> dict[str, str]:
    keys: dict[Target, str] = {}
    names: dict[str, str] = {}
    for module, target in targets.items():
        names[module] = keys.setdefault(target, f"group_{len(keys)}")
    return names


def _compressed_tensors_config(
    targets: dict[str, Target], group_names: dict[str, str], ignore: list[str], kv_args: Args | None
) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    members: dict[str, list[str]] = {}
    for module, group in group_names.items():
        members.setdefault(group, []).append(module)
    single = len(members) == 1
    config_groups = {}
    for group, names in members.items():
        t = targets[names[0]]
        config_groups[group] = QuantizationScheme(
            targets=single_group_targets(names) if single else names,
            weights=t.weights.resolve(),
            input_activations=t.input_activations and t.input_activations.resolve(),
            format=t.format,
        )
    formats = sorted({targets[n[0]].format for n in members.values()})
    # No format at all when the fallback dequantized every quantized module.
    fmt = "mixed-precision" if len(formats) > 1 else formats[0] if formats else "dense"
    qc = QuantizationConfig(
        config_groups=config_groups,
        format=fmt,
        quantization_status="compressed",
        ignore=ignore,
        kv_cache_scheme=kv_args and kv_args.resolve(),
    )
    return qc.model_dump(mode="json", exclude_none=True)


# Quantized modules that engines do not build as a Linear: a target must name them (vLLM gives its
# ParallelLMHead a scheme only when one does). An MTP layer's output head (DeepSeek's
# `model.layers.N.shared_head.head`) is a ParallelLMHead too.
NOT_LINEAR = (".lm_head", ".shared_head.head")  # name endings, the dot included


def single_group_targets(modules: list[str]) -> list[str]:
    """Targets of the one config group: every Linear, and by name what is quantized but not a Linear."""
    return ["Linear", *sorted(m for m in modules if f".{m}".endswith(NOT_LINEAR))]


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
