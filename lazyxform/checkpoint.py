"""`open()`: a ModelOpt export presented as a compressed-tensors checkpoint, produced lazily."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .modelopt import ModelOptConfig, read_modelopt_config
from .plan import Plan
from .planner import build_plan
from .shards import ShardReader, TensorInfo, index_checkpoint
from .stream import rewrite


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Checkpoint:
    """Built from config files and safetensors headers only; tensor data is read on iteration."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else default_device()
        self.modelopt_config: ModelOptConfig
        self.modelopt_config, raw_config = read_modelopt_config(self.path)
        tensors = index_checkpoint(self.path)
        self.plan: Plan
        self.plan, self.quantization_config = build_plan(self.modelopt_config, tensors, raw_config)
        self.hf_config: dict[str, Any] = copy.deepcopy(raw_config)
        self.hf_config["quantization_config"] = copy.deepcopy(self.quantization_config)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor, reading the checkpoint in file order, one group in memory at a time."""
        reader = ShardReader()
        try:
            for infos in self._read_units():
                pairs = ((i.name, reader.read(i)) for i in infos)
                yield from rewrite(self.plan, pairs, self.device)
        finally:
            reader.close()

    def wrap(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The same rewrite over (name, tensor) pairs read elsewhere from this checkpoint, in any order."""
        return rewrite(self.plan, pairs, self.device)

    def _read_units(self) -> list[list[TensorInfo]]:
        """Groups and lone tensors, ordered by where their first byte lies, so reads run forward."""
        tensors = self.plan.tensors
        units = [[tensors[n] for n in g.inputs] for g in self.plan.groups]
        units += [[tensors[n]] for n in self.plan.passthrough]
        return sorted(units, key=lambda u: min((i.file.name, i.start) for i in u))


def open(path: str | Path, device: str | torch.device | None = None) -> Checkpoint:  # noqa: A001
    """Open a ModelOpt checkpoint directory. `device=None` picks cuda when available, else cpu."""
    return Checkpoint(path, device)
