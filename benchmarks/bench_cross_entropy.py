"""Benchmark: lm head + cross entropy, forward + backward, time and peak memory.

Paths, each in a fresh subprocess (so that its peak RSS is its own):
  eager    HF-style: logits = hidden @ weight^T, upcast to fp32, F.cross_entropy
  compile  torch.compile of the eager path
  h1r      h1r_ops.fused_linear_cross_entropy (chunked; gradients computed in the forward)

Peak memory = peak RSS during the timed fwd+bwd iterations minus the RSS before them (inputs included
in neither; the weight gradient, which every path must produce, included in all). Torch's CPU
allocator does not cache, and the worker sets MALLOC_MMAP_THRESHOLD_ so that glibc returns freed
large blocks at once: RSS follows the live tensors.

    python benchmarks/bench_cross_entropy.py            # Falcon-H1-7B: hidden 3072, vocab 130048, 4096 tokens
    python benchmarks/bench_cross_entropy.py --quick    # 1024 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def worker(path: str, dtype_name: str, T: int, d: int, V: int, warmup: int, iters: int) -> dict:
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    import h1r_ops

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, d, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(dtype).requires_grad_(True)
    target = torch.randint(0, V, (T,), generator=g)
    target[::7] = -100

    def eager(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)

    fn = {"eager": eager, "compile": torch.compile(eager),
          "h1r": lambda h, w, y: h1r_ops.fused_linear_cross_entropy(h, w, y)}[path]

    def step():
        loss = fn(hidden, weight, target)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    for _ in range(warmup):
        step()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _rss_kb("VmRSS")
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kb("VmHWM") - base
    return {"time": statistics.median(times), "peak_mb": peak / 1024, "loss": loss}


def run_case(path, dtype, T, d, V, warmup, iters):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, dtype, str(T), str(d), str(V), str(warmup),
           str(iters)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{path} {dtype} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=130048)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--paths", default="eager,compile,h1r")
    ap.add_argument("--quick", action="store_true", help="1024 tokens")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", help="also append every case's figures to this file (JSON lines)")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        p, dt, T, d, V, w, n = a.worker
        print(json.dumps(worker(p, dt, int(T), int(d), int(V), int(w), int(n))))
        return

    from common import memcpy_bandwidth, print_table

    T = 1024 if a.quick else a.tokens
    d, V = a.hidden, a.vocab
    bw = memcpy_bandwidth()
    print(f"lm head + cross entropy fwd+bwd: tokens {T}, hidden {d}, vocab {V}; memcpy {bw / 1e9:.1f} GB/s; "
          f"median of {a.iters} after {a.warmup} warm-up")
    flops = 6 * T * d * V  # logits, dhidden, dweight
    for dtype in a.dtypes.split(","):
        res = {}
        for p in a.paths.split(","):
            res[p] = run_case(p, dtype, T, d, V, a.warmup, a.iters)
            print(f"  {dtype} {p}: {res[p]}", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(dict(path=p, dtype=dtype, tokens=T, hidden=d, vocab=V, **res[p])) + "\n")
        base = res.get("eager")
        rows = []
        esize = 2 if dtype != "float32" else 4
        grads_mb = (V * d + T * d) * esize / 2**20  # dweight + dhidden: every path returns them
        nan = float("nan")
        for p, r in res.items():
            nbytes = 3 * V * d * esize + V * d * esize  # the weight read by three matmuls + its gradient written
            work = r["peak_mb"] - grads_mb  # peak beyond the returned gradients: logits and workspace
            rows.append([p, r["time"], r["time"] / base["time"] if base else nan, r["peak_mb"],
                         r["peak_mb"] / base["peak_mb"] if base else nan, work,
                         work / (base["peak_mb"] - grads_mb) if base else nan,
                         flops / r["time"] / 1e9, nbytes / r["time"] / bw, r["loss"]])
        print_table(rows, ["path", "time s", "time / eager", "peak MB", "peak / eager", "peak - grads MB",
                           "(peak - grads) / eager", "GFLOP/s", "W traffic / memcpy", "loss"],
                    title=f"{dtype} (the returned gradients dweight + dhidden are {grads_mb:.0f} MB)")


if __name__ == "__main__":
    main()
