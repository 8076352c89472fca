"""SGLang plugin: `python -m sglang.launch_server --model-path <ModelOpt checkpoint>` through SGLang's
compressed-tensors path, with the weights rewritten by lazyxform as they load. Registered under the
`sglang.srt.plugins` entry point, so SGLang's `load_plugins()` calls `register` in each of its
processes (the engine's, and the scheduler's, which builds and loads the model)."""

from __future__ import annotations

from .hooks import register

__all__ = ["register"]
