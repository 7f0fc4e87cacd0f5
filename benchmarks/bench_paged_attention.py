"""Paged-attention decode on the CPU against its anchors, at the Falcon-H1-7B attention shape.

For each (batch, context) case it times, in the same run:
  * h1r_ops.paged_attention_decode on a shuffled page pool (the op under test);
  * SDPA on contiguous K/V (what a dense cache would give: the anchor to match);
  * the plain-torch reference (eager, and torch.compile of it unless --no-compile);
and prints the ratios, plus the KV bytes read per second against the machine's memory-copy bandwidth
(decode reads every K and V entry once: it is bandwidth-bound).

    python benchmarks/bench_paged_attention.py            # full grid, bf16
    python benchmarks/bench_paged_attention.py --quick    # two small cases
    python benchmarks/bench_paged_attention.py --prefill --heads 8 --threads 2   # causal prefill

--prefill times paged_attention_prefill (a whole prompt per sequence, causal) on the shuffled page pool
and on one page per sequence (the fused model's cache layout) against SDPA (is_causal, enable_gqa) on the
same K/V dense, interleaved round-robin, and prints the causal FLOP rate (QK^T + PV over the visible half).
bf16 runs the AMX tile path where the CPU has it (H1R_CPU_NO_AMX=1 for the fp32-vector kernel).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h1r_ops  # noqa: E402
from common import memcpy_bandwidth, print_table, timeit  # noqa: E402
from h1r_ops.reference import paged_attention_decode_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_case(batch, context, hq, hk, hd, bs, dtype, seed=0):
    """A page pool holding `batch` sequences of `context` tokens in shuffled pages, and the same K/V dense."""
    g = torch.Generator().manual_seed(seed)
    pages = math.ceil(context / bs)
    num_blocks = batch * pages
    key_cache = torch.randn(num_blocks, bs, hk, hd, generator=g).to(dtype)
    value_cache = torch.randn(num_blocks, bs, hk, hd, generator=g).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=g).to(torch.int32).view(batch, pages)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, hq, hd, generator=g).to(dtype)

    # the same keys/values, contiguous (batch, hk, context, hd), for SDPA
    def dense(cache):
        return cache[block_tables.long()].reshape(batch, pages * bs, hk, hd)[:, :context].transpose(1, 2).contiguous()

    return q, key_cache, value_cache, block_tables, seq_lens, dense(key_cache), dense(value_cache)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="two small cases")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--no-ref", action="store_true", help="skip the eager reference")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: all)")
    ap.add_argument("--prefill", action="store_true", help="causal prefill instead of decode")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic of the timings (min is steadier on a shared machine)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    hq, hk, hd, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    if args.prefill:
        return prefill_main(args, dtype, hq, hk, hd, bs)
    cases = [(1, 512), (16, 512)] if args.quick else [(1, 512), (1, 4096), (16, 512), (16, 4096), (64, 512),
                                                      (64, 4096), (1, 32768)]

    bw = memcpy_bandwidth(stat=args.stat)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, h1r cpu isa {torch.ops.h1r.cpu_isa()}, "
          f"{args.dtype}, hq={hq} hk={hk} hd={hd} block={bs}")
    print(f"memcpy bandwidth (read + write): {bw / 1e9:.1f} GB/s\n")
    ref_compiled = None if args.no_compile else torch.compile(paged_attention_decode_ref, dynamic=False)

    rows = []
    for batch, context in cases:
        q, kc, vc, bt, sl, kd, vd = make_case(batch, context, hq, hk, hd, bs, dtype)
        kv_bytes = 2 * batch * context * hk * hd * kc.element_size()
        scale = 1 / math.sqrt(hd)

        def ours():
            return h1r_ops.paged_attention_decode(q, kc, vc, bt, sl, scale)

        def sdpa():
            return F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, scale=scale, enable_gqa=True)

        torch.testing.assert_close(ours().float(), sdpa().squeeze(2).float(), atol=2e-2, rtol=0)
        budget, st = 2.0, args.stat  # seconds per anchor at most
        # the copy bandwidth at this moment (the machine may be shared), 256 MiB, read + write
        bw_now = memcpy_bandwidth(1 << 28, iters=5, stat=st)
        # a pure read stream over the same bytes (the cache pool summed): what reading the KV alone costs now
        t_stream = timeit(lambda: (kc.sum(), vc.sum()), warmup=1, iters=args.iters, max_seconds=budget, stat=st)
        t_ours = timeit(ours, warmup=3, iters=args.iters, max_seconds=budget, stat=st)
        t_sdpa = timeit(sdpa, warmup=2, iters=args.iters, max_seconds=budget, stat=st)
        t_ref = float("nan")
        if not args.no_ref:
            t_ref = timeit(lambda: paged_attention_decode_ref(q, kc, vc, bt, sl, scale), warmup=1, iters=5,
                           max_seconds=budget, stat=st)
        t_comp = float("nan")
        if ref_compiled is not None:
            try:
                t_comp = timeit(lambda: ref_compiled(q, kc, vc, bt, sl, scale), warmup=2, iters=5, max_seconds=budget,
                                stat=st)
            except Exception as e:  # noqa: BLE001 - an anchor that cannot compile is reported, not fatal
                print(f"torch.compile of the reference failed at ({batch}, {context}): {type(e).__name__}")
        gbs = kv_bytes / t_ours / 1e9
        rows.append([batch, context, f"{kv_bytes / 2**20:.1f}", t_ours * 1e3, t_sdpa * 1e3, t_sdpa / t_ours,
                     t_ref * 1e3, t_ref / t_ours, t_comp * 1e3, t_comp / t_ours, gbs, f"{100 * gbs * 1e9 / bw:.0f}%",
                     f"{100 * gbs * 1e9 / bw_now:.0f}%", f"{100 * t_stream / t_ours:.0f}%"])
        print(f"  done batch {batch} context {context}", flush=True)

    print()
    print_table(rows, ["batch", "context", "KV MiB", "ours ms", "sdpa ms", "sdpa/ours", "ref ms", "ref/ours",
                       "compiled ms", "compiled/ours", "KV GB/s", "of memcpy", "of memcpy now",
                       "of read stream"])
    print("\nof memcpy: KV bytes read per second / the 1 GiB copy bandwidth measured at the start; of memcpy now:"
          "\n/ a 256 MiB copy measured just before the case (the machine is shared: the two differ under load);"
          "\nof read stream: the time of summing the same K/V pool (a pure read stream) / ours.")


def prefill_main(args, dtype, hq, hk, hd, bs):
    cases = [(1, 512), (16, 128)] if args.quick else [(1, 512), (16, 128), (4, 1024), (1, 4096)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, h1r cpu isa {torch.ops.h1r.cpu_isa()}, "
          f"{args.dtype}, hq={hq} hk={hk} hd={hd} block={bs}, prefill (causal)\n")
    rows = []
    for batch, context in cases:
        _, kc, vc, bt, sl, kd, vd = make_case(batch, context, hq, hk, hd, bs, dtype)
        q = torch.randn(batch, context, hq, hd).to(dtype)
        qd = q.transpose(1, 2)
        cu = torch.arange(0, batch * context + 1, context, dtype=torch.int32)
        k1, v1 = kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous()  # one page per sequence
        t1 = torch.arange(batch, dtype=torch.int32).view(batch, 1)
        scale = 1 / math.sqrt(hd)
        fns = {
            "paged": lambda: torch.ops.h1r.paged_attention_prefill(q.view(-1, hq, hd), kc, vc, bt, sl, cu, scale),
            "one page": lambda: torch.ops.h1r.paged_attention_prefill(q.view(-1, hq, hd), k1, v1, t1, sl, cu, scale),
            "sdpa": lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True),
        }
        want = fns["sdpa"]().transpose(1, 2).reshape(-1, hq, hd).float()
        for name in ("paged", "one page"):
            torch.testing.assert_close(fns[name]().float(), want, atol=2e-2, rtol=0)
        t = {k: timeit(fn, warmup=2, iters=args.iters, max_seconds=3.0, stat=args.stat) for k, fn in fns.items()}
        t = {k: min(v, timeit(fns[k], warmup=0, iters=args.iters, max_seconds=3.0, stat=args.stat))
             for k, v in t.items()}  # a second pass, interleaved with the others' first
        flops = 4 * batch * hq * hd * context * (context + 1) / 2
        rows.append([batch, context, t["paged"] * 1e3, t["one page"] * 1e3, t["sdpa"] * 1e3,
                     t["sdpa"] / t["paged"], t["sdpa"] / t["one page"], flops / t["one page"] / 1e9])
        print(f"  done batch {batch} context {context}", flush=True)
    print()
    print_table(rows, ["batch", "tokens", "paged ms", "one page ms", "sdpa ms", "sdpa/paged", "sdpa/one page",
                       "GFLOP/s (one page)"])


if __name__ == "__main__":
    main()
