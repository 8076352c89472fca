"""The plugin's entry point: checks the SGLang version, then registers the hooks with SGLang's
HookRegistry, which applies them after every plugin ran (sglang.srt.plugins.load_plugins)."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from . import compat, config, loader, quant_config

HOOKS = {
    compat.PARSE_QUANT_CONFIG: config.parse_quant_hf_config,
    compat.GET_QUANT_CONFIG: quant_config.get_quant_config,
    compat.WEIGHTS_ITERATOR: loader.get_weights_iterator,
}


def register() -> None:
    """Raises UnsupportedSglangError on an SGLang it was not checked on; SGLang's plugin loader logs
    that with its traceback and goes on without lazyxform. load_plugins runs once per process."""
    compat.check_sglang()
    for target, hook in HOOKS.items():
        HookRegistry.register(target, hook, HookType.AROUND)
