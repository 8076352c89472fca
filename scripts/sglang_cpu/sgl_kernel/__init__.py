"""Stand-in for SGLang's `sgl_kernel` on a CPU machine without its compiled library (installed by
scripts/setup_sglang.sh into the SGLang test venv only; never part of lazyxform).

SGLang imports names from `sgl_kernel` at module level on every platform, but its CPU engine with
these tests calls none of them: the model runs PyTorch code and lazyxform's portable kernels. Any
name imports; calling one raises, naming the kernel, so a test that reaches one fails loudly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def __getattr__(name: str) -> Callable[..., Any]:
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{name}: no compiled SGLang kernel on this machine (CPU stub)")

    missing.__name__ = name
    return missing
