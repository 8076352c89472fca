"""One module per recipe family; RECIPES maps a canonical ModelOpt quant_algo to its recipe."""

from __future__ import annotations

from ..errors import UnsupportedAlgoError
from .base import Module, Recipe, Target
from .fp4 import Nvfp4Recipe, Nvfp4SvdRecipe, W4A8Nvfp4Fp8Recipe, W4A16Nvfp4Recipe
from .fp8 import Fp8BlockRecipe, Fp8PerChannelRecipe, Fp8PerTensorRecipe
from .int4 import Int4AwqRecipe, W4A8AwqRecipe
from .int8 import Int8SmoothQuantRecipe, Int8WeightOnlyRecipe
from .mx import Mxfp4Recipe, Mxfp8Recipe, W4A8Mxfp4Fp8Recipe

ALL_RECIPES: tuple[Recipe, ...] = (
    Fp8PerTensorRecipe(),
    Fp8PerChannelRecipe(),
    Fp8BlockRecipe(),
    Int8SmoothQuantRecipe(),
    Int8WeightOnlyRecipe(),
    Int4AwqRecipe(),
    W4A8AwqRecipe(),
    Nvfp4Recipe(),
    W4A16Nvfp4Recipe(),
    W4A8Nvfp4Fp8Recipe(),
    Nvfp4SvdRecipe(),
    Mxfp8Recipe(),
    Mxfp4Recipe(),
    W4A8Mxfp4Fp8Recipe(),
)
RECIPES: dict[str, Recipe] = {algo: r for r in ALL_RECIPES for algo in r.algos}


def recipe_for(algo: str) -> Recipe:
    recipe = RECIPES.get(algo)
    if recipe is None:
        raise UnsupportedAlgoError(f"quant_algo {algo!r} is not supported (supported: {', '.join(sorted(RECIPES))})")
    return recipe


__all__ = ["ALL_RECIPES", "RECIPES", "Module", "Recipe", "Target", "recipe_for"]
