"""Shared helpers for the benchmark scripts: timing, the machine's memory-copy bandwidth, tables.

Every benchmark measures its anchors (eager reference, torch.compile, the peer path) in the same run and
prints ratios, because absolute times drift between machines.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def timeit(fn: Callable[[], object], warmup: int = 2, iters: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls (at least ``iters`` runs and, if
    ``min_time`` is set, until that many seconds have been spent)."""
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < iters or spent < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


_BANDWIDTH: float | None = None


def memcpy_bandwidth(nbytes: int = 1 << 30) -> float:
    """The machine's memory-copy bandwidth in bytes/s (read + write counted), copying a ``nbytes`` fp32
    tensor into another; measured once per process."""
    global _BANDWIDTH
    if _BANDWIDTH is None:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src), warmup=1, iters=5)
        _BANDWIDTH = 2 * nbytes / t
        del src, dst
    return _BANDWIDTH


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a fixed-width table (floats with 3 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [list(map(fmt, header))] + [list(map(fmt, r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
