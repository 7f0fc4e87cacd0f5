"""Shared helpers of the benchmark scripts: a median timer, the machine's memory-copy bandwidth measured
in the same run, and a table printer.

Every benchmark measures its anchors (eager reference, torch.compile, the peer path) in the same run and
prints ratios, because absolute times drift between machines (and the machine may be shared and noisy).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import torch


def _keep_freed_memory() -> str:
    """Stop glibc from handing large freed blocks back to the OS after every op.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, so a 100 MB activation costs a page fault and a zeroing per 4 KiB page on EVERY call:
    at the Falcon-H1-7B sizes that halves the bandwidth of any op returning a new tensor (eager, torch.compile
    and h1r alike). A training or serving process reaches a steady state where the heap already holds those
    pages (as CUDA's caching allocator does on the GPU); raising the mmap and trim thresholds gives the
    benchmark that steady state for every path it times. Set H1R_BENCH_DEFAULT_MALLOC=1 to keep glibc's
    defaults. Returns what it did, for the header line."""
    if os.environ.get("H1R_BENCH_DEFAULT_MALLOC") == "1":
        return "glibc defaults"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # mallopt(int, int): the thresholds must fit a C int. An unchecked ctypes call masks a Python int to
        # 32 bits, so a trim threshold of 1 << 34 became 0 = trim the heap top on EVERY free: whichever output
        # happened to border the top of the heap (it depends on the process's allocation history) was then
        # unmapped and faulted back in on every call, which made the timings bimodal between processes.
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        m_trim_threshold, m_mmap_threshold = -1, -3
        int_max = 2**31 - 1  # 2 GiB: far above any single output of the benchmarks
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, int_max)
        return "freed memory kept (mallopt)" if ok else "glibc defaults (mallopt refused)"
    except OSError:
        return "allocator defaults (not glibc)"


MALLOC_MODE = _keep_freed_memory()


def timeit(fn: Callable[[], object], warmup: int = 2, iters: int = 5, min_time: float = 0.0,
           max_seconds: float | None = None, stat: str = "median",
           clock: Callable[[], float] = time.perf_counter) -> float:
    """Wall time of ``fn()`` in seconds (the median, or the minimum with ``stat="min"``, which is steadier on
    a shared machine), after ``warmup`` calls: at least ``iters`` runs and, if ``min_time`` is set, until
    that many seconds have been spent; stops early past ``max_seconds``. ``clock=time.process_time`` times
    the process CPU time instead (meaningful for single-threaded runs on a loaded machine)."""
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < iters or spent < min_time:
        t0 = clock()
        fn()
        dt = clock() - t0
        times.append(dt)
        spent += dt
        if max_seconds is not None and spent > max_seconds:
            break
    return min(times) if stat == "min" else statistics.median(times)


def timeit_round_robin(fns: dict, warmup: int = 2, iters: int = 10, copy_bytes: int = 1 << 30,
                       clock: Callable[[], float] = time.perf_counter) -> tuple[dict, float]:
    """Median seconds of each ``fns[name]()`` and the memcpy bandwidth (bytes / s, read + write counted, of a
    ``copy_bytes`` fp32 copy), all measured in turns within each round: on a shared machine the paths and
    the copy then see the same load, so that their ratios (speed-ups, share of memcpy bandwidth) hold even
    when the absolute times drift between rounds. ``copy_bytes=0`` skips the copy (bandwidth 0)."""
    src = torch.ones(copy_bytes // 4, dtype=torch.float32) if copy_bytes else None
    dst = torch.empty_like(src) if copy_bytes else None
    calls = dict(fns)
    if copy_bytes:
        calls["__memcpy__"] = lambda: dst.copy_(src)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list] = {k: [] for k in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    t_copy = med.pop("__memcpy__", None)
    return med, (2 * copy_bytes / t_copy if t_copy else 0.0)


_BANDWIDTH: dict[tuple, float] = {}


def memcpy_bandwidth(nbytes: int = 1 << 30, iters: int = 5, fresh: bool = False, stat: str = "median",
                     clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes / s of copying an ``nbytes`` fp32 tensor (read + write counted); measured once per process.

    fresh=True copies into a newly allocated tensor each time (``src.clone()``), as any op returning a new
    tensor must: on CPU the OS then maps and zeroes the pages first, which can cost as much as the copy
    (PyTorch's THP_MEM_ALLOC_ENABLE=1 makes that cheaper with huge pages)."""
    key = (nbytes, fresh, stat, clock)
    if key not in _BANDWIDTH:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = timeit(src.clone if fresh else (lambda: dst.copy_(src)), warmup=1, iters=iters, stat=stat, clock=clock)
        _BANDWIDTH[key] = 2 * nbytes / t
        del src, dst
    return _BANDWIDTH[key]


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def print_table(rows: Sequence, headers: Sequence[str] | None = None, title: str | None = None) -> None:
    """Print ``rows`` (sequences, or dicts keyed by column) as an aligned table under an optional title.

    For dict rows the columns are ``headers`` or the keys of the first row; floats get 3 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    if rows and isinstance(rows[0], dict):
        headers = list(headers or rows[0])
        rows = [[r.get(c, "") for c in headers] for r in rows]
    headers = list(headers or [])
    cells = ([list(map(str, headers))] if headers else []) + [list(map(fmt, r)) for r in rows]
    if not cells:
        return
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    if title:
        print(f"\n## {title}")
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0 and headers:
            print("  ".join("-" * w for w in widths))


def ratio_row(case: str, seconds: float, anchors: dict, nbytes: float, bw: float, bw_fresh: float) -> dict:
    """One table row of a case: our time, each anchor's time and ``anchor / ours`` (``anchors`` maps a name
    such as 'eager' or 'compile' to its seconds, in column order), and the achieved GB/s (``nbytes`` moved
    in ``seconds``) as a share of the memcpy bandwidth ``bw`` and of the fresh-buffer (clone) one ``bw_fresh``."""
    row = {"case": case, "h1r ms": f"{seconds * 1e3:.2f}"}
    for name, t in anchors.items():
        row[f"{name} ms"] = f"{t * 1e3:.2f}"
        row[f"vs {name}"] = f"{t / seconds:.2f}x"
    achieved = nbytes / seconds
    row["h1r GB/s"] = f"{achieved / 1e9:.1f}"
    row["% memcpy"] = f"{100 * achieved / bw:.0f}%"
    row["% clone"] = f"{100 * achieved / bw_fresh:.0f}%"
    return row


def memory_bandwidths() -> tuple[float, float]:
    """Measure and print (with the thread count, h1r's CPU ISA, THP_MEM_ALLOC_ENABLE and the malloc mode) the memcpy
    bandwidth and the copy-into-a-fresh-tensor (clone) one; returns both, bytes / s."""
    bw, bw_fresh = memcpy_bandwidth(), memcpy_bandwidth(fresh=True)
    print(f"threads {torch.get_num_threads()}, cpu isa {torch.ops.h1r.cpu_isa()}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, malloc: {MALLOC_MODE}; memory copy {bw / 1e9:.1f} GB/s (read + write), "
          f"into a fresh tensor (clone) {bw_fresh / 1e9:.1f} GB/s")
    return bw, bw_fresh
