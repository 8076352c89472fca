"""The pipelined reader behind `iter(ck)` on a GPU: file reads, host->device copies and the
consumer's work overlap through a bounded pinned staging buffer.

Each shard is cut, in file order, into chunks on a grid of `chunk_bytes`. Worker threads read
chunks (one preadv each) into the slots of a pinned staging buffer of `staging_bytes`; the
iterating thread queues each filled slot's copies on a copy stream and gives the slot back to the
workers once the device has copied it. A tensor is copied piece by piece as its chunks arrive
and yielded once complete. Host memory: `staging_bytes`; device memory: the tensors not yet consumed.

(Page-locking the page cache in place, cudaHostRegister on a read-only mmap, would save the copy
into staging; it was measured slower: registering and unregistering 32 MiB chunks ran at ~16 GB/s
whatever the number of threads, against ~33 GB/s for 16 threads of preadv into staging.)
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import profile
from .errors import CorruptSafetensorsError
from .shards import TensorInfo

Pair = tuple[str, torch.Tensor]

# Pinning host memory is slow (~2-4 GB/s on the lent H100) and a load pays it once per process,
# so the staging buffer is small; 16 chunks in flight keep 16 reader threads busy.
DEFAULT_STAGING_BYTES = 256 << 20
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_THREADS = min(16, os.cpu_count() or 1)  # reading the page cache scales with cores


@dataclass(frozen=True)
class Piece:
    """Bytes [offset, offset + nbytes) of tensor `index`, at `file_offset` in its shard."""

    index: int
    offset: int
    nbytes: int
    file_offset: int


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of one shard, inside one cell of the chunk grid, and the pieces in them."""

    file: Path
    start: int
    end: int
    pieces: tuple[Piece, ...]


def plan_chunks(tensors: Sequence[TensorInfo], chunk_bytes: int) -> list[Chunk]:
    """The tensors' bytes cut on a grid of `chunk_bytes` per file; `tensors` in file order. Each
    chunk is one contiguous stretch of one file: one read."""
    cells: dict[tuple[Path, int], list[Piece]] = {}
    for index, info in enumerate(tensors):
        offset = 0
        while True:
            at = info.start + offset
            cell = at // chunk_bytes
            n = min(info.nbytes - offset, (cell + 1) * chunk_bytes - at)
            cells.setdefault((info.file, cell), []).append(Piece(index, offset, n, at))
            offset += n
            if offset == info.nbytes:
                break
    return [
        Chunk(path, min(p.file_offset for p in ps), max(p.file_offset + p.nbytes for p in ps), tuple(ps))
        for (path, _), ps in cells.items()
    ]


def read_tensors(order: Sequence[TensorInfo], device: torch.device, staging_bytes: int | None = None) -> Iterator[Pair]:
    """Every tensor of `order` as (name, tensor on `device`), in file order."""
    return iter(Reader(order, device, staging_bytes)) if device.type == "cuda" else read_each(order)


def read_each(order: Sequence[TensorInfo]) -> Iterator[Pair]:
    """The CPU backend: one tensor at a time, in the given order."""
    prof = profile.current()
    reader = ShardReader()

    def read(info: TensorInfo) -> torch.Tensor:
        with prof.host("read", info.nbytes):
            return reader.read(info)

    try:
        for info in order:
            yield info.name, read(info)
    finally:
        reader.close()


class ShardReader:
    """Reads tensors by byte range, one open descriptor per shard. Each read is one copy into fresh memory."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, info: TensorInfo) -> torch.Tensor:
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = _open(info.file)
        _pread_into(fd, memoryview(buf.numpy()), info.start, info.file, f"tensor {info.name!r}")
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Reader:
    """Iterates (name, tensor on `device`) in file order; see the module docstring.

    On a GPU a yielded tensor is ready for the stream current when it is yielded (that stream
    waits for the copy on the device; the host does not)."""

    def __init__(
        self,
        tensors: Sequence[TensorInfo],
        device: str | torch.device,
        staging_bytes: int | None = None,
        chunk_bytes: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.tensors = sorted(tensors, key=lambda t: (str(t.file), t.start))
        self.device = torch.device(device)
        staging = staging_bytes or DEFAULT_STAGING_BYTES
        # At least two slots, so that one fills while the other is copied.
        chunk = min(chunk_bytes or DEFAULT_CHUNK_BYTES, staging // 2)
        if chunk < 1:
            raise ValueError(f"staging_bytes={staging} leaves no room for two chunks")
        self.chunk_bytes = chunk
        self.slots = staging // chunk
        self.threads = max(1, min(threads or DEFAULT_THREADS, self.slots))
        self.chunks = plan_chunks(self.tensors, chunk)
        self._staging: list[torch.Tensor | None] = [None] * self.slots
        self._fds: dict[Path, int] = {}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        prof = profile.current()
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lazyxform-read")
        try:
            for path in dict.fromkeys(t.file for t in self.tensors):
                self._fds[path] = _open(path)
            fills: deque[Future[None]] = deque(pool.submit(self._fill, k, None, prof) for k in range(min(self.slots, len(self.chunks))))
            partial: dict[int, torch.Tensor] = {}
            for k, chunk in enumerate(self.chunks):
                with prof.host("waiting: reads"):
                    fills.popleft().result()
                done, copied = self._copy(k, chunk, partial, copy_stream, prof)
                if k + self.slots < len(self.chunks):
                    fills.append(pool.submit(self._fill, k + self.slots, copied, prof))
                if copied is not None:
                    torch.cuda.current_stream(self.device).wait_event(copied)
                for index in done:
                    info = self.tensors[index]
                    yield info.name, partial.pop(index).view(info.dtype).reshape(info.shape)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def _fill(self, k: int, after: Any, prof: profile.Profiler) -> None:
        """Worker: read chunk k into its slot, once the device has copied the slot's previous chunk."""
        if after is not None:
            after.synchronize()
        chunk, s = self.chunks[k], k % self.slots
        if self._staging[s] is None:
            with prof.host("pin staging", self.chunk_bytes):
                self._staging[s] = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        view = memoryview(self._staging[s].numpy())[: chunk.end - chunk.start]  # type: ignore[union-attr]
        with prof.host("read", chunk.end - chunk.start):
            _pread_into(self._fds[chunk.file], view, chunk.start, chunk.file, "a tensor")

    def _copy(self, k: int, chunk: Chunk, partial: dict[int, torch.Tensor], stream: Any, prof: profile.Profiler) -> tuple[list[int], Any]:
        """Queue the chunk's copies; returns the tensors it completed and the event of its copies."""
        slot = self._staging[k % self.slots]
        assert slot is not None
        for p in chunk.pieces:
            if p.offset == 0:
                # Allocated on the consumer's stream, which waits for the copy before it sees the
                # tensor: freeing it later can then never race the copy.
                partial[p.index] = torch.empty(self.tensors[p.index].nbytes, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(stream) if stream is not None else nullcontext(), prof.device_span("H2D copy", chunk.end - chunk.start, "H2D copy stream"):
            for p in chunk.pieces:
                at = p.file_offset - chunk.start
                partial[p.index][p.offset : p.offset + p.nbytes].copy_(slot[at : at + p.nbytes], non_blocking=True)
        copied = stream.record_event() if stream is not None else None
        return [p.index for p in chunk.pieces if p.offset + p.nbytes == self.tensors[p.index].nbytes], copied


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CorruptSafetensorsError(f"{path}: cannot open ({e.strerror})") from None


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill `buf` from byte `offset` of the file; `what` the bytes belong to names them in errors."""
    done = 0
    while done < len(buf):  # one call reads at most ~2 GiB on Linux
        try:
            got = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as e:
            raise CorruptSafetensorsError(f"{path}: cannot read bytes {offset + done}..{offset + len(buf)} ({e.strerror})") from None
        if got == 0:
            raise CorruptSafetensorsError(f"{path}: ends at byte {offset + done}, inside {what} (file changed or truncated)")
        done += got
