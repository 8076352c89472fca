"""The SGLang versions lazyxform_sglang hooks into, and the check that it runs on one of them.

The hooks wrap three SGLang functions by dotted path (hooks.py). SGLang renames such internals
between releases, so the plugin refuses to hook a version outside the range it was checked on,
or a function whose signature moved, naming what it found instead of patching blindly."""

from __future__ import annotations

import inspect
import pkgutil

import sglang
from packaging.version import Version

from lazyxform import LazyxformError

# 0.5.23: installed and run (tests/sglang, on a CPU). 0.5.17: the same hook points read in its wheel.
SUPPORTED = (Version("0.5.17"), Version("0.5.24"))  # [min, max)
SUPPORTED_TEXT = ">=0.5.17,<0.5.24"

PARSE_QUANT_CONFIG = "sglang.srt.configs.model_config.ModelConfig._parse_quant_hf_config"
GET_QUANT_CONFIG = "sglang.srt.model_loader.weight_utils.get_quant_config"
WEIGHTS_ITERATOR = "sglang.srt.model_loader.loader.DefaultModelLoader._get_weights_iterator"
# Target -> the leading parameters the hook relies on (it passes any others through).
HOOKED_PARAMETERS: dict[str, tuple[str, ...]] = {
    PARSE_QUANT_CONFIG: ("self",),
    GET_QUANT_CONFIG: ("model_config", "load_config", "packed_modules_mapping"),
    WEIGHTS_ITERATOR: ("self", "source"),
}


class UnsupportedSglangError(LazyxformError):
    """This SGLang is outside the supported range, or changed a function lazyxform hooks."""


def check_sglang(version: str | None = None) -> None:
    """Raise UnsupportedSglangError unless this SGLang (or `version`) is in range and every hooked
    function exists with the parameters the hooks rely on."""
    found = Version(version or sglang.__version__)
    low, high = SUPPORTED
    if not low <= found < high:
        raise UnsupportedSglangError(
            f"lazyxform_sglang supports SGLang {SUPPORTED_TEXT}, found {found}; lazyxform does not hook this SGLang "
            "(ModelOpt checkpoints are left to SGLang's own support). Install a supported SGLang, or uninstall "
            "lazyxform's SGLang plugin"
        )
    for target, leading in HOOKED_PARAMETERS.items():
        try:
            params = tuple(inspect.signature(pkgutil.resolve_name(target)).parameters)
        except (ImportError, AttributeError) as e:
            raise UnsupportedSglangError(f"lazyxform_sglang hooks {target}, which SGLang {found} does not have") from e
        if params[: len(leading)] != leading:
            raise UnsupportedSglangError(
                f"lazyxform_sglang hooks {target}{leading}, which SGLang {found} defines with parameters {params}; "
                f"supported: SGLang {SUPPORTED_TEXT}"
            )
