"""The CUDA kernels (torch.ops.h1r.* on CUDA tensors) against their anchors, at the Falcon-H1-7B shapes.

Cases (batch 1 unless said, bf16 activations, fp32 states):
  * selective_scan forward, and forward + backward, L in {2048, 8192}: the Mamba2 mixer, H=24, P=128,
    N=256, G=1, chunk 128 (dt_softplus, D, z, dt_bias, final states);
  * causal_conv1d forward, and forward + backward: conv_dim 3584, width 4, channel-last (as the mixer
    feeds it), silu, L in {2048, 8192};
  * decode at batch {1, 16, 64}: selective_state_update (state (b, 24, 128, 256) fp32) and
    causal_conv1d_update (state (b, 3584, 3));
  * paged_attention_decode, GQA 12 query / 2 kv heads, head_dim 128, block 16 (the cases of
    benchmarks/bench_paged_attention.py).
Anchors, each timed in the same run: h1r_ops.reference eager on CUDA, torch.compile of the reference, our
Triton kernel where the op has one (none of these ops has: said so), and the peers when importable
(mamba_ssm, causal_conv1d, flash_attn, vllm; "not installed" otherwise); for paged decode also SDPA on a
dense K/V copy. Each row prints the time, the anchor / ours ratio, and the bytes the op must move per second
against the device copy bandwidth measured in the same run (a 1 GiB copy, read + write).
Times are the median of CUDA-event-timed calls after warmup.

    python benchmarks/bench_cuda.py             # all cases
    python benchmarks/bench_cuda.py --quick     # one shape per op
    python benchmarks/bench_cuda.py --only scan,paged --no-compile

Without CUDA (or without h1r's CUDA kernels) it prints why and exits 0: nothing to time.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table  # noqa: E402

H, P, N, G, CHUNK = 24, 128, 256, 1, 128  # Falcon-H1-7B mixer
CONV_DIM, WIDTH = 3584, 4                 # H * P + 2 * G * N
HQ, HK, HD, BLOCK = 12, 2, 128, 16        # Falcon-H1-7B attention (bench_paged_attention.py)
OPS = ("scan", "conv", "decode", "paged")


def skip_reason() -> str | None:
    """Why nothing can be timed here, or None."""
    if not torch.cuda.is_available():
        return "torch.cuda is not available on this machine"
    importlib.import_module("h1r_ops")  # loads the extension and its registrations

    if not torch._C._dispatch_has_kernel_for_dispatch_key("h1r::selective_scan_fwd", "CUDA"):
        return "h1r_ops was built without its CUDA kernels (H1R_NO_CUDA=1, or no nvcc at build time)"
    return None


def cuda_time(fn: Callable[[], object], warmup: int = 3, iters: int = 20, max_seconds: float = 2.0) -> float:
    """Median seconds of one ``fn()`` on the current stream, each call timed by a pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, spent = [], 0.0
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        spent += times[-1]
        if spent > max_seconds:
            break
    return statistics.median(times)


def device_memcpy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes / s of a device-to-device copy of an ``nbytes`` fp32 tensor (read + write counted)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), warmup=2, iters=10)


def peer(module: str, attr: str):
    """``module.attr`` if importable, else the reason as a string (a peer is never required)."""
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except ImportError:
        return f"{module} not installed"
    except Exception as e:  # noqa: BLE001 - a broken peer install is reported, not fatal
        return f"{module}.{attr} unavailable ({type(e).__name__}: {e})"


class Bench:
    """Collects the rows: each case times ours, then every anchor (a callable, or a string saying why not)."""

    def __init__(self, bandwidth: float, compile_ref: bool, iters: int):
        self.bw, self.compile_ref, self.iters, self.rows = bandwidth, compile_ref, iters, []
        self._compiled: dict = {}

    def compiled(self, fn):
        """torch.compile of a reference function (one compiled object per function), or a reason."""
        if not self.compile_ref:
            return "skipped (--no-compile)"
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, dynamic=False)
        return self._compiled[fn]

    def case(self, name: str, nbytes: float, ours: Callable, anchors: dict[str, object]) -> None:
        t_ours = cuda_time(ours, iters=self.iters)
        self._row(name, "h1r cuda (ours)", t_ours, t_ours, nbytes)
        for label, fn in anchors.items():
            if isinstance(fn, str):
                self.rows.append([name, label, fn, "", "", ""])
                continue
            try:
                t = cuda_time(fn, warmup=2, iters=max(3, self.iters // 2))
            except Exception as e:  # noqa: BLE001 - an anchor that fails (compile, OOM) is reported
                self.rows.append([name, label, f"failed: {type(e).__name__}: {str(e)[:60]}", "", "", ""])
                torch.cuda.empty_cache()
                continue
            self._row(name, label, t, t_ours, nbytes)
        print(f"  done {name}", flush=True)

    def _row(self, name, label, t, t_ours, nbytes):
        gbs = nbytes / t / 1e9
        self.rows.append([name, label, f"{t * 1e3:.3f}", f"{t / t_ours:.2f}", f"{gbs:.0f}",
                          f"{100 * nbytes / t / self.bw:.0f}%"])


def no_triton(op: str) -> str:
    return f"no Triton kernel for {op} in h1r_ops.triton_kernels"


# ---- selective scan ------------------------------------------------------------------------------------

def scan_inputs(b, l, dtype, gen):
    dev = "cuda"
    return dict(
        x=torch.randn(b, l, H, P, device=dev, generator=gen).to(dtype),
        dt=(torch.randn(b, l, H, device=dev, generator=gen) * 0.5).to(dtype),
        A=-torch.rand(H, device=dev, generator=gen) * 4 - 0.5,
        B=torch.randn(b, l, G, N, device=dev, generator=gen).to(dtype),
        C=torch.randn(b, l, G, N, device=dev, generator=gen).to(dtype),
        D=torch.randn(H, device=dev, generator=gen),
        z=torch.randn(b, l, H, P, device=dev, generator=gen).to(dtype),
        dt_bias=torch.randn(H, device=dev, generator=gen) * 0.1,
    )


def bench_scan(bench: Bench, lengths, dtype, gen):
    from h1r_ops.reference import selective_scan_ref

    mamba_scan = peer("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    for l in lengths:
        t = scan_inputs(1, l, dtype, gen)
        x, dt, A, B, C, D, z, dtb = (t[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
        el = x.element_size()
        io = 3 * x.numel() * el + 2 * B.numel() * el + dt.numel() * el + H * P * N * 4  # x, z, out; B, C; dt; final

        def ours():
            return torch.ops.h1r.selective_scan_fwd(x, dt, A, B, C, CHUNK, D, z, dtb, None, None, True, 0.0, math.inf)

        def ref(fn=selective_scan_ref):
            return fn(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dtb, dt_softplus=True, return_final_states=True)

        comp = bench.compiled(selective_scan_ref)
        anchors = {"reference eager": ref,
                   "torch.compile(reference)": comp if isinstance(comp, str) else (lambda c=comp: ref(c)),
                   "triton (h1r)": no_triton("selective_scan"),
                   "mamba_ssm chunk_scan_combined": mamba_scan if isinstance(mamba_scan, str) else (
                       lambda: mamba_scan(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dtb, dt_softplus=True,
                                          return_final_states=True))}
        bench.case(f"scan fwd L={l}", io, ours, anchors)

        # forward + backward: ours = the fwd op then the bwd op; the anchors through torch.autograd
        dout = torch.randn_like(x)

        def ours_fb():
            torch.ops.h1r.selective_scan_fwd(x, dt, A, B, C, CHUNK, D, z, dtb, None, None, True, 0.0, math.inf)
            return torch.ops.h1r.selective_scan_bwd(dout, None, x, dt, A, B, C, CHUNK, D, z, dtb, None, None, True,
                                                    0.0, math.inf)

        leaves = [v.detach().requires_grad_() for v in (x, dt, A, B, C, D, z, dtb)]

        def autograd_of(fwd):
            def run():
                out = fwd(*leaves)
                out = out[0] if isinstance(out, tuple) else out
                return torch.autograd.grad(out, leaves, dout)
            return run

        def ref_fb_of(fn):
            return autograd_of(lambda x_, dt_, A_, B_, C_, D_, z_, b_: fn(x_, dt_, A_, B_, C_, CHUNK, D=D_, z=z_,
                                                                          dt_bias=b_, dt_softplus=True))

        io_fb = io + 4 * x.numel() * el + 2 * B.numel() * 4  # + dout, dx, dz, (x re-read); dB, dC
        anchors = {"reference eager": ref_fb_of(selective_scan_ref),
                   "torch.compile(reference)": comp if isinstance(comp, str) else ref_fb_of(comp),
                   "triton (h1r)": no_triton("selective_scan"),
                   "mamba_ssm chunk_scan_combined": mamba_scan if isinstance(mamba_scan, str) else ref_fb_of(
                       lambda *a, **k: mamba_scan(*a, **k))}
        bench.case(f"scan fwd+bwd L={l}", io_fb, ours_fb, anchors)


# ---- causal conv1d -------------------------------------------------------------------------------------

def bench_conv(bench: Bench, lengths, dtype, gen):
    from h1r_ops.reference import causal_conv1d_ref

    peer_fn = peer("causal_conv1d", "causal_conv1d_fn")
    for l in lengths:
        x = torch.randn(1, l, CONV_DIM, device="cuda", generator=gen).to(dtype).transpose(1, 2)  # channel-last
        w = torch.randn(CONV_DIM, WIDTH, device="cuda", generator=gen) * 0.5
        bias = torch.randn(CONV_DIM, device="cuda", generator=gen)
        io = 2 * x.numel() * x.element_size()

        def ours():
            return torch.ops.h1r.causal_conv1d_fwd(x, w, bias, None, None, False, True)

        comp = bench.compiled(causal_conv1d_ref)
        anchors = {"reference eager": lambda: causal_conv1d_ref(x, w, bias, activation="silu"),
                   "torch.compile(reference)": comp if isinstance(comp, str) else (
                       lambda: comp(x, w, bias, activation="silu")),
                   "triton (h1r)": no_triton("causal_conv1d"),
                   "causal_conv1d (Dao-AILab)": peer_fn if isinstance(peer_fn, str) else (
                       lambda: peer_fn(x, w, bias, activation="silu"))}
        bench.case(f"conv fwd L={l}", io, ours, anchors)

        dout = torch.randn_like(x)

        def ours_fb():
            torch.ops.h1r.causal_conv1d_fwd(x, w, bias, None, None, False, True)
            return torch.ops.h1r.causal_conv1d_bwd(dout, None, x, w, bias, None, None, True)

        leaves = [v.detach().requires_grad_() for v in (x, w, bias)]

        def fb_of(fn):
            def run():
                return torch.autograd.grad(fn(*leaves, activation="silu"), leaves, dout)
            return run

        anchors = {"reference eager": fb_of(causal_conv1d_ref),
                   "torch.compile(reference)": comp if isinstance(comp, str) else fb_of(comp),
                   "triton (h1r)": no_triton("causal_conv1d"),
                   "causal_conv1d (Dao-AILab)": peer_fn if isinstance(peer_fn, str) else fb_of(peer_fn)}
        bench.case(f"conv fwd+bwd L={l}", io + 3 * x.numel() * x.element_size(), ours_fb, anchors)


# ---- decode steps --------------------------------------------------------------------------------------

def bench_decode(bench: Bench, batches, dtype, gen):
    from h1r_ops.reference import causal_conv1d_update_ref, selective_state_update_ref

    mamba_ssu = peer("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    conv_upd = peer("causal_conv1d", "causal_conv1d_update")
    for b in batches:
        dev = "cuda"
        state = torch.randn(b, H, P, N, device=dev, generator=gen)
        x = torch.randn(b, H, P, device=dev, generator=gen).to(dtype)
        z = torch.randn(b, H, P, device=dev, generator=gen).to(dtype)
        dt = torch.randn(b, H, device=dev, generator=gen).to(dtype)
        A = -torch.rand(H, device=dev, generator=gen) * 4 - 0.5
        Bm = torch.randn(b, G, N, device=dev, generator=gen).to(dtype)
        Cm = torch.randn(b, G, N, device=dev, generator=gen).to(dtype)
        D, dtb = torch.randn(H, device=dev, generator=gen), torch.randn(H, device=dev, generator=gen) * 0.1
        io = 2 * state.numel() * 4 + 3 * x.numel() * x.element_size()  # the state read + written dominates

        def ours():
            return torch.ops.h1r.selective_state_update(state, x, dt, A, Bm, Cm, D, z, dtb, True, None)

        comp = bench.compiled(selective_state_update_ref)
        anchors = {"reference eager": lambda: selective_state_update_ref(state, x, dt, A, Bm, Cm, D=D, z=z,
                                                                         dt_bias=dtb, dt_softplus=True),
                   "torch.compile(reference)": comp if isinstance(comp, str) else (
                       lambda: comp(state, x, dt, A, Bm, Cm, D=D, z=z, dt_bias=dtb, dt_softplus=True)),
                   "triton (h1r)": no_triton("selective_state_update"),
                   "mamba_ssm selective_state_update": mamba_ssu if isinstance(mamba_ssu, str) else (
                       lambda: mamba_ssu(state, x, dt, A, Bm, Cm, D=D, z=z, dt_bias=dtb, dt_softplus=True))}
        bench.case(f"ssm decode b={b}", io, ours, anchors)

        conv_state = torch.randn(b, CONV_DIM, WIDTH - 1, device=dev, generator=gen).to(dtype)
        xc = torch.randn(b, CONV_DIM, device=dev, generator=gen).to(dtype)
        w = torch.randn(CONV_DIM, WIDTH, device=dev, generator=gen)
        bias = torch.randn(CONV_DIM, device=dev, generator=gen)
        io = 2 * conv_state.numel() * conv_state.element_size() + 2 * xc.numel() * xc.element_size()
        compc = bench.compiled(causal_conv1d_update_ref)
        anchors = {"reference eager": lambda: causal_conv1d_update_ref(xc, conv_state, w, bias, activation="silu"),
                   "torch.compile(reference)": compc if isinstance(compc, str) else (
                       lambda: compc(xc, conv_state, w, bias, activation="silu")),
                   "triton (h1r)": no_triton("causal_conv1d_update"),
                   "causal_conv1d_update (Dao-AILab)": conv_upd if isinstance(conv_upd, str) else (
                       lambda: conv_upd(xc, conv_state, w.to(dtype), bias.to(dtype), "silu"))}
        bench.case(f"conv decode b={b}", io, lambda: torch.ops.h1r.causal_conv1d_update(
            xc, conv_state, w, bias, True, None), anchors)


# ---- paged attention decode ----------------------------------------------------------------------------

def paged_case(batch, context, block, dtype, gen):
    """A shuffled page pool of `batch` sequences of `context` tokens, in pages of `block` tokens."""
    pages = math.ceil(context / block)
    nb = batch * pages
    kc = torch.randn(nb, block, HK, HD, device="cuda", generator=gen).to(dtype)
    vc = torch.randn(nb, block, HK, HD, device="cuda", generator=gen).to(dtype)
    perm = torch.randperm(nb, device="cuda", generator=gen)
    tables = perm.to(torch.int32).view(batch, pages)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return kc, vc, tables, lens


def flash_paged(fn, q, batch, context, block, dtype, gen):
    """flash_attn_with_kvcache over its own page pool (flash-attn 2 wants pages of 256 tokens)."""
    kc, vc, tables, lens = paged_case(batch, context, block, dtype, gen)
    return lambda: fn(q.unsqueeze(1), kc, vc, cache_seqlens=lens, block_table=tables, causal=True)


def bench_paged(bench: Bench, cases, dtype, gen):
    import torch.nn.functional as F
    from h1r_ops.reference import paged_attention_decode_ref

    flash = peer("flash_attn", "flash_attn_with_kvcache")
    vllm_flash = peer("vllm.vllm_flash_attn", "flash_attn_with_kvcache")
    for batch, context in cases:
        kc, vc, tables, lens = paged_case(batch, context, BLOCK, dtype, gen)
        q = torch.randn(batch, HQ, HD, device="cuda", generator=gen).to(dtype)
        scale = 1 / math.sqrt(HD)
        kv_bytes = 2 * batch * context * HK * HD * kc.element_size()
        dense = [c[tables.long()].reshape(batch, -1, HK, HD)[:, :context].transpose(1, 2).contiguous()
                 for c in (kc, vc)]

        comp = bench.compiled(paged_attention_decode_ref)
        anchors = {
            "reference eager": lambda: paged_attention_decode_ref(q, kc, vc, tables, lens, scale),
            "torch.compile(reference)": comp if isinstance(comp, str) else (
                lambda: comp(q, kc, vc, tables, lens, scale)),
            "triton (h1r)": no_triton("paged_attention_decode"),
            "SDPA on dense K/V": lambda: F.scaled_dot_product_attention(q.unsqueeze(2), *dense, scale=scale,
                                                                        enable_gqa=True),
            "flash_attn paged (block 256)": flash if isinstance(flash, str) else flash_paged(
                flash, q, batch, context, 256, dtype, gen),
            "vllm flash_attn paged (block 16)": vllm_flash if isinstance(vllm_flash, str) else flash_paged(
                vllm_flash, q, batch, context, BLOCK, dtype, gen),
        }
        bench.case(f"paged decode b={batch} ctx={context}", kv_bytes,
                   lambda: torch.ops.h1r.paged_attention_decode(q, kc, vc, tables, lens, scale), anchors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(OPS)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")

    reason = skip_reason()
    if reason:
        print(f"bench_cuda: skipped: {reason}; nothing to time.")
        return 0

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = device_memcpy_bandwidth()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}")
    print(f"device memcpy bandwidth (1 GiB copy, read + write): {bw / 1e9:.0f} GB/s\n")
    bench = Bench(bw, not args.no_compile, args.iters)
    lengths = [2048] if args.quick else [2048, 8192]
    batches = [16] if args.quick else [1, 16, 64]
    paged = [(16, 4096)] if args.quick else [(1, 512), (1, 4096), (16, 512), (16, 4096), (64, 512), (64, 4096),
                                             (1, 32768)]
    if "scan" in only:
        bench_scan(bench, lengths, dtype, gen)
    if "conv" in only:
        bench_conv(bench, lengths, dtype, gen)
    if "decode" in only:
        bench_decode(bench, batches, dtype, gen)
    if "paged" in only:
        bench_paged(bench, paged, dtype, gen)
    print_table(bench.rows, ["case", "impl", "ms", "x ours", "GB/s", "of memcpy"])
    print("\nx ours: the row's time / ours (above 1: ours is faster). GB/s: the bytes the op must move (inputs"
          "\nread once, outputs written once; scratch not counted) per second; of memcpy: / the device copy"
          "\nbandwidth measured at the start of this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
