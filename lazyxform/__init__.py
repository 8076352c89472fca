"""lazyxform: serve NVIDIA ModelOpt checkpoints through compressed-tensors engines, rewritten at load time.

The heavy parts (torch, compressed-tensors) load on first use of `open`, `Checkpoint`,
`is_modelopt_checkpoint`, `read_modelopt_config` or a submodule, so `lazyxform --help` and
`lazyxform --version` start without them (`lazyxform.cli` imports this package first).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    UnplaceableModuleError,
    UnsafePathError,
    UnsupportedAlgoError,
)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, CheckpointNotFoundError, open
    from .modelopt import is_modelopt_checkpoint
    from .modelopt import read_modelopt_config as read_modelopt_config  # not in __all__, as before

# Public names that live in heavy modules: attribute -> module that defines it.
_LAZY = {
    "Checkpoint": "checkpoint",
    "CheckpointNotFoundError": "checkpoint",
    "open": "checkpoint",
    "is_modelopt_checkpoint": "modelopt",
    "read_modelopt_config": "modelopt",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_"):
        # `import lazyxform; lazyxform.stream...` worked while this file imported everything eagerly.
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})


def version() -> str:
    """The installed distribution's version; the source tree's pyproject.toml when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lazyxform")
    except PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == "lazyxform" and isinstance(project.get("version"), str):
            return project["version"]
    except (ImportError, OSError, ValueError):
        pass
    return "unknown"


def read_modelopt_algos(path: str | Path) -> set[str]:
    """Canonical quant_algo names a checkpoint uses (per-layer ones included), without reading weights."""
    from .modelopt import read_modelopt_config

    cfg, _ = read_modelopt_config(path)
    return cfg.algos()


__all__ = [
    "BadScaleError",
    "Checkpoint",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptSafetensorsError",
    "InconsistentScalesError",
    "LazyxformError",
    "LazyxformWarning",
    "MissingTensorError",
    "NotAModelOptCheckpoint",
    "TensorMismatchError",
    "UnexpectedTensorError",
    "UnplaceableModuleError",
    "UnsafePathError",
    "UnsupportedAlgoError",
    "is_modelopt_checkpoint",
    "open",
    "read_modelopt_algos",
]
