"""Load-time profiling: where a load's time goes, per stage, and how much memory it holds.

Stages: `read` (file -> staging memory, reader threads), `H2D copy` (staging -> device, on the copy
stream), `transform: <rules>` (one per distinct rule set, on the transform stream), `waiting: ...`
(the iterating thread blocked on reads or on the batch check read-back), `consumer` (the caller's
own work between two tensors), `source: next input` (waiting for the input iterator). GPU stages
are timed with CUDA events, so profiling adds no host synchronisation before the load ends; such a
span runs from when its stream reaches the first event to when it reaches the second, so it
includes any time the stream waited for the host to launch the work (short kernels: mostly that).

Profile any iteration (`iter(ck)` or `ck.wrap(pairs)`) with `Profiler.iterate`, or let
`maybe_profile(pairs, device, total_bytes, label)` do it when $LAZYXFORM_PROFILE names a directory
(for engine plugins).
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

ENV = "LAZYXFORM_PROFILE"
SAMPLE_SECONDS = 0.01
STAGE_ORDER = ("read", "pin", "unpin", "H2D", "transform", "waiting", "source", "consumer")
NUMBERED = re.compile(r"\.\d+\.")
Pair = tuple[str, torch.Tensor]


@dataclass(frozen=True)
class Span:
    stage: str
    track: str
    start: float  # seconds since the profile began
    end: float
    nbytes: int


@dataclass(frozen=True)
class Stage:
    name: str
    calls: int
    nbytes: int
    active_s: float  # wall time during which at least one span of the stage ran
    busy_s: float  # summed over threads / streams

    @property
    def gbps(self) -> float:
        return self.nbytes / self.active_s / 1e9 if self.active_s > 0 else 0.0


class Profiler:
    """Collects spans from the reader threads, the stream and the iterating thread."""

    enabled = True

    def __init__(self, device: torch.device, total_bytes: int = 0, progress: bool = False, label: str = "load") -> None:
        self.device = device
        self.total_bytes = total_bytes
        self.label = label
        self.spans: list[Span] = []
        self.memory: list[tuple[float, int, int]] = []  # (t, host RSS bytes, device bytes allocated)
        self._events: list[tuple[str, str, Any, Any, int]] = []
        self._progress = progress
        self._done_bytes = 0
        self._shown = 0.0
        self._cuda = device.type == "cuda"
        if self._cuda:
            # GPU event times are placed on the host clock through this event, synchronised here.
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
            self._ref.synchronize()
        self._t0 = perf_counter()
        self.rss_at_start = _rss()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="lazyxform-profile-memory", daemon=True)
        self._sampler.start()

    def now(self) -> float:
        return perf_counter() - self._t0

    @contextmanager
    def host(self, stage: str, nbytes: int = 0, track: str | None = None) -> Iterator[None]:
        """A span timed on the host clock, on the calling thread's track unless `track` is given."""
        start = self.now()
        try:
            yield
        finally:
            self.add(stage, start, self.now(), nbytes, track)

    def device_span(self, stage: str, nbytes: int, track: str) -> AbstractContextManager[None]:
        """A span of device work queued on the current stream: CUDA events on a GPU, else host time."""
        return self._event_span(stage, nbytes, track) if self._cuda else self.host(stage, nbytes, track)

    @contextmanager
    def _event_span(self, stage: str, nbytes: int, track: str) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((stage, track, start, end, nbytes))

    def add(self, stage: str, start: float, end: float, nbytes: int = 0, track: str | None = None) -> None:
        self.spans.append(Span(stage, track or threading.current_thread().name, start, end, nbytes))

    def advance(self, nbytes: int) -> None:
        """`nbytes` more of the checkpoint entered the stream (drives the progress bar)."""
        self._done_bytes += nbytes
        if self._progress and (perf_counter() - self._shown > 0.2 or self._done_bytes >= self.total_bytes):
            self._shown = perf_counter()
            sys.stderr.write(f"\r{_progress_line(self._done_bytes, self.total_bytes, self.now())}")
            sys.stderr.flush()

    def timed(self, pairs: Iterable[Pair], stage: str) -> Iterable[Pair]:
        """`pairs`, with the time spent producing each one recorded as `stage`."""
        it = iter(pairs)
        while True:
            start = self.now()
            try:
                item = next(it)
            except StopIteration:
                return
            self.add(stage, start, self.now())
            yield item
            del item  # not held while the next one is produced

    def iterate(self, pairs: Iterable[Pair]) -> Iterator[Pair]:
        """`pairs`, with this profiler visible to the lazyxform code that produces them."""
        it = iter(pairs)
        while True:
            token = _current.set(self)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                _current.reset(token)
            start = self.now()
            yield item
            self.add("consumer", start, self.now())

    def finish(self) -> Report:
        """Wait for the device, stop sampling, and summarise."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        wall = self.now()
        self._stop.set()
        self._sampler.join()
        if self._progress:
            sys.stderr.write("\n")
        for stage, track, start, end, nbytes in self._events:
            self.add(stage, self._ref_seconds(start), self._ref_seconds(end), nbytes, track)
        self._events.clear()
        peak_device = torch.cuda.max_memory_allocated(self.device) if self._cuda else 0
        peak_host = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024] + [m[1] for m in self.memory])
        return Report(
            label=self.label,
            device=torch.cuda.get_device_name(self.device) if self._cuda else "cpu",
            wall_s=wall,
            input_bytes=self._done_bytes,
            stages=summarize(self.spans),
            rss_at_start=self.rss_at_start,
            peak_host_bytes=peak_host,
            peak_device_bytes=peak_device,
            spans=sorted(self.spans, key=lambda s: s.start),
            memory=self.memory,
        )

    def _ref_seconds(self, event: Any) -> float:
        # The reference event was recorded (and waited for) just before _t0 was read.
        return self._ref.elapsed_time(event) / 1000.0

    def _sample(self) -> None:
        """Memory at the start, every SAMPLE_SECONDS, and once more when the profile ends."""
        while True:
            stopping = self._stop.is_set()
            device = torch.cuda.memory_allocated(self.device) if self._cuda else 0
            self.memory.append((self.now(), _rss(), device))
            if stopping:
                return
            self._stop.wait(SAMPLE_SECONDS)


class _Off(Profiler):
    """What the code sees when nobody profiles: every hook does nothing."""

    enabled = False

    def __init__(self) -> None:
        pass

    def host(self, stage: str, nbytes: int = 0, track: str | None = None) -> AbstractContextManager[None]:  # type: ignore[override]
        return nullcontext()

    def device_span(self, stage: str, nbytes: int, track: str) -> AbstractContextManager[None]:
        return nullcontext()

    def advance(self, nbytes: int) -> None:
        pass

    def timed(self, pairs: Iterable[Pair], stage: str) -> Iterable[Pair]:
        return pairs


OFF = _Off()
_current: ContextVar[Profiler] = ContextVar("lazyxform_profiler", default=OFF)


def current() -> Profiler:
    """The profiler of the iteration in progress (a do-nothing one when none)."""
    return _current.get()


def maybe_profile(pairs: Iterable[Pair], device: torch.device, total_bytes: int, label: str) -> Iterable[Pair]:
    """For engine integrations: `pairs` unchanged, unless $LAZYXFORM_PROFILE names a directory; then
    the load (`total_bytes` of checkpoint `label`, on `device`) is profiled and
    `lazyxform-profile-<pid>.{txt,json,trace.json,png}` written there when the iteration ends (one
    set per process, so tensor-parallel workers do not overwrite each other)."""
    out_dir = os.environ.get(ENV)
    if not out_dir:
        return pairs
    return _profile_to(pairs, Profiler(device, total_bytes, label=label), Path(out_dir))


def _profile_to(pairs: Iterable[Pair], prof: Profiler, out_dir: Path) -> Iterator[Pair]:
    yield from prof.iterate(pairs)
    report = prof.finish()
    written = report.write(out_dir, f"lazyxform-profile-{os.getpid()}")
    sys.stderr.write(f"lazyxform: load profile written to {', '.join(map(str, written))}\n")


def summarize(spans: list[Span]) -> list[Stage]:
    by_stage: dict[str, list[Span]] = {}
    for s in spans:
        by_stage.setdefault(s.stage, []).append(s)
    stages = [
        Stage(name, len(ss), sum(s.nbytes for s in ss), _union_seconds(ss), sum(s.end - s.start for s in ss))
        for name, ss in by_stage.items()
    ]
    return sorted(stages, key=lambda st: (_family_rank(st.name), -st.active_s))


def _family_rank(stage: str) -> int:
    return next((i for i, f in enumerate(STAGE_ORDER) if stage.startswith(f)), len(STAGE_ORDER))


def _union_seconds(spans: list[Span]) -> float:
    total, reach = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        if s.end > reach:
            total += s.end - max(s.start, reach)
            reach = s.end
    return total


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _progress_line(done: int, total: int, seconds: float) -> str:
    frac = min(done / total, 1.0) if total else 0.0
    bar = "#" * int(frac * 30)
    rate = done / seconds / 1e9 if seconds > 0 else 0.0
    return f"lazyxform [{bar:<30}] {done / 1e6:.0f}/{total / 1e6:.0f} MB {rate:5.1f} GB/s"


def rule_stage(labels: Iterable[str]) -> str:
    """The stage of a group: its rule labels, with layer numbers folded so layers share a stage."""
    return "transform: " + " + ".join(dict.fromkeys(NUMBERED.sub(".*.", label) for label in labels))


@dataclass
class Report:
    label: str
    device: str
    wall_s: float
    input_bytes: int
    stages: list[Stage]
    rss_at_start: int
    peak_host_bytes: int
    peak_device_bytes: int
    spans: list[Span]
    memory: list[tuple[float, int, int]]

    def summary(self) -> str:
        rate = self.input_bytes / self.wall_s / 1e9 if self.wall_s else 0.0
        return (
            f"{self.label}: {self.input_bytes / 1e9:.2f} GB in {self.wall_s:.3f} s = {rate:.1f} GB/s on {self.device}; "
            f"peak host RSS {self.peak_host_bytes / 1e9:.2f} GB (at start {self.rss_at_start / 1e9:.2f} GB); "
            f"peak device memory allocated {self.peak_device_bytes / 1e9:.2f} GB"
        )

    def table(self) -> str:
        header = ("stage", "calls", "MB", "active s", "busy s", "GB/s", "% of wall")
        rows = [header] + [
            (
                s.name,
                str(s.calls),
                f"{s.nbytes / 1e6:.1f}",
                f"{s.active_s:.4f}",
                f"{s.busy_s:.4f}",
                f"{s.gbps:.1f}" if s.nbytes else "-",
                f"{100 * s.active_s / self.wall_s:.0f}%" if self.wall_s else "-",
            )
            for s in self.stages
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join([*lines, "", self.summary(), "active: wall time with the stage running; busy: summed over threads and streams"])

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "device": self.device,
            "wall_s": self.wall_s,
            "input_bytes": self.input_bytes,
            "rss_at_start": self.rss_at_start,
            "peak_host_bytes": self.peak_host_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "stages": [asdict(s) | {"gbps": s.gbps} for s in self.stages],
        }

    def chrome_trace(self) -> dict[str, Any]:
        """Chrome trace-event JSON (opens in Perfetto / chrome://tracing): one track per thread or
        stream, memory as counters."""
        tids = {track: i for i, track in enumerate(dict.fromkeys(s.track for s in self.spans))}
        events: list[dict[str, Any]] = [
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": track}} for track, tid in tids.items()
        ]
        events.append({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": f"lazyxform {self.label}"}})
        events += [
            {
                "ph": "X",
                "name": s.stage,
                "cat": s.stage.split(":")[0],
                "pid": 1,
                "tid": tids[s.track],
                "ts": s.start * 1e6,
                "dur": (s.end - s.start) * 1e6,
                "args": {"bytes": s.nbytes},
            }
            for s in self.spans
        ]
        events += [
            {"ph": "C", "name": "memory GB", "pid": 1, "ts": t * 1e6, "args": {"host RSS": rss / 1e9, "device allocated": dev / 1e9}}
            for t, rss, dev in self.memory
        ]
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def plot(self, path: Path) -> bool:
        """A PNG: the timeline per track, and memory over time. False when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        tracks = list(dict.fromkeys(s.track for s in self.spans))
        families = list(dict.fromkeys(s.stage.split(":")[0] for s in self.spans))
        colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
        fig, (ax, mem) = plt.subplots(2, 1, figsize=(12, 2 + 0.4 * len(tracks) + 2), sharex=True, height_ratios=[max(len(tracks), 2), 2])
        for y, track in enumerate(tracks):
            for family in families:
                bars = [(s.start, s.end - s.start) for s in self.spans if s.track == track and s.stage.split(":")[0] == family]
                if bars:
                    ax.broken_barh(bars, (y - 0.4, 0.8), color=colors[family])
        ax.set_yticks(range(len(tracks)), tracks)
        ax.invert_yaxis()
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in families], labels=families, loc="upper right", fontsize=8)
        ax.set_title(self.summary(), fontsize=8, wrap=True)
        if self.memory:
            t = [m[0] for m in self.memory]
            mem.plot(t, [m[1] / 1e9 for m in self.memory], label="host RSS")
            mem.plot(t, [m[2] / 1e9 for m in self.memory], label="device allocated")
            mem.legend(loc="upper right", fontsize=8)
        mem.set_ylabel("GB")
        mem.set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True

    def write(self, out_dir: str | Path, stem: str) -> list[Path]:
        """`<stem>.txt` (table), `.json`, `.trace.json` (Chrome trace) and `.png` (without matplotlib: no PNG)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / f"{stem}.txt", out / f"{stem}.json", out / f"{stem}.trace.json"]
        written[0].write_text(self.table() + "\n")
        written[1].write_text(json.dumps(self.to_json(), indent=2) + "\n")
        written[2].write_text(json.dumps(self.chrome_trace()))
        if self.plot(out / f"{stem}.png"):
            written.append(out / f"{stem}.png")
        return written
