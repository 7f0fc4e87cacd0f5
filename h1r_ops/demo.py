"""Demo: every h1r op on this machine's CPU against its plain-torch reference, with a timing table.

Run with ``python -m h1r_ops.demo`` (or ``h1r demo``). For each op: the largest error against
``h1r_ops.reference`` and the times of the kernel and of the reference (eager) on a Falcon-H1-sized
input. The full benchmark suite, with torch.compile and the peers as anchors, is in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

import h1r_ops
from h1r_ops import reference as ref


@dataclass
class Case:
    name: str
    api: str  # the public function in h1r_ops the case needs
    make: Callable[[], dict]  # inputs
    ours: Callable[[dict], object]
    theirs: Callable[[dict], object]


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _scan_inputs(L, dtype=torch.float32, b=1, h=24, p=64, n=128, g=1):
    g_ = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g_)  # noqa: E731
    return dict(x=r(b, L, h, p).to(dtype), dt=(r(b, L, h) * 0.5 - 1).to(dtype), A=-torch.rand(h, generator=g_) * 4 - 0.5,
                B=r(b, L, g, n).to(dtype) * 0.3, C=r(b, L, g, n).to(dtype) * 0.3, D=torch.ones(h), dt_bias=r(h) * 0.1)


def _state_update_inputs(b=16, h=24, p=128, n=256, g=1):
    g_ = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g_)  # noqa: E731
    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=r(b, h) * 0.5 - 1, A=-torch.rand(h, generator=g_) * 4 - 0.5,
                B=r(b, g, n) * 0.3, C=r(b, g, n) * 0.3, D=torch.ones(h), dt_bias=r(h) * 0.1)


def _cases(quick: bool) -> list[Case]:
    L = 512 if quick else 2048
    T, V, d = (512, 32768, 1024) if quick else (1024, 65536, 2048)
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    cases = [
        Case(f"selective_scan fwd  L={L} h=24 p=64 n=128", "selective_scan", lambda: _scan_inputs(L),
             lambda a: h1r_ops.selective_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], 128, D=a["D"],
                                              dt_bias=a["dt_bias"], dt_softplus=True),
             lambda a: ref.selective_scan_ref(a["x"], a["dt"], a["A"], a["B"], a["C"], 128, D=a["D"],
                                              dt_bias=a["dt_bias"], dt_softplus=True)),
        Case("selective_state_update  b=16 h=24 p=128 n=256", "selective_state_update", _state_update_inputs,
             lambda a: h1r_ops.selective_state_update(a["state"].clone(), a["x"], a["dt"], a["A"], a["B"], a["C"],
                                                      D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True),
             lambda a: ref.selective_state_update_ref(a["state"].clone(), a["x"], a["dt"], a["A"], a["B"], a["C"],
                                                      D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True)),
        Case(f"causal_conv1d fwd  d=3584 L={L} w=4 silu", "causal_conv1d",
             lambda: dict(x=r(1, L, 3584).transpose(1, 2), w=r(3584, 4) * 0.5, bias=r(3584)),
             lambda a: h1r_ops.causal_conv1d(a["x"], a["w"], a["bias"], activation="silu"),
             lambda a: ref.causal_conv1d_ref(a["x"], a["w"], a["bias"], activation="silu")),
        Case(f"rms_norm fwd  {4 * L}x3072 bf16", "rms_norm",
             lambda: dict(x=r(4 * L, 3072, dtype=torch.bfloat16), w=r(3072, dtype=torch.bfloat16)),
             lambda a: h1r_ops.rms_norm(a["x"], a["w"], 1e-5),
             lambda a: ref.rms_norm(a["x"], a["w"], 1e-5)),
        Case(f"fused linear CE fwd  T={T} d={d} V={V}", "fused_linear_cross_entropy",
             lambda: dict(h=r(T, d) * 0.1, w=r(V, d) * 0.02, t=torch.randint(0, V, (T,), generator=g)),
             lambda a: h1r_ops.fused_linear_cross_entropy(a["h"], a["w"], a["t"]),
             lambda a: ref.fused_linear_cross_entropy(a["h"], a["w"], a["t"])),
        Case(f"linear (decode lm head)  1 x {d} @ {V} bf16", "linear",
             lambda: dict(x=r(1, d, dtype=torch.bfloat16), w=r(V, d, dtype=torch.bfloat16) * 0.02),
             lambda a: h1r_ops.linear(a["x"], a["w"], alpha=0.04),
             lambda a: ref.linear_ref(a["x"], a["w"], alpha=0.04)),
        Case(f"swiglu  {T} x [gate | up] of {2 * d} bf16", "swiglu", lambda: dict(x=r(T, 4 * d, dtype=torch.bfloat16)),
             lambda a: h1r_ops.swiglu(a["x"], 0.88),
             lambda a: ref.swiglu_ref(a["x"], 0.88)),
        Case(f"sample_top_p (tokens)  64 x {V} T=0.6 p=0.95", "sample_top_p",
             lambda: dict(l=r(64, V) * 3, t=torch.full((64,), 0.6), p=torch.full((64,), 0.95),
                          u=torch.rand(64, generator=g)),
             lambda a: h1r_ops.sample_top_p(a["l"], a["t"], a["p"], a["u"]),
             lambda a: ref.sample_top_p_ref(a["l"], a["t"], a["p"], a["u"], 20)),
    ]
    ctx, seqs, bs = (1024 if quick else 2048), 16, 16

    def paged_inputs():
        # KV pages of 16 tokens, (12 query / 2 kv) heads x 128 as Falcon-H1-7B, shuffled over the pool
        nb = seqs * ctx // bs
        return dict(q=r(seqs, 12, 128), k=r(nb, bs, 2, 128), v=r(nb, bs, 2, 128),
                    bt=torch.randperm(nb, generator=g).reshape(seqs, ctx // bs).to(torch.int32),
                    sl=torch.full((seqs,), ctx, dtype=torch.int32))

    cases.append(Case(f"paged_attention_decode  {seqs} seqs x {ctx} ctx, 12/2 heads", "paged_attention_decode",
                      paged_inputs,
                      lambda a: h1r_ops.paged_attention_decode(a["q"], a["k"], a["v"], a["bt"], a["sl"]),
                      lambda a: ref.paged_attention_decode_ref(a["q"], a["k"], a["v"], a["bt"], a["sl"])))
    return cases


def _time(fn, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False, reps: int = 3) -> list[tuple]:
    """Each case: (name, max |err| vs the reference, h1r seconds, reference seconds); err is None when the
    op is not in this build."""
    rows = []
    for case in _cases(quick):
        if not hasattr(h1r_ops, case.api):
            rows.append((case.name, None, None, None))
            continue
        a = case.make()
        with torch.no_grad():
            ours, theirs = _first(case.ours(a)), _first(case.theirs(a))
            err = (ours.float() - theirs.float()).abs().max().item()
            t_ours = _time(lambda: case.ours(a), reps)
            t_ref = _time(lambda: case.theirs(a), reps)
        rows.append((case.name, err, t_ours, t_ref))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="h1r demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    b = h1r_ops.backends()
    print(f"h1r_ops {h1r_ops.__version__}: CPU kernels at {b['cpu']['isa']}, {torch.get_num_threads()} threads; "
          f"CUDA kernels compiled: {b['cuda']['compiled']}")
    table = []
    for name, err, t_ours, t_ref in run(args.quick, args.reps):
        if err is None:
            table.append((name, "not built", "", "", ""))
        else:
            table.append((name, f"{err:.2e}", f"{t_ours * 1e3:.2f}", f"{t_ref * 1e3:.2f}", f"{t_ref / t_ours:.1f}x"))
    head = ("op", "max |err|", "h1r ms", "reference ms", "speed-up")
    widths = [max(len(str(x[i])) for x in table + [head]) for i in range(5)]
    print()
    for j, row in enumerate([head] + table):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print("\nFull suite (vs torch.compile and the peers, GB/s vs memcpy): python benchmarks/run_all.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
