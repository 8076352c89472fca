"""Safetensors headers and reads, validated before any tensor data is touched.

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

import torch

from .errors import CorruptSafetensorsError, MissingTensorError, NotAModelOptCheckpoint, UnsafePathError

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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; no tensor bytes are read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CorruptSafetensorsError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptSafetensorsError(
                f"{path}: header claims {header_len} bytes but the file has {size - 8} after the length field"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptSafetensorsError(f"{path}: header is {type(header).__name__}, expected a JSON object")
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
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CorruptSafetensorsError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
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
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CorruptSafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")


def index_checkpoint(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from `model.safetensors.index.json` or the lone shard(s)."""
    directory = Path(directory)
    root = directory.resolve()
    index_path = directory / INDEX_FILE
    if index_path.exists():
        shard_names = _shards_from_index(index_path)
    else:
        shard_names = {p.name: [] for p in sorted(directory.glob("*.safetensors"))}
    if not shard_names:
        raise NotAModelOptCheckpoint(f"{directory}: no *.safetensors files and no {INDEX_FILE}")
    infos: dict[str, TensorInfo] = {}
    for shard, expected_names in shard_names.items():
        path = _safe_shard_path(root, directory, shard)
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
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptSafetensorsError(f"{index_path}: not a valid safetensors index ({e!r})") from None
    if not isinstance(weight_map, dict):
        raise CorruptSafetensorsError(f"{index_path}: weight_map is not an object")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptSafetensorsError(f"{index_path}: weight_map[{name!r}] is not a file name")
        shards.setdefault(shard, []).append(name)
    return shards


def _safe_shard_path(root: Path, directory: Path, shard: str) -> Path:
    candidate = directory / shard
    if os.path.isabs(shard) or not candidate.resolve().is_relative_to(root):
        raise UnsafePathError(f"{directory}: shard {shard!r} lies outside the checkpoint directory")
    if not candidate.is_file():
        raise MissingTensorError(f"{directory}: shard {shard!r} named by the index does not exist")
    return candidate


class ShardReader:
    """Reads tensors by byte range, one open handle per shard. Each read is one copy into fresh memory."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}

    def read(self, info: TensorInfo) -> torch.Tensor:
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        got = os.preadv(f.fileno(), [buf.numpy()], info.start) if info.nbytes else 0  # type: ignore[attr-defined]
        if got != info.nbytes:
            raise CorruptSafetensorsError(
                f"{info.file}: read {got} of {info.nbytes} bytes of {info.name!r} (file changed or truncated)"
            )
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()
