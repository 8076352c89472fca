"""Value checks that can be settled later, so that a GPU load needs no host sync per check.

Reading a device value on the host (`bool(t)`) waits until the device has run everything queued
before it, and each small check costs a few kernel launches. While `collect()` is open, checks are
only recorded; the stream computes one verdict for a whole batch (`verdict`: all scales checked in
one pass), reads it back once, and only if it is false settles the checks one by one (`settle`),
calling the failure callbacks, in order. Outside `collect()` a check is settled on the spot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

# (values, fail, is_scale): a scale check wants every value finite and > 0; another check is a 0-d boolean.
Check = tuple[torch.Tensor, Callable[[], None], bool]
_collecting: ContextVar[list[Check] | None] = ContextVar("lazyxform_checks", default=None)


def positive_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d boolean: every value finite and > 0. One min/max pass and no temporaries the size of `t`
    (NaN propagates through min and max, and fails both comparisons)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.dtype == torch.float8_e4m3fn:  # as bytes: 0x00 is zero, 0x7F NaN, the sign bit negative; no inf
        lo, hi = torch.aminmax(t.view(torch.uint8))
        return (lo > 0) & (hi < 0x7F)
    lo, hi = torch.aminmax(t if t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) else t.float())
    return (lo > 0) & (hi < torch.inf)


def require(ok: torch.Tensor, fail: Callable[[], None]) -> None:
    """Call `fail` (it raises or warns, with the details) unless the 0-d boolean `ok` is true."""
    _check((ok, fail, False))


def require_positive_finite(scale: torch.Tensor, fail: Callable[[], None]) -> None:
    """Call `fail` unless every value of `scale` is finite and > 0."""
    _check((scale, fail, True))


def _check(check: Check) -> None:
    pending = _collecting.get()
    if pending is None:
        settle([check])
    else:
        pending.append(check)


@contextmanager
def collect() -> Iterator[list[Check]]:
    """Defer every check made inside the block into the yielded list."""
    pending: list[Check] = []
    token = _collecting.set(pending)
    try:
        yield pending
    finally:
        _collecting.reset(token)


def verdict(checks: list[Check], device: torch.device) -> torch.Tensor:
    """0-d boolean on `device`, true when every check passes; queued, not waited for. All the
    scales of one dtype are checked in one pass, so a batch costs a few kernels, not a few per check."""
    oks = [values.reshape(()).to(device) for values, _, is_scale in checks if not is_scale]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for values, _, is_scale in checks:
        if is_scale:
            by_dtype.setdefault(values.dtype, []).append(values.reshape(-1).to(device))
    oks += [positive_finite(torch.cat(group)) for group in by_dtype.values()]
    return torch.stack(oks).all() if oks else torch.ones((), dtype=torch.bool, device=device)


def settle(checks: list[Check]) -> None:
    """Call the failure callback of every failed check, in the order they were made."""
    for values, fail, is_scale in checks:
        if not bool(positive_finite(values) if is_scale else values):
            fail()
