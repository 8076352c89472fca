"""Lets PyPI's torchvision import beside torch's CPU build (loaded by a .pth file that
scripts/setup_sglang.sh writes into the SGLang test venv only).

torchvision's wheel is built against torch's CUDA build: beside the CPU build its compiled ops do
not load, and its import then fails registering fake kernels for `torchvision::nms` and `::qnms`,
operators that no longer exist. Defining their schemas just before torchvision is first imported
lets the import finish; SGLang imports torchvision only through transformers and calls neither op."""

from __future__ import annotations

import importlib.abc
import sys
from importlib.machinery import ModuleSpec


class _DefineBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object, target: object = None) -> ModuleSpec | None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            for op in ("nms", "qnms"):
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the normal finders load torchvision


sys.meta_path.insert(0, _DefineBeforeTorchvision())
