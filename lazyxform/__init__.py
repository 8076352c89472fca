"""lazyxform: serve NVIDIA ModelOpt checkpoints through compressed-tensors engines, rewritten at load time."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint, open
from .errors import (
    BadScaleError,
    ConfigError,
    CorruptSafetensorsError,
    InconsistentScalesError,
    LazyxformError,
    LazyxformWarning,
    MissingTensorError,
    NotAModelOptCheckpoint,
    TensorMismatchError,
    UnexpectedTensorError,
    UnsafePathError,
    UnsupportedAlgoError,
)
from .modelopt import is_modelopt_checkpoint, read_modelopt_config


def read_modelopt_algos(path: str | Path) -> set[str]:
    """Canonical quant_algo names a checkpoint uses (per-layer ones included), without reading weights."""
    cfg, _ = read_modelopt_config(path)
    return cfg.algos()


__all__ = [
    "BadScaleError",
    "Checkpoint",
    "ConfigError",
    "CorruptSafetensorsError",
    "InconsistentScalesError",
    "LazyxformError",
    "LazyxformWarning",
    "MissingTensorError",
    "NotAModelOptCheckpoint",
    "TensorMismatchError",
    "UnexpectedTensorError",
    "UnsafePathError",
    "UnsupportedAlgoError",
    "is_modelopt_checkpoint",
    "open",
    "read_modelopt_algos",
]
