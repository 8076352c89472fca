"""The plan: which tensors go in, which come out, and the small functions in between.

A Rule maps a few named ModelOpt tensors to compressed-tensors tensors. Rules that read a
common tensor are coalesced into one Group, so every checkpoint tensor belongs to at most one
group and a group is the unit the stream holds in memory and executes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .shards import TensorInfo

Tensors = Mapping[str, torch.Tensor]
REPR_ROWS = 5  # modules (and warnings) a Plan's repr lists before "... and N more"


@dataclass(frozen=True)
class Rule:
    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: Callable[[Tensors], dict[str, torch.Tensor]] = field(repr=False)
    # `fn` of many rules at once, with the same bits in a few kernel launches instead of a few per
    # rule. When the stream runs groups in batches (GPU loads), rules holding the same `many` run
    # through it together: a load is bound by the host time of launching small kernels.
    many: Many | None = field(default=None, repr=False)


Many = Callable[[Sequence[tuple[Rule, Tensors]]], list[dict[str, torch.Tensor]]]


@dataclass
class Group:
    rules: list[Rule]

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for r in self.rules for n in r.inputs))

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(n for r in self.rules for n in r.outputs)

    def __repr__(self) -> str:
        return f"Group(rules={[r.label for r in self.rules]}, inputs={list(self.inputs)}, outputs={list(self.outputs)})"

    def run(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            out.update(checked_outputs(rule, rule.fn({n: tensors[n] for n in rule.inputs})))
        return out


def run_many(many: Many, work: Sequence[tuple[Rule, Tensors]]) -> list[dict[str, torch.Tensor]]:
    produced = many(work)
    assert len(produced) == len(work), (work[0][0].label, len(produced), len(work))
    return [checked_outputs(rule, out) for (rule, _), out in zip(work, produced, strict=True)]


def checked_outputs(rule: Rule, produced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert tuple(produced) == rule.outputs, (rule.label, tuple(produced), rule.outputs)
    return produced


@dataclass
class ModulePlan:
    """What happens to one quantized Linear (or expert projection)."""

    name: str
    algo: str
    scheme: str
    target: str
    inputs: list[str]
    outputs: list[str]
    folds: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    modules: list[ModulePlan]
    groups: list[Group]
    passthrough: list[str]
    runtime_pre_quant_scale: list[str]
    tensors: dict[str, TensorInfo]
    warnings: list[str] = field(default_factory=list)
    # Quantized modules whose tensors stream as ModelOpt exported them, for an engine's own ModelOpt
    # method (lazyxform.open's `as_exported`); the config still lists their compressed-tensors scheme.
    as_exported: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        """A summary of a few lines; `to_json()` has everything."""

        def count(n: int, noun: str) -> str:
            return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

        def some(names: Sequence[str], shown: int = 3) -> str:
            return ", ".join(names[:shown]) + (f", ... and {len(names) - shown} more" if len(names) > shown else "")

        def clip(text: str, width: int = 200) -> str:
            return text if len(text) <= width else text[: width - 3] + "..."

        lines = [
            f"Plan({count(len(self.modules), 'quantized module')}, {count(len(self.groups), 'tensor group')}, "
            f"{count(len(self.passthrough), 'passthrough tensor')}, "
            f"{count(len(self.runtime_pre_quant_scale), 'runtime pre_quant_scale module')}, "
            f"{count(len(self.tensors), 'checkpoint tensor')}, {count(len(self.warnings), 'warning')})"
        ]
        lines += [f"  {m.name}: {m.algo} -> {m.scheme} ({m.target})" for m in self.modules[:REPR_ROWS]]
        if len(self.modules) > REPR_ROWS:
            lines.append(f"  ... and {len(self.modules) - REPR_ROWS} more modules")
        if self.passthrough:
            lines.append(f"  passthrough: {some(self.passthrough)}")
        if self.runtime_pre_quant_scale:
            lines.append(f"  runtime pre_quant_scale: {some(self.runtime_pre_quant_scale)}")
        if self.as_exported:
            lines.append(f"  as exported: {some(self.as_exported)}")
        lines += [f"  warning: {clip(w)}" for w in self.warnings[:REPR_ROWS]]
        if len(self.warnings) > REPR_ROWS:
            lines.append(f"  ... and {len(self.warnings) - REPR_ROWS} more warnings")
        return "\n".join(lines)

    def group_of(self) -> dict[str, Group]:
        return {name: g for g in self.groups for name in g.inputs}

    def to_json(self) -> dict[str, Any]:
        return {
            "modules": [vars(m) for m in self.modules],
            "runtime_pre_quant_scale": self.runtime_pre_quant_scale,
            "passthrough": self.passthrough,
            "as_exported": self.as_exported,
            "groups": [{"inputs": list(g.inputs), "outputs": list(g.outputs), "rules": [r.label for r in g.rules]} for g in self.groups],
            "warnings": self.warnings,
        }


def coalesce(rules: list[Rule]) -> list[Group]:
    """Union rules that share an input into groups, keeping first-seen order."""
    owner: dict[str, int] = {}
    parent: list[int] = list(range(len(rules)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, rule in enumerate(rules):
        for name in rule.inputs:
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    groups: dict[int, Group] = {}
    for i, rule in enumerate(rules):
        groups.setdefault(find(i), Group([])).rules.append(rule)
    result = list(groups.values())
    seen: set[str] = set()
    for g in result:
        for name in g.outputs:
            assert name not in seen, f"two rules produce {name}"
            seen.add(name)
    return result
