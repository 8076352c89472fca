"""`open()`: a ModelOpt export presented as a compressed-tensors checkpoint, produced lazily."""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import LazyxformWarning, NotAModelOptCheckpoint
from .fallback import ExpertsInputScale, Fallback
from .modelopt import ModelOptConfig, read_modelopt_config
from .plan import Plan
from .planner import plan_and_config
from .reader import read_each, read_tensors
from .shards import TensorInfo, index_checkpoint
from .stream import rewrite

# How many checkpoints' plans a process keeps: engines open the same checkpoint several times
# (config, then weights, in each worker), rarely more than one checkpoint.
PLANS_CACHED = 8


class CheckpointNotFoundError(NotAModelOptCheckpoint):
    """The checkpoint path does not exist (a subclass of NotAModelOptCheckpoint, which it used to be reported as)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Checkpoint:
    """Built from config files and safetensors headers only; tensor data is read on iteration.

    This is the surface every engine integration uses: `quantization_config` / `hf_config` (what
    the engine should believe the checkpoint is), `wrap(pairs)` (its weight stream, rewritten),
    `runtime_pre_quant_scale` (modules whose input the engine must scale at run time) and
    `dense_modules` (modules dequantized to a plain weight, listed in the config's `ignore`). The
    plan behind them is built once per process for an unchanged checkpoint directory, whatever the
    device, so an engine may open the same checkpoint wherever it needs it."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device | None = None,
        fallback: Fallback = "dequantize",
        staging_bytes: int | None = None,
        experts_input_scale: ExpertsInputScale = "runtime",
        as_exported: Collection[str] = (),
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointNotFoundError(f"{self.path}: path does not exist")
        self.device = torch.device(device) if device is not None else default_device()
        self.staging_bytes = staging_bytes
        self.modelopt_config: ModelOptConfig
        self.plan: Plan
        self.modelopt_config, self._raw_config, self.plan, self._build_config = _planned(
            self.path.resolve(), fallback, experts_input_scale, frozenset(as_exported), _signature(self.path)
        )
        for warning in self.plan.warnings:
            warnings.warn(warning, LazyxformWarning, stacklevel=3)  # the caller of lazyxform.open

    @property
    def quantization_config(self) -> dict[str, Any]:
        """The compressed-tensors quantization_config; built on first use (it imports compressed-tensors)."""
        return copy.deepcopy(self._build_config())

    @functools.cached_property
    def hf_config(self) -> dict[str, Any]:
        """config.json as the engine should see it: quantization_config replaced by the compressed-tensors one."""
        hf_config = copy.deepcopy(self._raw_config)
        hf_config["quantization_config"] = self.quantization_config
        return hf_config

    @property
    def runtime_pre_quant_scale(self) -> list[str]:
        """Checkpoint names of the modules whose input the engine multiplies by `<module>.pre_quant_scale`
        (the stream yields that tensor); the others' scales were folded into weights."""
        return list(self.plan.runtime_pre_quant_scale)

    @property
    def dense_modules(self) -> list[str]:
        """Quantized modules whose format has no compressed-tensors scheme, streamed as a plain weight."""
        return [m.name for m in self.plan.modules if m.scheme == "ignore"]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor in the checkpoint: what a load reads."""
        return sum(i.nbytes for i in self.plan.tensors.values())

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor, reading the checkpoint in file order. On a GPU, reads, copies and
        transforms overlap through `staging_bytes` of pinned host memory (see reader.py); on the
        CPU one group is in memory at a time."""
        yield from rewrite(self.plan, read_tensors(self.read_order(), self.device, self.staging_bytes), self.device)

    def wrap(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The same rewrite over (name, tensor) pairs read elsewhere from this checkpoint, in any order."""
        return rewrite(self.plan, pairs, self.device)

    def read_order(self) -> list[TensorInfo]:
        """Every tensor in the order iteration reads them: each group's inputs together, forward through the files."""
        return [info for unit in self._read_units() for info in unit]

    def _read_units(self) -> list[list[TensorInfo]]:
        """Groups and lone tensors, ordered by where their first byte lies, so reads run forward."""
        tensors = self.plan.tensors
        units = [[tensors[n] for n in g.inputs] for g in self.plan.groups]
        units += [[tensors[n]] for n in self.plan.passthrough]
        return sorted(units, key=lambda u: min((i.file.name, i.start) for i in u))


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What a cached plan depends on: name, size and modification time of every config and shard.
    (A file that cannot be stat'ed, a broken or looping link, counts as such; planning names it.)"""

    def stamp(entry: os.DirEntry[str]) -> tuple[str, int, int]:
        try:
            st = entry.stat()
        except OSError:
            return entry.name, -1, -1
        return entry.name, st.st_size, st.st_mtime_ns

    if not path.is_dir():
        return ()  # planning refuses it
    with os.scandir(path) as entries:
        return tuple(sorted(stamp(e) for e in entries if e.name.endswith((".json", ".safetensors"))))


@functools.lru_cache(maxsize=PLANS_CACHED)
def _planned(
    path: Path,
    fallback: Fallback,
    experts_input_scale: ExpertsInputScale,
    as_exported: frozenset[str],
    signature: tuple[tuple[str, int, int], ...],
) -> tuple[ModelOptConfig, dict[str, Any], Plan, Callable[[], dict[str, Any]]]:
    """Config, plan and config builder of one checkpoint state (`signature` is only the cache key)."""
    modelopt_config, raw_config = read_modelopt_config(path)
    tensors = index_checkpoint(path)
    plan, build_config = plan_and_config(modelopt_config, tensors, raw_config, fallback, experts_input_scale, read_each, as_exported)
    return modelopt_config, raw_config, plan, functools.cache(build_config)


def open(  # noqa: A001
    path: str | Path,
    device: str | torch.device | None = None,
    fallback: Fallback = "dequantize",
    staging_bytes: int | None = None,
    experts_input_scale: ExpertsInputScale = "runtime",
    as_exported: Collection[str] = (),
) -> Checkpoint:
    """Open a ModelOpt checkpoint directory. `device=None` picks cuda when available, else cpu.
    `fallback` decides what happens to modules whose format has no compressed-tensors scheme
    (NVFP4_SVD): "dequantize" them to the model dtype with a warning, or raise ("error").
    `staging_bytes` bounds the pinned host memory of a GPU load (default 256 MiB).
    `experts_input_scale`: where routed experts' gate/up pre_quant_scales differ between the experts
    of a layer, "runtime" (default) keeps them for an engine kernel that scales each expert's input
    (`runtime_pre_quant_scale`); "dense", for an engine whose fused-MoE kernel takes one input for
    all experts, streams those layers' experts as dense model-dtype weights with the scales
    multiplied in (`dense_modules`; planning then reads those scale vectors, not only headers).
    `as_exported`: names of quantized modules that the engine loads with its own ModelOpt method
    rather than a compressed-tensors scheme: their tensors stream as ModelOpt exported them (names,
    shapes, bytes; headers and float scale values checked), while a pre_quant_scale of theirs is still
    folded or kept as planned; the config still lists their compressed-tensors scheme. A module
    fused with siblings into one GEMM comes with them (planning names what cannot)."""
    return Checkpoint(path, device, fallback, staging_bytes, experts_input_scale, as_exported)
