"""benchmarks/common.py: its allocator setting really keeps freed memory (no timing here).

The benchmarks raise glibc's mmap and trim thresholds so that a large output freed by one call is reused by
the next without page faults. A trim threshold that does not reach glibc intact (ctypes once masked 1 << 34
to 0, "trim on every free") makes each re-allocation at the heap top fault all its pages back in, and the
timings of a process depend on where its outputs happened to land."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import ctypes, resource, sys
sys.path.insert(0, sys.argv[1])
import common
assert common.MALLOC_MODE == "freed memory kept (mallopt)", common.MALLOC_MODE
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20                        # 64 MiB: above glibc's default mmap threshold, at the heap top
for i in range(4):
    if i == 1:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)          # touch every page
    libc.free(p)                    # back to the heap top: kept, or trimmed (unmapped) if the threshold is 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def test_freed_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "H1R_BENCH_DEFAULT_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(ROOT, "benchmarks")], env=env,
                         capture_output=True, text=True, check=True).stdout
    faults = int(out.split()[-1])
    assert faults < 1024, f"{faults} page faults in 3 re-allocations of a freed 64 MiB block (3 x 16384 if trimmed)"
