"""`open()`: a ModelOpt export presented as a compressed-tensors checkpoint, produced lazily."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import profile
from .errors import NotAModelOptCheckpoint
from .fallback import Fallback
from .modelopt import ModelOptConfig, read_modelopt_config
from .plan import Plan
from .planner import plan_and_config
from .reader import Reader
from .shards import ShardReader, TensorInfo, index_checkpoint
from .stream import rewrite


class CheckpointNotFoundError(NotAModelOptCheckpoint):
    """The checkpoint path does not exist (a subclass of NotAModelOptCheckpoint, which it used to be reported as)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Checkpoint:
    """Built from config files and safetensors headers only; tensor data is read on iteration."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device | None = None,
        fallback: Fallback = "dequantize",
        staging_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointNotFoundError(f"{self.path}: path does not exist")
        self.device = torch.device(device) if device is not None else default_device()
        self.staging_bytes = staging_bytes
        self.modelopt_config: ModelOptConfig
        self.modelopt_config, raw_config = read_modelopt_config(self.path)
        tensors = index_checkpoint(self.path)
        self.plan: Plan
        self.plan, self._build_config = plan_and_config(self.modelopt_config, tensors, raw_config, fallback)
        self._raw_config = raw_config

    @functools.cached_property
    def quantization_config(self) -> dict[str, Any]:
        """The compressed-tensors quantization_config; built on first use (it imports compressed-tensors)."""
        return self._build_config()

    @functools.cached_property
    def hf_config(self) -> dict[str, Any]:
        """config.json as the engine should see it: quantization_config replaced by the compressed-tensors one."""
        hf_config = copy.deepcopy(self._raw_config)
        hf_config["quantization_config"] = copy.deepcopy(self.quantization_config)
        return hf_config

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor, reading the checkpoint in file order. On a GPU, reads, copies and
        transforms overlap through `staging_bytes` of pinned host memory (see reader.py); on the
        CPU one group is in memory at a time."""
        order = self.read_order()
        pairs = Reader(order, self.device, self.staging_bytes) if self.device.type == "cuda" else _read_each(order)
        yield from rewrite(self.plan, pairs, self.device)

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


def _read_each(order: list[TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """On the CPU each tensor is read straight into its own memory: staging would only add a copy."""
    prof = profile.current()
    reader = ShardReader()

    def read(info: TensorInfo) -> torch.Tensor:
        with prof.host("read", info.nbytes):
            return reader.read(info)

    try:
        for info in order:
            yield info.name, read(info)
    finally:
        reader.close()


def open(  # noqa: A001
    path: str | Path,
    device: str | torch.device | None = None,
    fallback: Fallback = "dequantize",
    staging_bytes: int | None = None,
) -> Checkpoint:
    """Open a ModelOpt checkpoint directory. `device=None` picks cuda when available, else cpu.
    `fallback` decides what happens to modules whose format has no compressed-tensors scheme
    (NVFP4_SVD): "dequantize" them to the model dtype with a warning, or raise ("error").
    `staging_bytes` bounds the pinned host memory of a GPU load (default 256 MiB)."""
    return Checkpoint(path, device, fallback, staging_bytes)
