"""Typed errors. Every message names the file and tensor involved and what was expected."""

from __future__ import annotations


class LazyxformError(ValueError):
    """Base class: a checkpoint lazyxform cannot present faithfully."""


class NotAModelOptCheckpoint(LazyxformError):
    """The directory has no ModelOpt quantization config or no safetensors weights."""


class UnsupportedAlgoError(LazyxformError):
    """A ModelOpt quant_algo (or kv_cache_quant_algo) that lazyxform has no recipe for."""


class ConfigError(LazyxformError):
    """The ModelOpt config is malformed or contradicts itself or the tensors."""


class CorruptSafetensorsError(LazyxformError):
    """A safetensors file is truncated, has a malformed header or impossible offsets."""


class UnsafePathError(LazyxformError):
    """A checkpoint file (a shard an index names, a config) resolves outside the checkpoint directory."""


class MissingTensorError(LazyxformError):
    """A tensor the recipe needs is absent from the checkpoint or the stream."""


class TensorMismatchError(LazyxformError):
    """A tensor has a dtype or shape the recipe does not accept."""


class UnexpectedTensorError(LazyxformError):
    """A quantized module carries a tensor its recipe does not understand."""


class UnplaceableModuleError(LazyxformError):
    """A quantized module the engine builds unquantized (DeepSeek's MTP `eh_proj`): its quantized
    tensors have no parameter to go to."""


class BadScaleError(LazyxformError):
    """A scale holds NaN, Inf, zero or negative values where the format forbids them."""


class InconsistentScalesError(LazyxformError):
    """Scales that must agree (fused q/k/v, shared pre_quant_scale) do not."""


class LazyxformWarning(UserWarning):
    """Something was loaded faithfully to what the engine would do natively, but a user should know."""
