"""Rotary embedding fwd / fwd+bwd on CPU: h1r kernels vs eager HF apply_rotary_pos_emb (the peer Liger replaces)
and torch.compile of it, plus GB/s against the memory-copy bandwidth measured in the same run.

    python benchmarks/bench_rotary.py            # Falcon-H1-7B attention: q (1, 12, 4096, 128), k (1, 2, 4096, 128)
    python benchmarks/bench_rotary.py --quick
    python benchmarks/bench_rotary.py --seqlen 8192 --dtypes bf16 --hf-layout

Each dtype times h1r, eager, torch.compile and a 1 GiB memcpy in turns (round robin, median of --iters
rounds, the paths in a new random order every round, see bench_rms_norm.timeit_shuffled): "% memcpy" is
against the memcpy measured in the same rounds, so the ratios hold on a loaded machine.

Bytes counted (the minimum traffic): each of fwd and bwd reads q, k and writes them once (cos / sin are
small); the in-place forward counts the same.
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
from bench_rms_norm import timeit_shuffled  # noqa: E402
from common import memory_bandwidths, print_table, ratio_row  # noqa: E402
from transformers.models.falcon_h1.modeling_falcon_h1 import apply_rotary_pos_emb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--hf-layout", action="store_true", help="q, k as (b, s, h, hd) storage transposed, like HF")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-clock", action="store_true",
                   help="time process CPU time instead of wall time: with --threads 1, robust to a loaded machine "
                        "(a descheduled process is not charged)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.cpu_clock else time.perf_counter
    if a.quick:
        a.seqlen, a.iters = min(a.seqlen, 1024), 5
    bw, bw_fresh = memory_bandwidths()
    compiled_hf = torch.compile(apply_rotary_pos_emb)
    rows = []
    b, s, hd = a.batch, a.seqlen, a.head_dim
    for name in a.dtypes.split(","):
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(0)

        def heads(h):
            if a.hf_layout:
                return torch.randn(b, s, h, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()
            return torch.randn(b, h, s, hd, generator=g).to(dtype).requires_grad_()

        q, k = heads(a.q_heads), heads(a.kv_heads)
        cos, sin = h1r_ops.rotary_cos_sin(torch.arange(s).expand(b, s), hd, 1e11, dtype=dtype)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        n_bytes = (q.numel() + k.numel()) * q.element_size()
        impls = {"eager": apply_rotary_pos_emb, "h1r": h1r_ops.rotary}
        if not a.no_compile:
            impls["compile"] = compiled_hf
        fns = {}
        for impl_name, impl in impls.items():
            def fwd(impl=impl):
                with torch.no_grad():
                    return impl(q, k, cos, sin)

            def fwd_bwd(impl=impl):
                qo, ko = impl(q, k, cos, sin)
                return torch.autograd.grad((qo, ko), (q, k), (dq, dk))

            fns[impl_name, "fwd"], fns[impl_name, "fwd+bwd"] = fwd, fwd_bwd
        qi, ki = q.detach().clone(), k.detach().clone()
        fns["h1r", "in-place fwd"] = lambda: h1r_ops.rotary_(qi, ki, cos, sin)
        # Every path and a 1 GiB memcpy in turns, each round in a new order: the ratios hold on a loaded machine.
        times, bw_case = timeit_shuffled(fns, 2, a.iters, clock=clock)
        for mode, streams in (("fwd", 2), ("fwd+bwd", 4), ("in-place fwd", 2)):
            ref_mode = "fwd" if mode == "in-place fwd" else mode
            anchors = {k: times[k, ref_mode] for k in ("eager", "compile") if (k, ref_mode) in times}
            rows.append(ratio_row(f"q{tuple(q.shape)} k{tuple(k.shape)} {name} {mode}", times["h1r", mode], anchors,
                                  streams * n_bytes, bw_case, bw_fresh))
    print_table(rows)


if __name__ == "__main__":
    main()
