"""ModelOpt quantization configs, in both forms ModelOpt writes.

- nested: `hf_quant_config.json` = {"producer", "quantization": {quant_algo, group_size, ...}}
- flat: `config.json` `quantization_config` = {quant_method: "modelopt", quant_algo, ignore, ...}

The nested form is preferred: only it carries group_size and has_zero_point for INT4/INT8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, NotAModelOptCheckpoint
from .shards import checkpoint_file, load_json_file

HF_QUANT_CONFIG = "hf_quant_config.json"
# The config.json fields lazyxform reads, with the types its planning relies on.
HF_FIELD_TYPES: dict[str, type] = {
    "model_type": str,
    "dtype": str,
    "torch_dtype": str,
    "num_attention_heads": int,
    "num_key_value_heads": int,
}

def canonical_algo(algo: str) -> str:
    """ModelOpt leaks internal lower-case names (`fp8_pb_wo`, `mxfp4`); canonical names are upper-case.
    Other names of one format are the recipe's to declare (recipes/)."""
    return algo.strip().upper()


@dataclass(frozen=True)
class AlgoConfig:
    """One ModelOpt quantization format as configured for a set of modules."""

    algo: str
    group_size: int | None = None
    has_zero_point: bool = False


@dataclass
class ModelOptConfig:
    source: Path
    default: AlgoConfig | None  # None when every quantized module is listed in `quantized_layers`
    per_layer: dict[str, AlgoConfig] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    kv_cache_algo: str | None = None

    def algos(self) -> set[str]:
        found = {c.algo for c in self.per_layer.values()}
        if self.default is not None:
            found.add(self.default.algo)
        return found

    def is_excluded(self, module: str) -> bool:
        return any(fnmatch_to_regex(p).fullmatch(module) for p in self.exclude)

    def algo_for(self, module: str) -> AlgoConfig | None:
        """The format a module was quantized with: longest dotted prefix in quantized_layers, else the default."""
        best = None
        for prefix, cfg in self.per_layer.items():
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, cfg)
        return best[1] if best else self.default


def fnmatch_to_regex(pattern: str) -> re.Pattern[str]:
    """ModelOpt's exclude_modules are fnmatch patterns ('*' spans dots)."""
    return re.compile(fnmatch_regex_source(pattern))


def fnmatch_regex_source(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def is_modelopt_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    if (directory / HF_QUANT_CONFIG).is_file():
        return True
    qc = (_load_json(directory, "config.json") or {}).get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "modelopt"


def read_modelopt_config(directory: str | Path) -> tuple[ModelOptConfig, dict[str, Any]]:
    """Parse the quantization config of a ModelOpt export; returns it and the raw config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotAModelOptCheckpoint(f"{directory}: not a directory")
    hf_config = _load_json(directory, "config.json") or {}
    _check_field_types(directory / "config.json", hf_config)
    flat = hf_config.get("quantization_config")
    nested_path = directory / HF_QUANT_CONFIG
    nested = _load_json(directory, HF_QUANT_CONFIG)

    flat_ok = isinstance(flat, dict) and str(flat.get("quant_method", "")).lower() == "modelopt"
    if nested is None and not flat_ok:
        raise NotAModelOptCheckpoint(
            f"{directory}: no {HF_QUANT_CONFIG} and config.json has no quantization_config with "
            "quant_method 'modelopt'"
        )
    if nested is not None:
        body = nested.get("quantization")
        if not isinstance(body, dict):
            raise ConfigError(f"{nested_path}: missing the 'quantization' object")
        parsed = _parse_body(nested_path, body, exclude_key="exclude_modules")
        if flat_ok and "quant_algo" in flat and body.get("quant_algo") is not None:
            a, b = canonical_algo(str(flat["quant_algo"])), canonical_algo(str(body["quant_algo"]))
            if a != b:
                raise ConfigError(f"{directory}: config.json says quant_algo {a} but {HF_QUANT_CONFIG} says {b}")
        return parsed, hf_config
    return _parse_body(directory / "config.json", flat, exclude_key="ignore"), hf_config


def _parse_body(path: Path, body: dict[str, Any], exclude_key: str) -> ModelOptConfig:
    algo = body.get("quant_algo")
    exclude = body.get(exclude_key) or body.get("exclude_modules") or body.get("ignore") or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ConfigError(f"{path}: {exclude_key} must be a list of module patterns, got {exclude!r}")
    kv = body.get("kv_cache_quant_algo")
    if kv is None and "kv_cache_scheme" in body:
        kv = _kv_algo_from_scheme(path, body["kv_cache_scheme"])
    cfg = ModelOptConfig(source=path, default=None, exclude=list(exclude), kv_cache_algo=_opt_algo(path, kv))
    if algo is None:
        if kv is None:
            raise ConfigError(f"{path}: no quant_algo and no kv_cache_quant_algo")
        return cfg
    if not isinstance(algo, str):
        raise ConfigError(f"{path}: quant_algo must be a string, got {algo!r}")
    if canonical_algo(algo) == "MIXED_PRECISION":
        layers = body.get("quantized_layers")
        if not isinstance(layers, dict) or not layers:
            raise ConfigError(f"{path}: quant_algo MIXED_PRECISION needs a non-empty quantized_layers map")
        for module, spec in layers.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("quant_algo"), str):
                raise ConfigError(f"{path}: quantized_layers[{module!r}] must be an object with a quant_algo string")
            cfg.per_layer[module] = _algo_config(path, spec)
        return cfg
    cfg.default = _algo_config(path, body)
    return cfg


def _algo_config(path: Path, spec: dict[str, Any]) -> AlgoConfig:
    group_size = spec.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0):
        raise ConfigError(f"{path}: group_size must be a positive integer, got {group_size!r}")
    has_zp = spec.get("has_zero_point", False)
    if not isinstance(has_zp, bool):
        raise ConfigError(f"{path}: has_zero_point must be true or false, got {has_zp!r}")
    return AlgoConfig(canonical_algo(spec["quant_algo"]), group_size, has_zp)


def _opt_algo(path: Path, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: kv_cache_quant_algo must be a string, got {value!r}")
    return canonical_algo(value)


def _kv_algo_from_scheme(path: Path, scheme: object) -> str | None:
    # Flat form: FP8 KV is {type: float, num_bits: 8, ...}; NVFP4 KV is the bare string "NVFP4".
    if scheme is None or isinstance(scheme, str):
        return scheme
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    raise ConfigError(f"{path}: unrecognised kv_cache_scheme {scheme!r}")


def _load_json(directory: Path, name: str) -> dict[str, Any] | None:
    path = checkpoint_file(directory, name)
    return None if path is None else load_json_file(path, ConfigError)


def _check_field_types(path: Path, hf_config: dict[str, Any]) -> None:
    for key, kind in HF_FIELD_TYPES.items():
        value = hf_config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0)):
            raise ConfigError(f"{path}: {key} must be a {'positive ' if kind is int else ''}{kind.__name__}, got {value!r}")
