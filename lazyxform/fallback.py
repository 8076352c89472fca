"""Modules whose ModelOpt format has no compressed-tensors equivalent (NVFP4_SVD).

fallback="dequantize" (the default, so every ModelOpt checkpoint loads): the module's weight is
computed in fp32 from all its tensors and rounded once to the model dtype, a LazyxformWarning names
the modules, and the compressed-tensors config lists them in `ignore` so the engine builds plain
Linear layers for them. fallback="error": UnsupportedAlgoError instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from .errors import UnsupportedAlgoError
from .plan import ModulePlan
from .recipes.base import PQS, Module, Recipe

Fallback = Literal["dequantize", "error"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)


@dataclass
class DenseFallback:
    modules: dict[str, tuple[Module, Recipe]]
    warning: str | None

    def module_plans(self) -> list[ModulePlan]:
        return [
            ModulePlan(
                name=name,
                algo=m.cfg.algo,
                scheme="ignore",
                target=f"dequantized to {str(m.model_dtype).removeprefix('torch.')}: {m.cfg.algo} has no compressed-tensors scheme",
                inputs=sorted(m.tensors),
                outputs=["weight"],
                folds=["pre_quant_scale multiplied into the weight's columns"] if PQS in m.tensors else [],
                warnings=["dequantized"],
            )
            for name, (m, _) in self.modules.items()
        ]


def plan_dense_fallback(dense: dict[str, tuple[Module, Recipe]], fallback: Fallback, dtype: torch.dtype) -> DenseFallback:
    """The modules whose recipe has no target (`dense`): kept for `dense_rules`, or refused."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if not dense:
        return DenseFallback({}, None)
    algos = "/".join(sorted({m.cfg.algo for m, _ in dense.values()}))
    names = ", ".join(dense)
    if fallback == "error":
        raise UnsupportedAlgoError(f"{algos} has no compressed-tensors equivalent and fallback='error' forbids dequantizing {len(dense)} modules: {names}")
    warning = (
        f"{algos} has no compressed-tensors equivalent: {len(dense)} modules are dequantized to "
        f"{str(dtype).removeprefix('torch.')} (more memory, unquantized activations): {names}"
    )
    return DenseFallback(dense, warning)
