"""RMSNorm and gated RMSNorm fwd / fwd+bwd on CPU: h1r kernels vs eager torch (the reference: transformers'
FalconH1RMSNorm / FalconH1RMSNormGated math) and torch.compile of it, plus GB/s against the memory-copy
bandwidth measured in the same run.

    python benchmarks/bench_rms_norm.py                 # 2048 x 3072 and the anchor 8192 x 3072 (Falcon-H1-7B),
                                                        # rms_norm and gated, fp32 and bf16
    python benchmarks/bench_rms_norm.py --quick         # 2048 x 3072 only, fewer iterations
    python benchmarks/bench_rms_norm.py --shapes 4096x4096 --dtypes bf16 --ops rms_norm --residual

Each case times h1r, eager, torch.compile and a 1 GiB memcpy in turns (round robin, median of --iters rounds,
the paths in a new random order every round so that none always inherits the cache state of the same
predecessor): "% memcpy" is against the memcpy measured in the same rounds, so the ratios hold on a shared,
loaded machine.

Bytes counted for our kernels (the minimum traffic): rms_norm fwd reads x (and residual) and writes out (and the
new residual); bwd reads dout (and dresidual), h and writes dh. Gated (with z, one group, Falcon-H1's
norm_before_gate=False): fwd reads x, z, writes out; bwd reads dout, x, z and writes dx, dz. Weight and rstd are
negligible.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h1r_ops  # noqa: E402
from h1r_ops import reference as R  # noqa: E402
from common import memory_bandwidths, print_table, ratio_row  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_fns(impl, x, w, r, dout, eps=1e-5):
    """(fwd, fwd+bwd) closures for impl(x, w, eps, residual)."""
    fused = r is not None

    def fwd():
        with torch.no_grad():
            return impl(x, w, eps, r)

    def fwd_bwd():
        res = impl(x, w, eps, r)
        out = res[0] if fused else res
        inputs = (x, w, r) if fused else (x, w)
        return torch.autograd.grad(out, inputs, dout)

    return fwd, fwd_bwd


def make_gated_fns(impl, x, z, w, dout, eps=1e-5):
    """(fwd, fwd+bwd) closures for impl(x, z, w, eps, group_size=d, norm_before_gate=False)."""

    def fwd():
        with torch.no_grad():
            return impl(x, z, w, eps, None, False)

    def fwd_bwd():
        return torch.autograd.grad(impl(x, z, w, eps, None, False), (x, z, w), dout)

    return fwd, fwd_bwd


def timeit_shuffled(fns: dict, warmup: int = 2, iters: int = 10, clock=time.perf_counter, copy_bytes: int = 1 << 30,
                    seed: int = 0) -> tuple[dict, float]:
    """As common.timeit_round_robin (median seconds of each path and the memcpy bandwidth of a ``copy_bytes``
    fp32 copy, all timed in turns within each round), with the paths and the copy in a new random order every
    round: a path then does not always run on the cache state its predecessor left (in a fixed order the h1r
    forward always followed the eager backward's fp32 temporaries, and torch.compile's forward always followed
    the h1r backward, which had just read x)."""
    src = torch.ones(copy_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    calls = dict(fns)
    calls["__memcpy__"] = lambda: dst.copy_(src)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    rng = random.Random(seed)
    keys = list(calls)
    times: dict[str, list] = {k: [] for k in keys}
    for _ in range(iters):
        rng.shuffle(keys)
        for k in keys:
            t0 = clock()
            calls[k]()
            times[k].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, 2 * copy_bytes / med.pop("__memcpy__")


def parse_shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2048x3072,8192x3072", help="rows x hidden, comma separated")
    p.add_argument("--rows", type=int, help="one shape: rows (with --hidden; overrides --shapes)")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--ops", default="rms_norm,gated", help="rms_norm, gated (Mamba2's gated norm, with z)")
    p.add_argument("--residual", action="store_true", help="rms_norm with the fused residual add")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="2048 x 3072 only, 5 iterations")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-clock", action="store_true",
                   help="time process CPU time instead of wall time: with --threads 1, robust to a loaded machine "
                        "(a descheduled process is not charged)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = [(a.rows, a.hidden)] if a.rows else parse_shapes(a.shapes)
    if a.quick:
        shapes, a.iters = [(2048, a.hidden)], 5
    bw, bw_fresh = memory_bandwidths()
    # One compiled function per op serves every shape and dtype (and grad mode): more than dynamo's default
    # recompile limit of 8, past which it silently falls back to eager.
    torch._dynamo.config.recompile_limit = 64
    compiled = {"rms_norm": torch.compile(R.rms_norm), "gated": torch.compile(R.gated_rms_norm)}
    rows = []
    for op in a.ops.split(","):
        for n_rows, hidden in shapes:
            for name in a.dtypes.split(","):
                rows += bench_case(op, n_rows, hidden, DTYPES[name], name, a, compiled[op], bw, bw_fresh)
    print_table(rows)


def bench_case(op, n_rows, hidden, dtype, name, a, compiled_ref, bw, bw_fresh):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, hidden, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).requires_grad_()
    dout = torch.randn(n_rows, hidden, generator=g).to(dtype)
    n_bytes = x.numel() * x.element_size()
    if op == "gated":
        z = torch.randn(n_rows, hidden, generator=g).to(dtype).requires_grad_()
        impls = {"eager": R.gated_rms_norm, "h1r": h1r_ops.gated_rms_norm}
        make = lambda impl: make_gated_fns(impl, x, z, w, dout)  # noqa: E731
        streams = {"fwd": 3, "fwd+bwd": 3 + 5}
        label = f"gated {n_rows}x{hidden} {name}"
    else:
        r = torch.randn(n_rows, hidden, generator=g).to(dtype).requires_grad_() if a.residual else None
        impls = {"eager": R.rms_norm, "h1r": h1r_ops.rms_norm}
        make = lambda impl: make_fns(impl, x, w, r, dout)  # noqa: E731
        streams = {"fwd": 2 + 2 * a.residual, "fwd+bwd": 5 + 2 * a.residual}
        label = f"rms_norm {n_rows}x{hidden} {name}{' +res' if a.residual else ''}"
    if not a.no_compile:
        impls["compile"] = compiled_ref
    fns = {}
    for impl_name, impl in impls.items():
        fns[impl_name, "fwd"], fns[impl_name, "fwd+bwd"] = make(impl)
    # Every path and a 1 GiB memcpy in turns, each round in a new order: the ratios hold on a loaded machine.
    clock = time.process_time if a.cpu_clock else time.perf_counter
    times, bw_case = timeit_shuffled(fns, 2, a.iters, clock=clock)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        anchors = {k: times[k, mode] for k in ("eager", "compile") if (k, mode) in times}
        row = ratio_row(f"{label} {mode}", times["h1r", mode], anchors, streams[mode] * n_bytes, bw_case, bw_fresh)
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
