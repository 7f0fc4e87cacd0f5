"""Shared helpers of the benchmark scripts: median timing, the machine's memory-copy bandwidth, tables."""

from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_bandwidth(nbytes: int = 1 << 30, iters: int = 3) -> float:
    """Bytes per second of a copy of an ``nbytes`` fp32 tensor, read + write counted."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), warmup=1, iters=iters)
    del src, dst
    return 2 * nbytes / t


def print_table(rows: list[dict], title: str | None = None) -> None:
    """Print a list of dicts (same keys) as an aligned text table."""
    if title:
        print(f"\n== {title}")
    if not rows:
        return
    keys = list(rows[0])
    cells = [[k for k in keys]] + [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
