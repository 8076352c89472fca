"""One module per recipe family. A Recipe subclass that names `algos` registers itself in RECIPES
(base.py) when its module loads, and every module of this package loads here: adding a format is
adding a file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import RECIPES, Module, Recipe, Target, recipe_for

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RECIPES", "Module", "Recipe", "Target", "recipe_for"]
