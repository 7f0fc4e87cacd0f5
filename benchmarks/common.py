"""Shared helpers of the benchmark scripts: a median timer, the machine's copy bandwidth, a table."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def timeit(fn: Callable[[], object], warmup: int = 3, iters: int = 10, max_seconds: float | None = None,
           stat: str = "median") -> float:
    """Median (or ``stat="min"``) wall time of ``fn()`` in seconds, after ``warmup`` calls; stops early past
    ``max_seconds``. The minimum is the steadier figure on a shared, busy machine."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return min(times) if stat == "min" else statistics.median(times)


def memcpy_bandwidth(nbytes: int = 1 << 30, iters: int = 5, stat: str = "median") -> float:
    """Bytes per second of a large fp32 tensor copy, read + write counted (the machine's memory wall)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), warmup=1, iters=iters, stat=stat)
    del src, dst
    return 2 * nbytes / t


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    """Print rows as an aligned text table."""
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
