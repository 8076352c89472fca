"""Safetensors headers, validated before any tensor data is touched (reader.py reads the data).

The plan is built from headers alone, so a header is checked as hard as data would be:
offsets inside the file, no overlaps, byte counts that match dtype and shape.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptSafetensorsError, LazyxformError, MissingTensorError, NotAModelOptCheckpoint, UnsafePathError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}

# Real headers are a few MB at most; a huge length is corruption or an attack on memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# torch sizes and element counts are int64.
MAX_ELEMENTS = 2**63 - 1
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        return f"{self.name} ({_dtype_name(self.dtype)} {list(self.shape)}) in {self.file.name}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_file(directory: Path, name: str) -> Path | None:
    """`directory / name` if it is a regular file, None if there is none. Refused when the name or a
    symlink leads outside the directory; the one exception is the Hugging Face hub cache, whose
    `snapshots/<rev>/<file>` are symlinks to `../../blobs/<sha>` of the same repository."""
    directory = Path(directory)
    path = directory / name
    try:
        root = directory.resolve()
        target = path.resolve()
        is_file = target.is_file()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte, name too long
        raise UnsafePathError(f"{directory}: cannot resolve {name!r} ({e})") from None
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if os.path.isabs(name) or not any(target.is_relative_to(a) for a in allowed):
        raise UnsafePathError(f"{directory}: {name!r} resolves to {target}, outside the checkpoint directory")
    return path if is_file else None


def load_json_object(raw: bytes, where: Path, error: type[LazyxformError]) -> dict[str, Any]:
    """Strict JSON: UTF-8, an object at the top, no key twice (readers disagree on which copy wins,
    so a duplicated tensor entry could show the engine one tensor and a checker another)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice")
            seen.add(key)
        return dict(pairs)

    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, duplicate keys, huge ints, deep nesting
        raise error(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def load_json_file(path: Path, error: type[LazyxformError]) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    return load_json_object(raw, path, error)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; no tensor bytes are read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CorruptSafetensorsError(f"{path}: file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CorruptSafetensorsError(
                    f"{path}: header claims {header_len} bytes but the file has {size - 8} after the length field "
                    f"(at most {MAX_HEADER_BYTES} allowed)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CorruptSafetensorsError(f"{path}: cannot read ({e.strerror})") from None
    header = load_json_object(raw, path, CorruptSafetensorsError)
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _parse_entry(path, name, entry, data_start, data_size)
    _check_no_overlap(path, infos)
    return infos


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CorruptSafetensorsError(f"{path}: entry for {name!r} is not an object")
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r} (expected one of {sorted(DTYPES)})")
    dtype = DTYPES[dtype_name]
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    # Zero-size dims are counted as 1 so that [0, 2**70] cannot slip past as an empty tensor.
    if prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has shape {shape}, beyond int64 element counts")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CorruptSafetensorsError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but {_dtype_name(dtype)} {shape} needs {expected}"
        )
    if end > data_size:
        raise CorruptSafetensorsError(
            f"{path}: tensor {name!r} ends at byte {end} of the data section, which has only {data_size} "
            "bytes (truncated file?)"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise CorruptSafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")


def index_checkpoint(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from `model.safetensors.index.json` or the lone shard(s)."""
    directory = Path(directory)
    index_path = checkpoint_file(directory, INDEX_FILE)
    if index_path is not None:
        shard_names = _shards_from_index(index_path)
    else:
        shard_names = {p.name: [] for p in sorted(directory.glob("*.safetensors"))}
    if not shard_names:
        raise NotAModelOptCheckpoint(f"{directory}: no *.safetensors files and no {INDEX_FILE}")
    infos: dict[str, TensorInfo] = {}
    for shard, expected_names in shard_names.items():
        path = checkpoint_file(directory, shard)
        if path is None:
            raise MissingTensorError(f"{directory}: shard {shard!r} is missing or not a regular file")
        header = read_header(path)
        for name in expected_names:
            if name not in header:
                raise MissingTensorError(f"{index_path}: maps {name!r} to {shard}, whose header has no such tensor")
        for name, info in header.items():
            if name in infos:
                raise CorruptSafetensorsError(
                    f"{directory}: tensor {name!r} appears in both {infos[name].file.name} and {shard}"
                )
            infos[name] = info
    return infos


def _shards_from_index(index_path: Path) -> dict[str, list[str]]:
    weight_map = load_json_file(index_path, CorruptSafetensorsError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptSafetensorsError(f"{index_path}: weight_map is {type(weight_map).__name__}, expected an object")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptSafetensorsError(f"{index_path}: weight_map[{name!r}] is {shard!r}, expected a file name")
        shards.setdefault(shard, []).append(name)
    return shards
