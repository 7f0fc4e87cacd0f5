"""Benchmark: h1r_ops.selective_scan (forward, forward + backward) and selective_state_update (decode)
against, measured in the same run:
  * the eager reference (h1r_ops.reference.selective_scan_ref / selective_state_update_ref),
  * torch.compile of the reference,
  * transformers' Falcon-H1 torch path (modeling_falcon_h1.mamba2_chunk_scan and
    mamba2_selective_state_update, the functions FalconH1Mixer.torch_forward calls).
Default shape: the Falcon-H1-7B mixer, H=24, P=128, N=256, G=1, chunk 128, batch 1.

    python benchmarks/bench_selective_scan.py [--quick] [--lens 512,2048] [--no-compile] [--no-fwd] [--no-bwd] [--no-decode]
                                              [--batches 1,16,64] [--dtypes float32,bfloat16] [--cpu-time]

L = 8192 is in the default lengths (--quick leaves it out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h1r_ops  # noqa: E402
import common  # noqa: E402
from common import memcpy_bandwidth, print_table  # noqa: E402
from h1r_ops.reference import selective_scan_ref, selective_state_update_ref  # noqa: E402

try:
    from transformers.models.falcon_h1 import modeling_falcon_h1 as hf
except Exception:  # pragma: no cover
    hf = None

H, P, N, G, CHUNK = 24, 128, 256, 1, 128
CPU_TIME = False  # --cpu-time: one thread everywhere, process CPU time instead of wall time


def timeit(fn, warmup=2, iters=5):
    """Median wall time of fn() (common.timeit), or with --cpu-time its median process CPU time."""
    return common.timeit(fn, warmup=warmup, iters=iters, clock=_clock())


def _clock():
    return time.process_time if CPU_TIME else time.perf_counter


def inputs(b, l, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    t = dict(
        x=torch.randn(b, l, H, P, generator=g).to(dtype),
        dt=(torch.randn(b, l, H, generator=g) * 0.5).to(dtype),
        A=-(torch.rand(H, generator=g) + 0.5),
        B=(torch.randn(b, l, G, N, generator=g) * N ** -0.5).to(dtype),
        C=(torch.randn(b, l, G, N, generator=g) * N ** -0.5).to(dtype),
    )
    kw = dict(D=torch.randn(H), dt_bias=torch.randn(H) * 0.5)
    if requires_grad:
        for v in list(t.values()) + list(kw.values()):
            v.requires_grad_(True)
    return t, kw


def scan_bytes(b, l, dtype):
    """Bytes a fused forward must move: read x, dt, B, C; write out; write the final state (fp32)."""
    e = torch.tensor([], dtype=dtype).element_size()
    return e * (2 * b * l * H * P + b * l * H + 2 * b * l * G * N) + 4 * b * H * P * N


def scan_bwd_bytes(b, l, dtype):
    """Bytes a fused forward + backward must move at least: the forward's, then read dout, x, dt, B, C
    again and write dx, ddt, dB, dC."""
    e = torch.tensor([], dtype=dtype).element_size()
    return scan_bytes(b, l, dtype) + e * (3 * b * l * H * P + 2 * b * l * H + 4 * b * l * G * N)


def bench_forward(lens, dtypes, compile_ref, bw, iters):
    rows = []
    for l in lens:
        for dtype in dtypes:
            t, kw = inputs(1, l, dtype)
            common = dict(chunk_size=CHUNK, dt_softplus=True, return_final_states=True, **kw)
            ours = timeit(lambda: h1r_ops.selective_scan(**t, **common), warmup=1, iters=iters)
            ref = timeit(lambda: selective_scan_ref(**t, **common), warmup=1, iters=max(1, iters // 2))
            row = dict(op="fwd", L=l, dtype=str(dtype).replace("torch.", ""), ours_ms=ours * 1e3,
                       ref_eager_ms=ref * 1e3, x_eager=ref / ours)
            if compile_ref and dtype == torch.float32:
                f = torch.compile(selective_scan_ref, dynamic=False)
                f(**t, **common)
                rc = timeit(lambda: f(**t, **common), warmup=1, iters=max(1, iters // 2))
                row.update(ref_compiled_ms=rc * 1e3, x_compiled=rc / ours)
            else:
                row.update(ref_compiled_ms=None, x_compiled=None)
            if hf is not None:
                D, bias = kw["D"], kw["dt_bias"]
                tf = timeit(lambda: hf.mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], CHUNK, D=D,
                                                         dt_bias=bias, dt_softplus=True, return_final_states=True),
                            warmup=1, iters=max(1, iters // 2))
                row.update(hf_torch_ms=tf * 1e3, x_hf=tf / ours)
            gbs = scan_bytes(1, l, dtype) / ours / 1e9
            row.update(GB_s=gbs, pct_memcpy=100 * gbs * 1e9 / bw)
            rows.append(row)
            print(row, flush=True)
    print_table(rows, title="selective_scan forward (Falcon-H1-7B mixer: H=24 P=128 N=256 G=1 chunk 128, batch 1)")


def bench_backward(lens, dtypes, compile_ref, bw, iters):
    rows = []
    for l in lens:
        for dtype in dtypes:
            t, kw = inputs(1, l, dtype, requires_grad=True)
            common = dict(chunk_size=CHUNK, dt_softplus=True, **kw)
            ins = list(t.values()) + list(kw.values())

            def step(fn):
                out = fn(**t, **common)
                torch.autograd.grad(out.float().sum(), ins)

            ours = timeit(lambda: step(h1r_ops.selective_scan), warmup=1, iters=iters)
            ref = timeit(lambda: step(selective_scan_ref), warmup=1, iters=max(1, iters // 2))
            row = dict(op="fwd+bwd", L=l, dtype=str(dtype).replace("torch.", ""), ours_ms=ours * 1e3,
                       ref_autograd_ms=ref * 1e3, x_ref=ref / ours, ref_compiled_ms=None, x_compiled=None)
            if compile_ref and dtype == torch.float32:
                f = torch.compile(selective_scan_ref, dynamic=False)
                step(f)
                rc = timeit(lambda: step(f), warmup=1, iters=max(1, iters // 2))
                row.update(ref_compiled_ms=rc * 1e3, x_compiled=rc / ours)
            if hf is not None:
                def hf_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus):
                    return hf.mamba2_chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                                                dt_softplus=dt_softplus)
                tf = timeit(lambda: step(hf_scan), warmup=1, iters=max(1, iters // 2))
                row.update(hf_torch_ms=tf * 1e3, x_hf=tf / ours)
            gbs = scan_bwd_bytes(1, l, dtype) / ours / 1e9
            row.update(GB_s=gbs, pct_memcpy=100 * gbs * 1e9 / bw)
            rows.append(row)
            print(rows[-1], flush=True)
    print_table(rows, title="selective_scan forward + backward (all input gradients)")


def bench_decode(batches, dtypes, compile_ref, bw, iters):
    rows = []
    for b in batches:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            state = torch.randn(b, H, P, N, generator=g)  # fp32 state, as Falcon-H1 keeps it
            x, z = torch.randn(b, H, P, generator=g).to(dtype), torch.randn(b, H, P, generator=g).to(dtype)
            dt, A = torch.randn(b, H, generator=g).to(dtype), -torch.rand(H, generator=g) - 0.5
            B, C = torch.randn(b, G, N, generator=g).to(dtype), torch.randn(b, G, N, generator=g).to(dtype)
            D, bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
            kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
            ours = timeit(lambda: h1r_ops.selective_state_update(state, x, dt, A, B, C, **kw), warmup=3,
                          iters=iters * 4)
            ref = timeit(lambda: selective_state_update_ref(state, x, dt, A, B, C, **kw), warmup=2, iters=iters * 2)
            row = dict(op="decode", batch=b, dtype=str(dtype).replace("torch.", ""), ours_ms=ours * 1e3,
                       ref_eager_ms=ref * 1e3, x_eager=ref / ours, ref_compiled_ms=None, x_compiled=None)
            if compile_ref:
                f = torch.compile(selective_state_update_ref, dynamic=False)
                f(state, x, dt, A, B, C, **kw)
                rc = timeit(lambda: f(state, x, dt, A, B, C, **kw), warmup=2, iters=iters * 2)
                row.update(ref_compiled_ms=rc * 1e3, x_compiled=rc / ours)
            if hf is not None:
                # transformers passes the head-tied expansions (as mamba_ssm's signature wants).
                dte, Ae = dt[:, :, None].expand(b, H, P), A[:, None, None].expand(H, P, N)
                De, be = D[:, None].expand(H, P), bias[:, None].expand(H, P)
                tf = timeit(lambda: hf.mamba2_selective_state_update(state, x, dte, Ae, B, C, D=De, z=z, dt_bias=be,
                                                                     dt_softplus=True), warmup=2, iters=iters * 2)
                row.update(hf_torch_ms=tf * 1e3, x_hf=tf / ours)
            gbs = 2 * state.numel() * 4 / ours / 1e9
            row.update(GB_s=gbs, pct_memcpy=100 * gbs * 1e9 / bw)
            rows.append(row)
            print(row, flush=True)
    print_table(rows, title="selective_state_update (decode, fp32 state (b, 24, 128, 256), x/dt/B/C/z in dtype)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="L in {512, 2048} only")
    ap.add_argument("--lens", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-fwd", action="store_true")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--batches", default="1,16,64", help="comma-separated decode batch sizes")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread everywhere, time process CPU time (a shared, oversubscribed machine)")
    a = ap.parse_args()
    lens = [int(v) for v in a.lens.split(",")] if a.lens else ([512, 2048] if a.quick else [512, 2048, 8192])
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    global CPU_TIME
    CPU_TIME = a.cpu_time
    if CPU_TIME:
        torch.set_num_threads(1)
    bw = memcpy_bandwidth(clock=_clock())
    print(f"{'process CPU time' if CPU_TIME else 'wall time'}, threads {torch.get_num_threads()}, CPU ISA {torch.ops.h1r.cpu_isa()}, memcpy {bw / 1e9:.1f} GB/s "
          "(read + write)")
    if not a.no_fwd:
        bench_forward(lens, dtypes, not a.no_compile, bw, a.iters)
    if not a.no_bwd:
        bench_backward(lens, dtypes, not a.no_compile, bw, a.iters)
    if not a.no_decode:
        bench_decode([int(v) for v in a.batches.split(",")], dtypes, not a.no_compile, bw, a.iters)


if __name__ == "__main__":
    main()
