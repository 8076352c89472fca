"""Executes a plan over any (name, tensor) stream, in any order, holding only incomplete groups.

On a GPU, complete groups run in batches on a CUDA stream of their own. The consumer's stream
waits for a batch on the device, not the host. The batch's value checks (scales finite and > 0,
fused siblings equal) are computed in a few kernels per batch and read back one batch later, so
no tensor costs a host sync and a bad value raises at most one batch after its group was yielded.
(Running batches on a worker thread instead was measured slower: the two threads' GIL hand-overs
cost more than the launches they would overlap.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from . import profile
from .checks import Check, collect, settle, verdict
from .errors import CorruptSafetensorsError, MissingTensorError, TensorMismatchError
from .plan import Group, Many, Plan, Rule, checked_outputs, run_many

# A batch runs on a GPU once it holds this many input bytes or groups: large enough that the
# per-batch costs (stream hand-over, check read-back) vanish, small enough to hold only a few
# layers' tensors, and short enough (host time to launch it) not to stall the reader threads.
DEFAULT_BATCH_BYTES = 256 << 20
BATCH_GROUPS = 32
Pair = tuple[str, torch.Tensor]
Held = dict[str, torch.Tensor]


def check_matches_header(plan: Plan, name: str, tensor: torch.Tensor) -> None:
    info = plan.tensors.get(name)
    if info is not None and (tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape):
        raise TensorMismatchError(
            f"{name}: the stream gave {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} "
            f"but {info.file.name} declares {info.describe()}"
        )


def rewrite(plan: Plan, pairs: Iterable[Pair], device: torch.device, batch_bytes: int | None = None) -> Iterator[Pair]:
    """Yield compressed-tensors pairs once each group's inputs have all arrived.

    Tensors outside every group pass through untouched. A group still incomplete when the input
    ends is an error: silently dropping it would leave engine parameters uninitialised.
    `batch_bytes` > 0 (default: DEFAULT_BATCH_BYTES on a GPU, 0 on the CPU) runs complete groups
    in batches of that many input bytes, their checks settled one batch late; 0 runs each group
    as soon as it is complete and checks it on the spot."""
    if batch_bytes is None:
        batch_bytes = DEFAULT_BATCH_BYTES if device.type == "cuda" else 0
    prof = profile.current()
    group_of = plan.group_of()
    pending: dict[int, Held] = {}
    batch = Batch(device, deferred=batch_bytes > 0, prof=prof)
    for name, tensor in prof.timed(pairs, "source: next input"):
        prof.advance(tensor.nbytes)
        group = group_of.get(name)
        if group is None:
            yield name, tensor
        else:
            check_matches_header(plan, name, tensor)
            held = pending.setdefault(id(group), {})
            if name in held:
                raise CorruptSafetensorsError(f"{name}: received twice in one load")
            held[name] = tensor.to(device, non_blocking=True)
            if len(held) == len(group.inputs):
                batch.add(group, pending.pop(id(group)))
                if batch.nbytes >= batch_bytes or len(batch.groups) >= BATCH_GROUPS:
                    yield from batch.run()
            del held
        # Dropped before the next tensor is read: only incomplete groups and the batch stay alive.
        del tensor
    yield from batch.run()
    batch.settle()
    if pending:
        raise MissingTensorError(_describe_missing(plan, pending))


@functools.cache
def transform_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every load of the process: PyTorch's caching allocator keeps
    freed blocks per stream, so a later load (or batch) reuses them instead of calling cudaMalloc."""
    return torch.cuda.Stream(device)


class Batch:
    """Complete groups waiting to run together, and the unsettled checks of the last batch run."""

    def __init__(self, device: torch.device, deferred: bool, prof: profile.Profiler) -> None:
        self.device = device
        self.deferred = deferred
        self.prof = prof
        self.groups: list[tuple[Group, Held]] = []
        self.nbytes = 0
        self.stream = transform_stream(device) if device.type == "cuda" else None
        self._unsettled: tuple[list[Check], torch.Tensor, Any] | None = None

    def add(self, group: Group, held: Held) -> None:
        self.groups.append((group, held))
        self.nbytes += sum(t.nbytes for t in held.values())

    def run(self) -> Iterator[Pair]:
        groups, self.groups, self.nbytes = self.groups, [], 0
        if not groups:
            return
        # The two streams meet at every batch, which makes memory reuse safe without record_stream
        # (an event per tensor when it is freed): inputs, allocated on the consumer's stream, are
        # released only after that stream waited for the batch; outputs, allocated here, are reused
        # only by a later batch, which first waits for the consumer's stream, so for everything the
        # consumer did with them.
        consumer = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if self.stream is not None:
            self.stream.wait_stream(consumer)
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with on_stream, collect() if self.deferred else nullcontext([]) as checks:
            outputs = self._run_all(groups)
            unsettled = self._read_back(checks)
        if self.stream is not None:
            consumer.wait_stream(self.stream)
        self.settle()
        self._unsettled = unsettled
        for out in outputs:
            yield from out.items()

    def settle(self) -> None:
        """Raise (or warn) for the failed checks of the previous batch, if any."""
        if self._unsettled is None:
            return
        checks, ok, done = self._unsettled
        self._unsettled = None
        if done is not None:
            with self.prof.host("waiting: checks"):
                done.synchronize()
        if not bool(ok):
            settle(checks)

    def _run_all(self, groups: list[tuple[Group, Held]]) -> list[Held]:
        """Every rule of the batch; rules sharing a `many` run through it together, after the others."""
        outputs: list[Held] = [{} for _ in groups]
        together: dict[Many, list[tuple[int, Rule, Held]]] = {}
        for i, (group, held) in enumerate(groups):
            for rule in group.rules:
                inputs = {n: held[n] for n in rule.inputs}
                if rule.many is not None:
                    together.setdefault(rule.many, []).append((i, rule, inputs))
                    continue
                with self._span([rule], inputs.values()):
                    outputs[i].update(checked_outputs(rule, rule.fn(inputs)))
        for many, work in together.items():
            with self._span([r for _, r, _ in work], (t for _, _, inputs in work for t in inputs.values())):
                produced = run_many(many, [(r, inputs) for _, r, inputs in work])
            for (i, _, _), out in zip(work, produced, strict=True):
                outputs[i].update(out)
        return outputs

    def _span(self, rules: list[Rule], inputs: Iterable[torch.Tensor]) -> AbstractContextManager[Any]:
        if not self.prof.enabled:
            return nullcontext()
        return self.prof.device_span(profile.rule_stage(r.label for r in rules), sum(t.nbytes for t in inputs), "transforms")

    def _read_back(self, checks: list[Check]) -> tuple[list[Check], torch.Tensor, Any] | None:
        """Queue the batch's verdict and its transfer to the host; returns what `settle` needs."""
        if not checks:
            return None
        ok = verdict(checks, self.device)
        if self.stream is None:
            return checks, ok, None
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(ok, non_blocking=True)
        return checks, host, torch.cuda.current_stream(self.device).record_event()


def _describe_missing(plan: Plan, pending: dict[int, dict[str, torch.Tensor]]) -> str:
    groups: dict[int, Group] = {id(g): g for g in plan.groups}
    lines = []
    for gid, held in list(pending.items())[:5]:
        missing = [n for n in groups[gid].inputs if n not in held]
        lines.append(f"  have {sorted(held)}, missing {missing}")
    more = f"\n  ... and {len(pending) - 5} more groups" if len(pending) > 5 else ""
    return f"the weight stream ended with {len(pending)} incomplete tensor groups:\n" + "\n".join(lines) + more
