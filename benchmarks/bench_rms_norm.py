"""RMSNorm fwd / fwd+bwd on CPU: h1r kernels vs eager torch (transformers' FalconH1RMSNorm math, the reference)
and torch.compile of it, plus GB/s against the memory-copy bandwidth measured in the same run.

    python benchmarks/bench_rms_norm.py                 # Falcon-H1-7B: 8192 x 3072, fp32 and bf16
    python benchmarks/bench_rms_norm.py --quick         # smaller shape, fewer iterations
    python benchmarks/bench_rms_norm.py --rows 4096 --hidden 4096 --dtypes bf16 --residual

Bytes counted for our kernels (the minimum traffic): fwd reads x (and residual) and writes out (and the new
residual); bwd reads dout (and dresidual), h and writes dh. Weight and rstd are negligible.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h1r_ops  # noqa: E402
from h1r_ops import reference as R  # noqa: E402
from common import memcpy_bandwidth, print_table, timeit  # noqa: E402

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--residual", action="store_true", help="fused residual add")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.iters = min(a.rows, 2048), 5
    bw, bw_fresh = memcpy_bandwidth(), memcpy_bandwidth(fresh=True)
    print(f"threads {torch.get_num_threads()}, cpu isa {torch.ops.h1r.cpu_isa()}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; memory copy {bw / 1e9:.1f} GB/s (read + write), "
          f"into a fresh tensor (clone) {bw_fresh / 1e9:.1f} GB/s")
    compiled_ref = torch.compile(R.rms_norm)
    rows = []
    for name in a.dtypes.split(","):
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.rows, a.hidden, generator=g).to(dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(a.hidden, generator=g)).to(dtype).requires_grad_()
        r = torch.randn(a.rows, a.hidden, generator=g).to(dtype).requires_grad_() if a.residual else None
        dout = torch.randn(a.rows, a.hidden, generator=g).to(dtype)
        n_bytes = x.numel() * x.element_size()
        streams = {"fwd": 2 + 2 * a.residual, "fwd+bwd": 5 + 2 * a.residual}
        impls = {"eager": R.rms_norm, "h1r": h1r_ops.rms_norm}
        if not a.no_compile:
            impls["compile"] = compiled_ref
        times = {}
        for impl_name, impl in impls.items():
            fwd, fwd_bwd = make_fns(impl, x, w, r, dout)
            times[impl_name] = {"fwd": timeit(fwd, 2, a.iters), "fwd+bwd": timeit(fwd_bwd, 2, a.iters)}
        for mode in ("fwd", "fwd+bwd"):
            t = times["h1r"][mode]
            gbs = streams[mode] * n_bytes / t
            row = {"case": f"{a.rows}x{a.hidden} {name}{' +res' if a.residual else ''} {mode}",
                   "h1r ms": f"{t * 1e3:.1f}", "eager ms": f"{times['eager'][mode] * 1e3:.1f}",
                   "vs eager": f"{times['eager'][mode] / t:.2f}x"}
            if "compile" in times:
                row["compile ms"] = f"{times['compile'][mode] * 1e3:.1f}"
                row["vs compile"] = f"{times['compile'][mode] / t:.2f}x"
            row["h1r GB/s"] = f"{gbs / 1e9:.1f}"
            row["% memcpy"] = f"{100 * gbs / bw:.0f}%"
            row["% clone"] = f"{100 * gbs / bw_fresh:.0f}%"
            rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
