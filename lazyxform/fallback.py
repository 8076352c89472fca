"""Quantized modules streamed as dense model-dtype weights, listed in the compressed-tensors `ignore`.

Formats with no compressed-tensors equivalent (NVFP4_SVD): fallback="dequantize" (the default, so
every ModelOpt checkpoint loads): the module's weight is computed in fp32 from all its tensors and
rounded once to the model dtype, a LazyxformWarning names the modules, and the compressed-tensors
config lists them in `ignore` so the engine builds plain Linear layers for them. fallback="error":
UnsupportedAlgoError instead.

Routed experts whose gate/up pre_quant_scale is not one vector for the whole layer (DeepSeek-V3's
INT4 AWQ export: it differs per expert), when the engine asks for it (experts_input_scale="dense"):
the engines' fused-MoE kernels run every expert of a layer on one input, so those scales cannot be
applied at run time; every expert weight of such a layer becomes W = dequant(W_e) * s_e (s_e over
the input columns, each projection its own scale, down_proj's included), formed exactly in float64
and rounded once to the model dtype, and the engine builds its unquantized fused MoE for the layer.
The default, experts_input_scale="runtime", keeps the scales for an engine kernel that scales each
expert's input (lazyxform's portable CPU fused-MoE kernel).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from .errors import UnsupportedAlgoError
from .plan import ModulePlan
from .recipes.base import PQS, Module, Recipe
from .shards import TensorInfo

Fallback = Literal["dequantize", "error"]
FALLBACKS: tuple[str, ...] = get_args(Fallback)
ExpertsInputScale = Literal["runtime", "dense"]
EXPERTS_INPUT_SCALES: tuple[str, ...] = get_args(ExpertsInputScale)
# Reads the given tensors' values (checkpoint.py passes reader.read_each).
Read = Callable[[Sequence[TensorInfo]], Iterable[tuple[str, torch.Tensor]]]

# A routed expert's projection: `<layer>.experts.<e>.<leaf>`; gate/up are the leaves that read the MoE input.
EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")
EXPERT_INPUT_LEAVES = frozenset({"gate_proj", "up_proj", "w1", "w3"})


@dataclass
class DenseFallback:
    modules: dict[str, tuple[Module, Recipe]]
    warning: str | None
    reason: str = ""  # why, in each module's plan; the format's own reason when empty

    def module_plans(self) -> list[ModulePlan]:
        return [
            ModulePlan(
                name=name,
                algo=m.cfg.algo,
                scheme="ignore",
                target=f"dequantized to {str(m.model_dtype).removeprefix('torch.')}: {self.reason or f'{m.cfg.algo} has no compressed-tensors scheme'}",
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


def plan_dense_experts(
    modules: dict[str, tuple[Module, Recipe]], choice: ExpertsInputScale, read: Read | None, dtype: torch.dtype
) -> DenseFallback:
    """choice="dense": every expert module of the MoE layers whose experts' gate/up pre_quant_scale
    is not one vector (see the module docstring), where each recipe there can dequantize; else none."""
    if choice not in EXPERTS_INPUT_SCALES:
        raise ValueError(f"experts_input_scale must be one of {EXPERTS_INPUT_SCALES}, got {choice!r}")
    if choice == "runtime":
        return DenseFallback({}, None)
    layers: dict[str, list[str]] = {}  # `<layer>.experts` -> its expert modules
    scaled: dict[str, TensorInfo] = {}  # expert gate/up module -> its pre_quant_scale
    for name, (m, _) in modules.items():
        if match := EXPERT.match(name):
            layers.setdefault(match["experts"], []).append(name)
            if match["leaf"] in EXPERT_INPUT_LEAVES and PQS in m.tensors:
                scaled[name] = m.info(PQS)
    if not scaled:
        return DenseFallback({}, None)
    if read is None:
        raise ValueError('experts_input_scale="dense" needs the checkpoint\'s pre_quant_scale values (a `read` function)')
    # Headers cannot tell whether the scales differ: their values decide. Read only these
    # [hidden] vectors (two per expert), once per plan (the plan is cached per checkpoint state).
    values = dict(read(sorted(scaled.values(), key=lambda i: (i.file.name, i.start))))
    dense: dict[str, tuple[Module, Recipe]] = {}
    for names in layers.values():
        vectors = [values[scaled[n].name] for n in names if n in scaled]
        can = all(type(modules[n][1]).dense_rules is not Recipe.dense_rules for n in names)
        if vectors and can and not all(torch.equal(v, vectors[0]) for v in vectors):
            dense.update((n, modules[n]) for n in names)
    if not dense:
        return DenseFallback({}, None)
    layer_names = sorted(layer for layer, names in layers.items() if names[0] in dense)
    dtype_name = str(dtype).removeprefix("torch.")
    dense_bytes = sum(out * inp for out, inp in (r.weight_shape(m) for m, r in dense.values())) * dtype.itemsize
    # As the engine would hold them quantized: the stored weight codes, the weight scales in the model dtype.
    quantized_bytes = sum(m.info("weight").nbytes + math.prod(m.info("weight_scale").shape) * dtype.itemsize for m, _ in dense.values())
    elements = dense_bytes // dtype.itemsize
    warning = (
        f"{', '.join(layer_names)}: the routed experts' gate/up pre_quant_scale differs between experts, and the "
        f"engine's fused-MoE kernel runs every expert on one input: their {len(dense)} expert weights are "
        f"dequantized to {dtype_name} with each scale multiplied into its weight's input columns (exact up to one "
        f"rounding to {dtype_name}), listed in `ignore`, and run by the engine's unquantized fused MoE "
        f"(unquantized GEMMs, {dtype_name} activations). Memory: {dtype.itemsize} bytes per weight instead of "
        f"{quantized_bytes / elements:.3g} (packed codes + scales in {dtype_name}): {dense_bytes / 2**20:.3g} MiB instead of {quantized_bytes / 2**20:.3g} MiB"
    )
    return DenseFallback(dense, warning, "the experts' gate/up pre_quant_scale differs between experts")
