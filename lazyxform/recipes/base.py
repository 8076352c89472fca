"""What every recipe shares: the module it works on, header checks, scale checks."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..checks import require, require_positive_finite
from ..errors import (
    BadScaleError,
    InconsistentScalesError,
    LazyxformWarning,
    MissingTensorError,
    TensorMismatchError,
    UnsupportedAlgoError,
)
from ..modelopt import AlgoConfig
from ..ops.pack import converted
from ..plan import Many, Rule, Tensors
from ..shards import TensorInfo

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs

PQS = "pre_quant_scale"  # AWQ / SmoothQuant / SVDQuant activation multiplier, [in]
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class RowFactor:
    """A consumer's `pre_quant_scale` [n] to multiply into rows first_row .. first_row + n - 1 of a
    producer's per-row scales: the rows that are the consumer's input (all of them, or the up half of
    a stored gate|up, the v rows of a stored q|k|v)."""

    name: str
    first_row: int = 0


@dataclass
class Module:
    """One quantized Linear as the checkpoint stores it: `tensors` maps suffix -> header entry."""

    name: str
    cfg: AlgoConfig
    tensors: dict[str, TensorInfo]
    model_dtype: torch.dtype

    def key(self, suffix: str) -> str:
        """The compressed-tensors name of this module's tensor `suffix`."""
        return f"{self.name}.{suffix}"

    def source(self, suffix: str) -> str:
        """The checkpoint name of the tensor read as `suffix`: another name when the recipe reads it
        under one (`Recipe.read_as`), else the same as `key`."""
        info = self.tensors.get(suffix)
        return info.name if info is not None else self.key(suffix)

    def info(self, suffix: str) -> TensorInfo:
        info = self.tensors.get(suffix)
        if info is None:
            raise MissingTensorError(
                f"{self.cfg.algo} module {self.name} has no {suffix!r} tensor "
                f"(found: {sorted(self.tensors)})"
            )
        return info


@dataclass(frozen=True)
class Args:
    """compressed-tensors QuantizationArgs, held as the fields that define them so that planning (and
    `lazyxform inspect`) does not import compressed-tensors, which takes seconds (it imports
    transformers). `resolve()` builds the real object when the config is built. `preset` names
    compressed-tensors' own preset args (name, "weights" | "input_activations"), taken as they are;
    the fields then only describe them (tests check they agree)."""

    num_bits: int
    type: str
    strategy: str
    dynamic: bool | str = False
    group_size: int | None = None
    block_structure: tuple[int, ...] | None = None
    symmetric: bool = True
    preset: tuple[str, str] | None = None

    def resolve(self) -> QuantizationArgs:
        if self.preset is not None:
            from compressed_tensors.quantization import preset_name_to_scheme

            name, role = self.preset
            return getattr(preset_name_to_scheme(name, ["Linear"]), role)
        from compressed_tensors.quantization import QuantizationArgs

        extra: dict[str, Any] = {}
        if self.group_size is not None:
            extra["group_size"] = self.group_size
        if self.block_structure is not None:
            extra["block_structure"] = list(self.block_structure)
        return QuantizationArgs(
            num_bits=self.num_bits, type=self.type, symmetric=self.symmetric, strategy=self.strategy, dynamic=self.dynamic, **extra
        )


# compressed-tensors presets the recipes use, described by the fields describe_target shows.
_NVFP4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
_MX = {"type": "float", "strategy": "group", "group_size": 32}
PRESETS: dict[tuple[str, str], Args] = {
    ("NVFP4", "weights"): Args(**_NVFP4, preset=("NVFP4", "weights")),
    ("NVFP4", "input_activations"): Args(**_NVFP4, dynamic="local", preset=("NVFP4", "input_activations")),
    ("NVFP4A16", "weights"): Args(**_NVFP4, preset=("NVFP4A16", "weights")),
    ("MXFP4", "weights"): Args(num_bits=4, **_MX, preset=("MXFP4", "weights")),
    ("MXFP4", "input_activations"): Args(num_bits=4, **_MX, dynamic=True, preset=("MXFP4", "input_activations")),
    ("MXFP8", "weights"): Args(num_bits=8, **_MX, preset=("MXFP8", "weights")),
    ("MXFP8", "input_activations"): Args(num_bits=8, **_MX, dynamic=True, preset=("MXFP8", "input_activations")),
}
# Presets without input activations (weight-only).
WEIGHT_ONLY_PRESETS = ("NVFP4A16",)


def preset_target(name: str, fmt: str) -> Target:
    """compressed-tensors' preset scheme `name` with format `fmt`."""
    acts = None if name in WEIGHT_ONLY_PRESETS else PRESETS[name, "input_activations"]
    return Target(PRESETS[name, "weights"], acts, fmt)


@dataclass(frozen=True)
class Target:
    """The compressed-tensors scheme a recipe produces (targets are filled in by the config builder)."""

    weights: Args
    input_activations: Args | None
    format: str


def describe_args(a: Any) -> str:
    """Quantization args (lazyxform's Args or compressed-tensors' QuantizationArgs) in a few words."""
    detail = {"group": f" g{a.group_size}", "tensor_group": f" g{a.group_size}", "block": f" {list(a.block_structure or ())}"}.get(a.strategy, "")
    return f"{a.type}{a.num_bits} {a.strategy}{detail}{' dynamic' if a.dynamic else ''}"


def describe_target(t: Target) -> str:
    acts = describe_args(t.input_activations) if t.input_activations else "none"
    return f"{t.format}: W {describe_args(t.weights)}, A {acts}"


class Recipe:
    """One ModelOpt number format -> one compressed-tensors scheme, plus the tensor rules.

    What a recipe reads and writes is declared once, as suffixes of a module's tensor names:
    - `reads`: what the checkpoint must hold for each module (a module may also carry
      `pre_quant_scale` and `bias`, which planning handles the same way for every recipe);
    - `shared`: those of `reads` that siblings fused into one GEMM share; `fused_rules` merges them,
      and planning then requires the whole fused set, in one format;
    - `writes`: the compressed-tensors tensors it produces.
    Planning checks the headers against `reads` and every rule the recipe makes against all three.
    A subclass that names `algos` (ModelOpt's quant_algo values, upper case) registers itself.
    """

    algos: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")
    shared: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")
    # Other checkpoint names of a tensor in `reads`: checkpoint suffix -> the suffix it is read as.
    read_as: ClassVar[dict[str, str]] = {}
    # True when per-output-row scales can absorb a factor exactly (pre_quant_scale row folds).
    row_scalable: ClassVar[bool] = False
    # The weight dimension along which two 4-bit values share a byte (None: one value per element).
    nibble_dim: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "algos" in cls.__dict__:
            register(cls())

    def target(self, cfg: AlgoConfig) -> Target | None:
        """The compressed-tensors scheme, or None when the format has none (the module is then
        dequantized by `dense_rules`, or refused, per the checkpoint's fallback policy)."""
        raise NotImplementedError

    def weight_shape(self, m: Module) -> tuple[int, int]:
        """The dense [out, in] shape of the stored (possibly nibble-packed) weight."""
        shape = list(m.info("weight").shape)
        if len(shape) != 2:
            raise TensorMismatchError(f"{m.info('weight').describe()}: expected a 2-D weight")
        if self.nibble_dim is not None:
            shape[self.nibble_dim] *= 2
        return shape[0], shape[1]

    def rules(self, m: Module, row_factor: RowFactor | None) -> list[Rule]:
        """Rules for the module's own tensors; `row_factor`: a consumer's scale to multiply into row scales."""
        raise NotImplementedError

    def dense_rules(self, m: Module) -> list[Rule]:
        """For recipes without a target: rules producing `<module>.weight` in the model dtype, consuming
        every tensor of the module (pre_quant_scale included)."""
        raise NotImplementedError

    def fused_rules(self, members: Sequence[Module]) -> list[Rule]:
        """Rules over the `shared` tensors of one set of siblings the engine runs as one GEMM (a lone
        module is a set of one); called only for recipes that share something."""
        return [self.input_scale_rule(members)]

    def input_scale_rule(self, members: Sequence[Module]) -> Rule:
        """Fused siblings (q/k/v, gate/up) share one activation scale in the engine: merge to the max,
        as vLLM does natively; ModelOpt exports them equal because the siblings see the same input."""
        names = tuple(m.key("input_scale") for m in members)
        for m in members:
            expect(m.info("input_scale"), (torch.float32,), ())

        def merge(t: Tensors) -> dict[str, torch.Tensor]:
            for n in names:
                check_scale(n, t[n])
            values = torch.stack([t[n].float().reshape(()) for n in names])
            merged = values.amax().reshape(1)

            def differ() -> None:
                warnings.warn(
                    f"activation scales of fused {', '.join(names)} differ ({values.tolist()}); using their max, "
                    "as vLLM does for a fused layer",
                    LazyxformWarning,
                    stacklevel=2,
                )

            require((values == merged).all(), differ)
            return {n: merged.clone() for n in names}

        return Rule("input_scale: 0-d -> [1], fused siblings -> max", names, names, merge)


RECIPES: dict[str, Recipe] = {}  # quant_algo -> its recipe; filled as the recipe modules load


def register(recipe: Recipe) -> None:
    if not set(recipe.shared) <= set(recipe.reads):
        raise TypeError(f"{type(recipe).__name__}: shared {recipe.shared} must be among reads {recipe.reads}")
    for algo in recipe.algos:
        if algo in RECIPES:
            raise TypeError(f"quant_algo {algo} is claimed by both {type(RECIPES[algo]).__name__} and {type(recipe).__name__}")
        RECIPES[algo] = recipe


def recipe_for(algo: str) -> Recipe:
    recipe = RECIPES.get(algo)
    if recipe is None:
        raise UnsupportedAlgoError(f"quant_algo {algo!r} is not supported (supported: {', '.join(sorted(RECIPES))})")
    return recipe


def expect(info: TensorInfo, dtypes: Sequence[torch.dtype], shape: Sequence[int]) -> None:
    """Header check: dtype in `dtypes` and exact shape; the error names file, tensor, expected and found."""
    if info.dtype not in dtypes or tuple(info.shape) != tuple(shape):
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TensorMismatchError(f"{info.describe()}: expected {want} {list(shape)}")


def block_count(m: Module, inp: int, block: int) -> int:
    """Scale blocks per row; ModelOpt rejects partial blocks, so a remainder means a foreign layout."""
    if inp % block:
        raise TensorMismatchError(f"{m.info('weight').describe()}: {inp} input columns are not a whole number of {block}-column blocks")
    return inp // block


def check_scale(name: str, t: torch.Tensor) -> None:
    """Scales must be finite and > 0: a zero or NaN scale would silently zero or poison the layer.
    (On a GPU the stream checks a whole batch's scales at once, and reads the verdict back later.)"""

    def fail() -> None:
        bad = ~torch.isfinite(t.float()) | (t.float() <= 0)
        idx = [int(i) for i in bad.nonzero()[0]] if t.dim() else []
        value = float(t.float()[tuple(idx)]) if t.dim() else float(t.float())
        raise BadScaleError(
            f"{name}: {int(bad.sum())} of {t.numel()} scale values are NaN, Inf, zero or negative "
            f"(first at index {idx}: {value})"
        )

    require_positive_finite(t, fail)


def check_equal(names: Sequence[str], t: Tensors, what: str) -> torch.Tensor:
    first = t[names[0]]
    for n in names[1:]:

        def fail(n: str = n) -> None:
            raise InconsistentScalesError(
                f"{what}: {names[0]} and {n} differ (max abs diff "
                f"{float((t[n].float() - first.float()).abs().max()):.3g}); they must be identical"
            )

        require((t[n] == first).all(), fail)  # headers fixed shapes and dtypes, so == is torch.equal
    return first


def row_scaled(scale: torch.Tensor, factor: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Per-row scales (or a bias) [out, ...] with rows first_row.. multiplied by `factor`, in fp32;
    the rows before it are times 1, exactly."""
    factor = torch.cat([factor.new_ones(first_row), factor]).float().reshape(-1, *([1] * (scale.dim() - 1)))
    return (scale.float() * factor).to(scale.dtype)


def passthrough(name: str) -> Rule:
    return Rule("unchanged", (name,), (name,), lambda t: {name: t[name]})


def renamed(src: str, dst: str) -> Rule:
    """The same bytes under the compressed-tensors name."""
    return Rule(f"{src.rsplit('.', 1)[1]} -> {dst.rsplit('.', 1)[1]}, same bytes", (src,), (dst,), lambda t: {dst: t[src]})


def checked_and_dropped(name: str, why: str) -> Rule:
    """A scale the target scheme has no place for: validated, then not yielded."""

    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        check_scale(name, t[name])
        return {}

    return Rule(f"{name.rsplit('.', 1)[1]}: checked, dropped ({why})", (name,), (), fn)


def dropped_input_scales(members: Sequence[Module], why: str) -> list[Rule]:
    for m in members:
        expect(m.info("input_scale"), (torch.float32,), ())
    return [checked_and_dropped(m.key("input_scale"), why) for m in members]


def scale_rule(
    label: str,
    src: str,
    dst: str,
    layout: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    row_factor: RowFactor | None = None,
) -> Rule:
    """A checked scale, re-laid out; an optional per-row factor is multiplied in fp32 before the one
    rounding into `dtype`."""
    inputs = (src,) if row_factor is None else (src, row_factor.name)

    def fn(t: Tensors) -> dict[str, torch.Tensor]:
        if row_factor is None:  # layouts only move values: no fp32 round trip (each is a kernel launch)
            value = t[src].to(dtype)
            check_scale(src, value)  # after the rounding: also refuses a scale that `dtype` cannot hold
            return {dst: layout(value)}
        factor = t[row_factor.name]
        check_scale(src, t[src])
        check_scale(row_factor.name, factor)
        return {dst: row_scaled(layout(t[src].float()), factor, row_factor.first_row).to(dtype)}

    if row_factor is not None:
        rows = f"rows {row_factor.first_row}.." if row_factor.first_row else "rows"
        return Rule(f"{label}, {rows} x {row_factor.name}", inputs, (dst,), fn)
    return Rule(label, inputs, (dst,), fn, converted_together(dtype))


@functools.cache
def converted_together(dtype: torch.dtype) -> Many:
    """`many` of the scale rules that only re-lay out and convert: one conversion for all their
    sources, then each rule's own function (its conversion is then a no-op)."""

    def many(work: Sequence[tuple[Rule, Tensors]]) -> list[dict[str, torch.Tensor]]:
        sources = converted([t[r.inputs[0]] for r, t in work], dtype)
        return [r.fn({r.inputs[0]: s}) for (r, _), s in zip(work, sources, strict=True)]

    return many
