"""AWQ / SmoothQuant `pre_quant_scale`: y = (x * pqs) @ W^T.

Folded only where the arithmetic is exact up to one rounding of a scale:
- into the RMSNorm weight that feeds exactly the modules sharing that pqs (norm(x) * g * pqs);
- into the per-row scales of the linear whose output rows ARE this module's input
  (up_proj -> down_proj, w3 -> w2, the up half of a stored gate_up_proj -> down_proj; v_proj, or
  the v rows of a stored qkv_proj, -> o_proj only when every query head has its own KV head and the
  KV cache is not quantized, since a per-tensor v_scale cannot absorb row factors).
Which module feeds which is the architecture's topology (topology.py). Everything else keeps `<module>.pre_quant_scale` for the engine to apply at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import TensorMismatchError
from .plan import Rule, Tensors
from .recipes.base import FLOAT_DTYPES, PQS, Module, Recipe, RowFactor, check_equal, check_scale, row_scaled
from .shards import TensorInfo
from .topology import Topology


@dataclass
class PreQuantPlan:
    rules: list[Rule] = field(default_factory=list)
    row_factors: dict[str, RowFactor] = field(default_factory=dict)  # producer module -> its consumer's pqs
    runtime: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_pre_quant(
    modules: dict[str, tuple[Module, Recipe]],
    tensors: dict[str, TensorInfo],
    topology: Topology,
    kv_algo: str | None,
) -> PreQuantPlan:
    plan = PreQuantPlan()
    with_pqs = {name: m for name, (m, recipe) in modules.items() if PQS in m.tensors}
    for name, m in with_pqs.items():
        _, inp = modules[name][1].weight_shape(m)
        info = m.info(PQS)
        if info.dtype not in FLOAT_DTYPES or info.shape != (inp,):
            raise TensorMismatchError(f"{info.describe()}: expected a float [{inp}] vector")
    done: set[str] = set()
    _fold_into_norms(plan, with_pqs, tensors, topology, done)
    _fold_into_rows(plan, modules, with_pqs, tensors, topology, kv_algo, done)
    plan.warnings += _scales_modelopt_folded_into_a_shared_norm(modules, with_pqs, tensors, topology)
    for name, m in with_pqs.items():
        if name not in done:
            plan.runtime.append(name)
            plan.rules.append(_kept(m.key(PQS)))
            plan.notes.setdefault(name, []).append("pre_quant_scale kept (engine scales the input)")
    return plan


def _kept(name: str) -> Rule:
    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        check_scale(name, t[name])
        return {name: t[name]}

    return Rule("pre_quant_scale: kept, applied at run time", (name,), (name,), fn)


def _fold_into_norms(
    plan: PreQuantPlan, with_pqs: dict[str, Module], tensors: dict[str, TensorInfo], topology: Topology, done: set[str]
) -> None:
    layers = {name.rsplit(".", 2)[0] for name in with_pqs if name.count(".") >= 2}
    for layer in sorted(layers):
        for norm, (parent, leaves) in topology.norm_consumers.items():
            consumers = [f"{layer}.{parent}.{leaf}" for leaf in leaves]
            norm_w = f"{layer}.{norm}.weight"
            if not all(c in with_pqs for c in consumers) or norm_w not in tensors:
                continue
            if parent == "mlp" and _mlp_has_other_consumers(layer, tensors, topology.mlp_leaves):
                continue
            size = with_pqs[consumers[0]].info(PQS).shape[0]
            if tensors[norm_w].shape != (size,):
                continue
            pqs = [with_pqs[c].key(PQS) for c in consumers]
            plan.rules.append(Rule(f"{norm}.weight x shared pre_quant_scale", (norm_w, *pqs), (norm_w,), _norm_fold(norm_w, pqs)))
            for c in consumers:
                done.add(c)
                plan.notes.setdefault(c, []).append(f"pre_quant_scale folded into {norm_w}")


def _mlp_has_other_consumers(layer: str, tensors: dict[str, TensorInfo], mlp_leaves: frozenset[str]) -> bool:
    """A router or shared expert under `mlp.` also reads the post-attention norm: no fold."""
    prefix = f"{layer}.mlp."
    return any(n.startswith(prefix) and n[len(prefix):].split(".", 1)[0] not in mlp_leaves for n in tensors)


# ModelOpt formats whose pre_quant_scale its exporter folds into a norm ("awq" in the format's name).
AWQ_ALGOS = frozenset({"W4A16_AWQ", "W4A8_AWQ", "NVFP4_AWQ"})


def _scales_modelopt_folded_into_a_shared_norm(
    modules: dict[str, tuple[Module, Recipe]], with_pqs: dict[str, Module], tensors: dict[str, TensorInfo], topology: Topology
) -> list[str]:
    """ModelOpt's exporter (0.47, `_fuse_shared_input_modules`) folds the AWQ scale of Linears that
    read the very output of a norm into that norm, without looking at the norm's other readers. In a
    MoE layer the post-attention norm also feeds the router and the routed experts, and a shared
    expert reads its output as is (DeepSeek), so the shared expert's gate/up scale lands in the norm
    and every other reader sees x * s as well. In the headers: AWQ gate/up modules under `mlp.`
    without a pre_quant_scale, where other AWQ modules of that MLP have one."""
    found = []
    for norm, (parent, leaves) in topology.norm_consumers.items():
        if parent != "mlp":  # the attention norms' readers are all known Linears: folds there are right
            continue
        for layer in sorted({name.partition(".mlp.")[0] for name in modules if ".mlp." in name}):
            prefix, norm_w = f"{layer}.mlp.", f"{layer}.{norm}.weight"
            if norm_w not in tensors or not _mlp_has_other_consumers(layer, tensors, topology.mlp_leaves):
                continue
            awq = [name for name, (m, _) in modules.items() if name.startswith(prefix) and m.cfg.algo in AWQ_ALGOS]
            stripped = [name for name in awq if name.rpartition(".")[2] in leaves and name not in with_pqs]
            if not stripped or not any(name in with_pqs for name in awq):
                continue
            blocks = sorted({prefix + name[len(prefix):].split(".", 1)[0] for name in stripped})
            readers = sorted({prefix + n[len(prefix):].split(".", 1)[0] for n in tensors if n.startswith(prefix)} - set(blocks))
            found.append(
                f"{', '.join(stripped)}: AWQ modules without a pre_quant_scale, where other AWQ modules of "
                f"{layer}.mlp have one. ModelOpt's exporter (0.47, _fuse_shared_input_modules) folded their "
                f"scale into {norm_w}, which also feeds {', '.join(readers)}: those read the norm's output times "
                "that scale, so this checkpoint does not compute the model ModelOpt calibrated (the norm's own "
                "weight is not in it, so no loader can undo the fold). lazyxform serves it as written. For the "
                f"calibrated model, re-export with {', '.join(blocks)} left out of quantization (a disabled "
                "quant_cfg entry): then no scale is folded into that norm."
            )
    return found


def _norm_fold(norm_w: str, pqs: list[str]) -> Any:
    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        for n in pqs:
            check_scale(n, t[n])
        shared = check_equal(pqs, t, f"pre_quant_scale of the modules fed by {norm_w}")
        g = t[norm_w]
        return {norm_w: (g.float() * shared.float()).to(g.dtype)}

    return fn


def _fold_into_rows(
    plan: PreQuantPlan,
    modules: dict[str, tuple[Module, Recipe]],
    with_pqs: dict[str, Module],
    tensors: dict[str, TensorInfo],
    topology: Topology,
    kv_algo: str | None,
    done: set[str],
) -> None:
    for name, m in with_pqs.items():
        parent, dot, leaf = name.rpartition(".")  # a top-level module has no parent
        if leaf not in topology.row_producers or (leaf in topology.through_attention and kv_algo is not None):
            continue
        producer_leaf = topology.row_producers[leaf]
        producer = f"{parent}{dot}{producer_leaf}"
        if producer not in modules:
            continue
        pm, precipe = modules[producer]
        size, blocks = m.info(PQS).shape[0], topology.stacked_rows.get(producer_leaf, 1)
        # The input is the last of `blocks` equal row blocks. Equal sizes also mean every query head
        # has its own KV head: under grouped-query attention v has fewer rows than o_proj has inputs,
        # and a KV row feeds several heads.
        if not precipe.row_scalable or precipe.weight_shape(pm)[0] != blocks * size:
            continue
        factor = RowFactor(m.key(PQS), (blocks - 1) * size)
        plan.row_factors[producer] = factor
        bias = f"{producer}.bias"
        if bias in tensors:
            plan.rules.append(Rule(f"bias x {factor.name}", (bias, factor.name), (bias,), _bias_fold(bias, factor)))
        rows = f"rows {factor.first_row}.." if factor.first_row else "rows"
        done.add(name)
        plan.notes.setdefault(name, []).append(f"pre_quant_scale folded into the output {rows} of {producer}")
        plan.notes.setdefault(producer, []).append(f"{rows} scales absorb {factor.name}")


def _bias_fold(bias: str, factor: RowFactor) -> Any:
    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        return {bias: row_scaled(t[bias], t[factor.name], factor.first_row)}

    return fn
