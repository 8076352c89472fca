"""Executes a plan over any (name, tensor) stream, in any order, holding only incomplete groups."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .errors import CorruptSafetensorsError, MissingTensorError, TensorMismatchError
from .plan import Group, Plan


def check_matches_header(plan: Plan, name: str, tensor: torch.Tensor) -> None:
    info = plan.tensors.get(name)
    if info is not None and (tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape):
        raise TensorMismatchError(
            f"{name}: the stream gave {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} "
            f"but {info.file.name} declares {info.describe()}"
        )


def rewrite(plan: Plan, pairs: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield compressed-tensors pairs as soon as each group's inputs have all arrived.

    Tensors outside every group pass through untouched. A group still incomplete when the input
    ends is an error: silently dropping it would leave engine parameters uninitialised."""
    group_of = plan.group_of()
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        group = group_of.get(name)
        if group is None:
            yield name, tensor
            continue
        check_matches_header(plan, name, tensor)
        held = pending.setdefault(id(group), {})
        if name in held:
            raise CorruptSafetensorsError(f"{name}: received twice in one load")
        held[name] = tensor.to(device, non_blocking=True)
        if len(held) == len(group.inputs):
            del pending[id(group)]
            yield from group.run(held).items()
    if pending:
        raise MissingTensorError(_describe_missing(plan, pending))


def _describe_missing(plan: Plan, pending: dict[int, dict[str, torch.Tensor]]) -> str:
    groups: dict[int, Group] = {id(g): g for g in plan.groups}
    lines = []
    for gid, held in list(pending.items())[:5]:
        missing = [n for n in groups[gid].inputs if n not in held]
        lines.append(f"  have {sorted(held)}, missing {missing}")
    more = f"\n  ... and {len(pending) - 5} more groups" if len(pending) > 5 else ""
    return f"the weight stream ended with {len(pending)} incomplete tensor groups:\n" + "\n".join(lines) + more
