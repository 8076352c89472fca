"""Which ModelOpt checkpoints lazyxform serves instead of SGLang's own ModelOpt support."""

from __future__ import annotations

import os
from typing import Literal, get_args

from packaging.version import Version

ROUTE_ENV = "LAZYXFORM_SGLANG_ROUTE"
Route = Literal["auto", "all", "off"]
ROUTES: tuple[str, ...] = get_args(Route)

# The ModelOpt quant_algo values SGLang loads itself: ModelOptFp4Config.from_config and
# ModelConfig._parse_modelopt_quant_config (layers/quantization/modelopt_quant.py,
# configs/model_config.py). 0.5.17 takes FP8, NVFP4 and NVFP4_AWQ; 0.5.23 adds W4A16_NVFP4 and
# MXFP8 (its "mxfp8" method). Releases in between were not read: there lazyxform serves those two.
SGLANG_NATIVE_ALGOS = frozenset({"FP8", "NVFP4", "NVFP4_AWQ"})
SGLANG_0_5_23_NATIVE_ALGOS = SGLANG_NATIVE_ALGOS | {"W4A16_NVFP4", "MXFP8"}


def route() -> Route:
    """auto (default): serve what SGLang cannot load natively; all: every ModelOpt checkpoint; off: none."""
    value = os.environ.get(ROUTE_ENV, "").strip().lower() or "auto"
    if value not in ROUTES:
        raise ValueError(f"{ROUTE_ENV}={value!r}: expected one of {', '.join(ROUTES)}")
    return value  # type: ignore[return-value]


def native_algos(sglang_version: str) -> frozenset[str]:
    return SGLANG_0_5_23_NATIVE_ALGOS if Version(sglang_version) >= Version("0.5.23") else SGLANG_NATIVE_ALGOS


def serves(algos: set[str], mode: Route, sglang_version: str, on_cpu: bool) -> bool:
    """Whether lazyxform serves a checkpoint with these (canonical, per-layer) quant_algo values. On a
    CPU, `auto` serves every ModelOpt checkpoint: SGLang's ModelOpt kernels need a GPU, lazyxform's
    portable kernels run on a CPU. A MIXED_PRECISION checkpoint counts as native when each of its
    algos is."""
    if mode != "auto":
        return mode == "all"
    return on_cpu or not algos <= native_algos(sglang_version)
