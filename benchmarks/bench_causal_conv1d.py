"""Benchmark of h1r causal_conv1d (forward, forward+backward) and causal_conv1d_update (decode step).

Anchors, measured in the same run: the eager plain-torch reference (h1r_ops.reference), torch.compile of
that reference, and the transformers Falcon-H1 path (nn.Conv1d with padding w-1, slice, silu; for decode,
roll the state, dot with the weight, silu). Shapes default to Falcon-H1-7B's mixer: conv_dim 3584,
width 4, batch 1 for the prefill, channel-last x as it comes out of in_proj. Bandwidth is the bytes the
op must move (x read, out written, + dout read and dx written for the backward; state read and written
for the update) over the time, against the machine's copy bandwidth measured here.

    python benchmarks/bench_causal_conv1d.py [--quick] [--dtype bf16] [--lengths 512 2048] [--batches 1 64]
                                             [--cpu-time] [--stat min] [--only prefill|update]

On a shared, oversubscribed machine wall-clock times mostly measure the scheduler: --cpu-time runs every
path on one thread and times the process CPU time (time.process_time) instead, which is what the ratios
should compare there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h1r_ops  # noqa: E402
import common  # noqa: E402
from common import memcpy_bandwidth, print_table  # noqa: E402
from h1r_ops.reference import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformers_conv(conv: torch.nn.Conv1d, xBC_bld: torch.Tensor) -> torch.Tensor:
    """FalconH1Mixer.torch_forward: act(conv1d(xBC.transpose(1, 2))[..., :seq_len])."""
    seq_len = xBC_bld.shape[1]
    return F.silu(conv(xBC_bld.transpose(1, 2))[..., :seq_len])


def transformers_decode(conv_state, x, weight, bias):
    """FalconH1Mixer.torch_forward decode: roll the state, write the new input, dot with the weight."""
    state = torch.roll(conv_state, shifts=-1, dims=-1)
    state[:, :, -1] = x
    conv_state.copy_(state)
    return F.silu(torch.sum(state * weight[:, 0, :], dim=-1) + bias)


def timeit(fn, warmup, iters):
    return common.timeit(fn, warmup=warmup, iters=iters, stat=STAT, clock=_clock())


def _clock():
    return time.process_time if CPU_TIME else time.perf_counter


CPU_TIME = False
STAT = "median"


def maybe_compile(fn, enabled):
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover
        print(f"torch.compile unavailable: {e}")
        return None


def time_or_none(fn, warmup, iters):
    if fn is None:
        return None
    try:
        return timeit(fn, warmup=warmup, iters=iters)
    except Exception as e:  # compile failures are reported, not fatal
        print(f"  (anchor failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None


def ratio(anchor, ours):
    return "-" if anchor is None else f"{anchor / ours:.2f}x"


def ms(t):
    return "-" if t is None else f"{t * 1e3:.3f}"


def bench_prefill(args, dtype, bw, rows_fwd, rows_bwd):
    d, w, b = args.dim, args.width, 1
    esize = torch.finfo(dtype).bits // 8
    conv = torch.nn.Conv1d(d, d, w, groups=d, padding=w - 1, bias=True).to(dtype)
    weight, bias = conv.weight.detach(), conv.bias.detach()  # (d, 1, w), (d,)
    for L in args.lengths:
        ref_compiled = maybe_compile(causal_conv1d_ref, args.compile)  # fresh per case: no recompiles
        xBC = torch.randn(b, L, d + 512, dtype=dtype)[..., :d]  # a slice of in_proj's output, (b, l, d)
        x = xBC.transpose(1, 2)  # channel-last (b, d, l)
        it, wu = (args.iters, 2) if L <= 2048 else (max(3, args.iters // 2), 1)

        ours = timeit(lambda: h1r_ops.causal_conv1d(x, weight, bias, activation="silu"), wu, it)
        eager = timeit(lambda: causal_conv1d_ref(x, weight, bias, activation="silu"), wu, it)
        comp = time_or_none(ref_compiled and (lambda: ref_compiled(x, weight, bias, activation="silu")), wu + 1, it)
        with torch.no_grad():
            peer = timeit(lambda: transformers_conv(conv, xBC), wu, it)
        gbs = 2 * b * L * d * esize / ours / 1e9
        rows_fwd.append([f"L={L}", ms(ours), ms(eager), ms(comp), ms(peer), ratio(eager, ours), ratio(comp, ours),
                         ratio(peer, ours), f"{gbs:.1f}", f"{gbs * 1e9 / bw:.0%}"])
        print("  forward", rows_fwd[-1], flush=True)

        # forward + backward (grads for x, weight, bias), x and dout channel-last as in the model
        xg = xBC.detach().clone().requires_grad_(True).transpose(1, 2)
        wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        dout = torch.randn(b, L, d, dtype=dtype).transpose(1, 2)

        def fb_ours():
            torch.autograd.backward(h1r_ops.causal_conv1d(xg, wg, bg, activation="silu"), dout)

        def fb_ref(fn=causal_conv1d_ref):
            torch.autograd.backward(fn(xg, wg, bg, activation="silu"), dout)

        conv_g = torch.nn.Conv1d(d, d, w, groups=d, padding=w - 1, bias=True).to(dtype)
        xBCg = xBC.detach().clone().requires_grad_(True)

        def fb_peer():
            torch.autograd.backward(transformers_conv(conv_g, xBCg), dout)

        ours = timeit(fb_ours, wu, it)
        eager = timeit(fb_ref, wu, it)
        ref_compiled = maybe_compile(causal_conv1d_ref, args.compile)
        comp = time_or_none(ref_compiled and (lambda: fb_ref(ref_compiled)), wu + 1, it)
        peer = timeit(fb_peer, wu, it)
        gbs = 5 * b * L * d * esize / ours / 1e9  # fwd: x, out; bwd: x, dout, dx
        rows_bwd.append([f"L={L}", ms(ours), ms(eager), ms(comp), ms(peer), ratio(eager, ours), ratio(comp, ours),
                         ratio(peer, ours), f"{gbs:.1f}", f"{gbs * 1e9 / bw:.0%}"])
        print("  fwd+bwd", rows_bwd[-1], flush=True)


def bench_update(args, dtype, bw, rows):
    d, w = args.dim, args.width
    esize = torch.finfo(dtype).bits // 8
    weight = torch.randn(d, 1, w, dtype=dtype)
    bias = torch.randn(d, dtype=dtype)
    for b in args.batches:
        ref_compiled = maybe_compile(causal_conv1d_update_ref, args.compile)
        x = torch.randn(b, d, dtype=dtype)
        s_ours = torch.randn(b, d, w - 1, dtype=dtype)  # h1r / causal-conv1d keep w - 1 steps
        s_ref = s_ours.clone()
        s_tf = torch.randn(b, d, w, dtype=dtype)  # transformers keeps w steps
        it = args.iters * 10
        ours = timeit(lambda: h1r_ops.causal_conv1d_update(x, s_ours, weight, bias, "silu"), 5, it)
        eager = timeit(lambda: causal_conv1d_update_ref(x, s_ref, weight, bias, "silu"), 5, it)
        comp = time_or_none(ref_compiled and (lambda: ref_compiled(x, s_ref, weight, bias, "silu")), 5, it)
        peer = timeit(lambda: transformers_decode(s_tf, x, weight, bias), 5, it)
        nbytes = b * d * (2 * (w - 1) + 2) * esize
        gbs = nbytes / ours / 1e9
        rows.append([f"b={b}", f"{ours * 1e6:.1f}", f"{eager * 1e6:.1f}", "-" if comp is None else f"{comp * 1e6:.1f}",
                     f"{peer * 1e6:.1f}", ratio(eager, ours), ratio(comp, ours), ratio(peer, ours), f"{gbs:.1f}",
                     f"{gbs * 1e9 / bw:.0%}"])
        print("  update", rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L=512 and batch 1, 64 only, fewer iterations")
    ap.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--dim", type=int, default=3584)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--cpu-time", action="store_true", help="one thread everywhere, time process CPU time")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="per case statistic; min is steadier on a shared machine")
    ap.add_argument("--only", choices=["prefill", "update"], help="run only the prefill (fwd, fwd+bwd) or the decode cases")
    args = ap.parse_args()
    global CPU_TIME, STAT
    CPU_TIME, STAT = args.cpu_time, args.stat
    if CPU_TIME:
        torch.set_num_threads(1)  # also the OpenMP team size of the h1r kernels
    if args.quick:
        args.lengths, args.batches, args.iters = [512], [1, 64], 5

    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # one compiled anchor per case and dtype
    bw = memcpy_bandwidth(stat=STAT, clock=_clock())
    print(f"h1r causal_conv1d benchmark ({'process CPU time' if CPU_TIME else 'wall time'}): "
          f"{torch.get_num_threads()} threads, CPU ISA {torch.ops.h1r.cpu_isa()}, "
          f"memcpy {bw / 1e9:.1f} GB/s (read + write), conv_dim {args.dim}, width {args.width}", flush=True)
    heads = ["case", "h1r ms", "eager ms", "compile ms", "transformers ms", "vs eager", "vs compile",
             "vs transformers", "GB/s", "of memcpy"]
    for name in args.dtype:
        dtype = DTYPES[name]
        rows_fwd, rows_bwd, rows_upd = [], [], []
        if args.only != "update":
            bench_prefill(args, dtype, bw, rows_fwd, rows_bwd)
        if args.only != "prefill":
            bench_update(args, dtype, bw, rows_upd)
        if rows_fwd:
            print(f"\n== forward, {name}, batch 1, channel-last x, silu ==")
            print_table(rows_fwd, heads)
            print(f"\n== forward + backward (dx, dweight, dbias), {name} ==")
            print_table(rows_bwd, heads)
        if rows_upd:
            print(f"\n== update (one decode step), {name}, state_len {args.width - 1} (times in us) ==")
            print_table(rows_upd, [h.replace("ms", "us") for h in heads])


if __name__ == "__main__":
    main()
