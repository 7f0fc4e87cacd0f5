"""Shared helpers for the benchmarks: a median timer, the machine's memory-copy bandwidth measured in the
same run, and a table printer. Benchmarks report ratios against anchors timed in the same run, never
absolute figures alone (the machine may be shared and noisy)."""

from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in seconds (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_bandwidth(gib: float = 1.0, iters: int = 5, fresh: bool = False) -> float:
    """Bytes / s of copying a `gib` GiB fp32 tensor into another (read + write bytes counted).

    fresh=True copies into a newly allocated tensor each time (``src.clone()``), as any op returning a new
    tensor must: on CPU the OS then maps and zeroes the pages first, which can cost as much as the copy
    (PyTorch's THP_MEM_ALLOC_ENABLE=1 makes that cheaper with huge pages)."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    t = timeit(src.clone if fresh else (lambda: dst.copy_(src)), warmup=1, iters=iters)
    return 2 * n * 4 / t


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print dicts as an aligned text table (columns: the keys of the first row unless given)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
