"""The weight-stream hook: SGLang's default loader yields the ModelOpt tensors, lazyxform rewrites them.

`DefaultModelLoader._get_weights_iterator` is where every load format of the default loader
(safetensors, multi-thread, which yields out of order, and the others) produces the (name, tensor)
pairs that `model.load_weights` consumes; SGLang's ModelOpt loader goes through it too. The wrap
applies only to the primary weights of a model whose quantization config lazyxform presented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .config import MARK, open_checkpoint

logger = logging.getLogger(__name__)

Weights = Iterator[tuple[str, torch.Tensor]]


def get_weights_iterator(original: Callable[..., Weights], loader: Any, source: Any, *args: Any, **kwargs: Any) -> Weights:
    """AROUND hook of DefaultModelLoader._get_weights_iterator."""
    weights = original(loader, source, *args, **kwargs)
    model_config = getattr(source, "model_config", None)
    quant = getattr(getattr(model_config, "hf_config", None), "quantization_config", None)
    if not isinstance(quant, dict) or MARK not in quant:
        return weights
    # A secondary source (another path, or a prefix) is not the checkpoint lazyxform planned.
    if source.prefix or source.model_or_path != model_config.model_path:
        return weights
    # On the GPU when there is one; planned as the quantization config was.
    ck = open_checkpoint(quant[MARK]["checkpoint"])
    logger.info("lazyxform: rewriting the weight stream of %s on %s", quant[MARK]["checkpoint"], ck.device)
    return ck.wrap(weights)
