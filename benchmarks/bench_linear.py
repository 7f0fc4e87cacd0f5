"""The few-rows linear layer (h1r::linear) and the SwiGLU pass (h1r::swiglu) on CPU, against the BLAS paths
they replace, with GB/s of weights read against the memory-copy bandwidth measured in the same run.

Cases: the Falcon-H1 projections of the model benchmark (hidden 1024): the fused [mamba in_proj | q | k |
v] (3856 x 1024), the MLP's [gate | up] (5632 x 1024) and down (1024 x 2816) and the lm head (32768 x 1024),
for m = 1..16 rows (decode of m sequences). Anchors: torch's matrix-vector product (m = 1) or GEMM (oneDNN,
AMX for bf16) and the GEMM on a oneDNN-blocked copy of the weight (``prepack_weights``' path). Bytes
counted: the weight, read once (x and the output are small). The weights of the smaller cases partly stay
in the last-level cache between calls, so their GB/s can pass the memcpy figure.

    python benchmarks/bench_linear.py [--quick] [--dtypes bf16,fp32] [--rows 1,2,4,8,16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h1r_ops  # noqa: E402,F401
from common import memory_bandwidths, print_table, ratio_row, timeit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"in|q|k|v": (3856, 1024), "gate|up": (5632, 1024), "down": (1024, 2816), "lm head": (32768, 1024)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.iters, a.rows = 5, "1,4,16"
    bw, bw_fresh = memory_bandwidths()
    rows = []
    for dname in a.dtypes.split(","):
        dtype = DTYPES[dname]
        for case, (n, k) in SHAPES.items():
            w = (torch.randn(n, k) / k**0.5).to(dtype)
            packed = None
            if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
            for m in map(int, a.rows.split(",")):
                x = torch.randn(m, k).to(dtype)
                anchors = {"torch": timeit(lambda: torch.mv(w, x[0]) if m == 1 else torch.mm(x, w.t()), 2, a.iters,
                                           stat="min")}
                if packed is not None:
                    anchors["packed"] = timeit(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [],
                                                                                          ""), 2, a.iters, stat="min")
                ours = timeit(lambda: torch.ops.h1r.linear(x, w), 2, a.iters, stat="min")
                rows.append(ratio_row(f"{case} {n}x{k} {dname} m={m}", ours, anchors, w.numel() * w.element_size(),
                                      bw, bw_fresh))
        # the prefill MLP activation: 512 rows of [gate | up] (5632) -> 2816
        gu = torch.randn(512, 5632).to(dtype)

        def torch_swiglu():
            g, u = gu.split(2816, dim=-1)
            return F.silu(g * 0.88) * u

        rows.append(ratio_row(f"swiglu 512x5632 {dname}", timeit(lambda: torch.ops.h1r.swiglu(gu, 0.88), 2, a.iters,
                                                                     stat="min"),
                              {"torch": timeit(torch_swiglu, 2, a.iters, stat="min")}, 1.5 * gu.numel() * gu.element_size(),
                              bw, bw_fresh))
    print_table(rows)


if __name__ == "__main__":
    main()
