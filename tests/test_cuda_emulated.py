"""The CUDA kernels (csrc/cuda/*.cu), run through the CPU emulator against h1r_ops.reference.

tests/cuda_emu.py compiles the kernel files and their glue with g++ in emulator mode (csrc/cuda/
portability.h): every block and thread of every launch runs, with real barriers and warp shuffles, on
CPU tensors. Each kernel is compared with the family's reference in h1r_ops.reference (the same ground
truth as the CPU kernels), called in fp32 on the kernel's (rounded) inputs; the backward kernels with
torch.autograd through that reference. Shapes are small but cover partial tiles, odd sizes, groups,
padding rows, documents and several partitions. Tolerances: fp32 1e-5 (relative + absolute); bf16 /
fp16 one output rounding (2^-7 resp. 2^-10 relative, a little absolute slack) since the kernels
accumulate in fp32 and the reference is fp32 on the same rounded inputs.

The emulator runs the threads of a block in a chosen order between barriers: a subset of every test
runs in reverse and random order too, and test_missing_barrier_is_caught shows that a kernel variant
without its barrier fails.
"""

from __future__ import annotations

import pytest
import torch

from cuda_emu import load

from h1r_ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(scope="module")
def emu():
    m = load()
    m.set_schedule(0)
    yield m
    m.set_schedule(0)


@pytest.fixture(params=["forward", "reverse", "random"])
def order(request, emu):
    emu.set_schedule({"forward": 0, "reverse": 1, "random": 2}[request.param], 1234)
    yield request.param
    emu.set_schedule(0)


def close(got, want, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale)


# ---- selective_state_update ------------------------------------------------------------------------

def f32(t):
    return None if t is None else t.float()


def ssu_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx):
    """The reference decode step on an fp32 copy of the state, for the batch rows with idx >= 0 (padding
    rows: output zero, state untouched). Returns (new state in state's dtype, fp32 out)."""
    valid = idx >= 0
    s32 = state.to(torch.float32, copy=True)
    out = torch.zeros(x.shape)
    pick = lambda t: None if t is None else t[valid].float()  # noqa: E731
    out[valid] = reference.selective_state_update_ref(s32, pick(x), pick(dt), A, pick(B), pick(C), D, pick(z),
                                                      dt_bias, dt_softplus, idx[valid])
    return s32.to(state.dtype), out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,h,g,p,n,opts",
    [
        (2, 4, 1, 16, 32, "D,z,bias,softplus"),
        (3, 6, 2, 37, 64, "D,bias,softplus"),   # partial row tile, groups
        (1, 2, 2, 8, 200, "z"),                 # n not a multiple of 32, no softplus
        (4, 2, 1, 20, 16, "D,z,bias,softplus,indices"),  # state pool with a padding row
    ],
)
def test_selective_state_update(emu, dtype, b, h, g, p, n, opts):
    torch.manual_seed(0)
    S = b + 3 if "indices" in opts else b
    for state_dtype in {torch.float32, dtype}:
        state = torch.randn(S, h, p, n).to(state_dtype)
        x = torch.randn(b, h, p).to(dtype)
        dt = (torch.randn(b, h) * 0.5).to(dtype)
        A = -torch.rand(h) * 2 - 0.1
        B = torch.randn(b, g, n).to(dtype)
        C = torch.randn(b, g, n).to(dtype)
        D = torch.randn(h, p) if "D" in opts else None
        z = torch.randn(b, h, p).to(dtype) if "z" in opts else None
        dt_bias = torch.randn(h) * 0.3 if "bias" in opts else None
        softplus = "softplus" in opts
        if "indices" in opts:
            idx = torch.randperm(S)[:b].int()
            idx[1] = -1  # padding row: output zero, no state touched
        else:
            idx = torch.arange(b, dtype=torch.int32)
        if not softplus:
            dt = dt.abs()
        want_state, want = ssu_ref(state, x, dt, A, B, C, D, z, dt_bias, softplus, idx)
        got_state = state.clone()
        out = emu.selective_state_update(got_state, x, dt, A, B, C, D, z, dt_bias, softplus,
                                         idx if "indices" in opts else None)
        assert out.dtype == dtype and out.shape == x.shape
        close(out, want, dtype, scale=4)
        close(got_state, want_state, state_dtype)


def test_selective_state_update_orders(emu, order):
    torch.manual_seed(1)
    b, h, p, n = 2, 2, 24, 48
    state, x, dt = torch.randn(b, h, p, n), torch.randn(b, h, p), torch.rand(b, h)
    A, B, C, z = -torch.rand(h), torch.randn(b, 1, n), torch.randn(b, 1, n), torch.randn(b, h, p)
    s_new, want = ssu_ref(state, x, dt, A, B, C, None, z, None, True, torch.arange(b))
    out = emu.selective_state_update(state, x, dt, A, B, C, None, z, None, True, None)
    close(out, want, torch.float32)
    close(state, s_new, torch.float32)


def test_selective_state_update_bad_input(emu):
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="'dt'"):
        emu.selective_state_update(torch.randn(2, 4, 8, 16), x, torch.randn(2, 3), torch.randn(4),
                                   torch.randn(2, 1, 16), torch.randn(2, 1, 16), None, None, None, False, None)


# ---- selective_scan_fwd (chunked SSD) ----------------------------------------------------------------

def scan_ref(x, dt, A, B, C, D, z, dt_bias, init, seq, softplus, limit, chunk=16):
    """h1r_ops.reference.selective_scan_ref in fp32 on the kernel's inputs: (out, final_states)."""
    return reference.selective_scan_ref(f32(x), f32(dt), A, f32(B), f32(C), chunk, D=D, z=f32(z), dt_bias=dt_bias,
                                        initial_states=f32(init), seq_idx=seq, dt_softplus=softplus, dt_limit=limit,
                                        return_final_states=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,l,h,g,p,n,opts",
    [
        (2, 37, 4, 2, 16, 32, "D,z,bias,softplus"),
        (1, 50, 2, 1, 20, 64, "D,init,seq,softplus"),   # partial row tile, documents, initial state
        (2, 16, 3, 3, 8, 200, "bias,clamp"),             # n not a multiple of 16, dt limits
        (1, 1, 2, 1, 4, 16, "init,z"),                   # length 1
    ],
)
def test_selective_scan_fwd(emu, dtype, b, l, h, g, p, n, opts):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = (torch.randn(b, l, h, generator=gen) * 0.5).to(dtype)
    if "softplus" not in opts:
        dt = dt.abs()
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, generator=gen).to(dtype)
    D = torch.randn(h, p, generator=gen) if "D" in opts else None
    z = torch.randn(b, l, h, p, generator=gen).to(dtype) if "z" in opts else None
    dt_bias = torch.randn(h, generator=gen) * 0.3 if "bias" in opts else None
    init = torch.randn(b, h, p, n, generator=gen) if "init" in opts else None
    seq = _docs(b, l, gen) if "seq" in opts else None
    dt_min, dt_max = (0.05, 0.4) if "clamp" in opts else (0.0, float("inf"))
    out, fin = emu.selective_scan_fwd(x, dt, A, B, C, 64, D, z, dt_bias, init, seq, "softplus" in opts, dt_min, dt_max)
    want, want_fin = scan_ref(x, dt, A, B, C, D, z, dt_bias, init, seq, "softplus" in opts, (dt_min, dt_max))
    assert out.dtype == dtype and fin.dtype == torch.float32
    close(out, want, dtype, scale=10)
    torch.testing.assert_close(fin, want_fin, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 1e-3)


def test_selective_scan_fwd_orders(emu, order):
    gen = torch.Generator().manual_seed(4)
    b, l, h, p, n = 1, 40, 2, 16, 32
    x, dt = torch.randn(b, l, h, p, generator=gen), torch.rand(b, l, h, generator=gen)
    A, B, C = -torch.rand(h, generator=gen), torch.randn(b, l, 1, n, generator=gen), torch.randn(b, l, 1, n, generator=gen)
    seq = _docs(b, l, gen)
    out, fin = emu.selective_scan_fwd(x, dt, A, B, C, 64, None, None, None, None, seq, False, 0.0, float("inf"))
    want, want_fin = scan_ref(x, dt, A, B, C, None, None, None, None, seq, False, (0.0, float("inf")))
    close(out, want, torch.float32, scale=10)
    torch.testing.assert_close(fin, want_fin, rtol=1e-4, atol=1e-4)


def scan_ref_grads(args, seq, softplus, limit, dout, dfinal, chunk=16):
    """Gradients of h1r_ops.reference.selective_scan_ref by torch.autograd, in fp32 on the kernel's
    (rounded) inputs. args = (x, dt, A, B, C, D, z, dt_bias, init); returns their gradients (None if absent)."""
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in args]
    x, dt, A, B, C, D, z, dt_bias, init = leaves
    out, fin = reference.selective_scan_ref(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, initial_states=init,
                                            seq_idx=seq, dt_softplus=softplus, dt_limit=limit,
                                            return_final_states=True)
    outs, grads = [out], [dout.float()]
    if dfinal is not None:
        outs.append(fin)
        grads.append(dfinal.float())
    torch.autograd.backward(outs, grads)
    return [None if t is None else t.grad for t in leaves]


def scan_inputs(b, l, h, g, p, n, opts, dtype, gen):
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = (torch.randn(b, l, h, generator=gen) * 0.5).to(dtype)
    if "softplus" not in opts:
        dt = dt.abs()
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, generator=gen).to(dtype)
    D = None
    if "Dh" in opts:
        D = torch.randn(h, generator=gen)
    elif "D" in opts:
        D = torch.randn(h, p, generator=gen)
    z = torch.randn(b, l, h, p, generator=gen).to(dtype) if "z" in opts else None
    dt_bias = torch.randn(h, generator=gen) * 0.3 if "bias" in opts else None
    init = torch.randn(b, h, p, n, generator=gen) if "init" in opts else None
    seq = _docs(b, l, gen) if "seq" in opts else None
    limit = (0.05, 0.4) if "clamp" in opts else (0.0, float("inf"))
    return (x, dt, A, B, C, D, z, dt_bias, init), seq, limit


def check_scan_grads(got, want, args, dtype):
    """Each gradient in its input's dtype; elementwise rtol of the dtype, atol relative to the largest entry
    (dt, A, B, C, D, dt_bias gradients are sums over tokens / channels, accumulated in fp32)."""
    names = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinitial_states")
    for name, g, w, t in zip(names, got, want, args):
        if t is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        rtol, atol = TOL[t.dtype if t.dtype != torch.float32 else torch.float32]
        scale = max(float(w.abs().max()), 1.0)
        torch.testing.assert_close(g.float(), w, rtol=max(rtol, 1e-4), atol=max(atol, 1e-4) * 4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,l,h,g,p,n,opts",
    [
        (2, 37, 4, 2, 16, 32, "D,z,bias,softplus,dfinal"),
        (1, 50, 2, 1, 20, 64, "D,init,seq,softplus,dfinal"),  # partial row tile, documents, initial state
        (1, 21, 2, 1, 40, 16, "Dh,z,seq,init"),               # three row tiles, D per head
        (2, 16, 3, 3, 8, 200, "bias,clamp,dfinal"),           # n not a multiple of 16, dt limits
        (1, 1, 2, 1, 4, 16, "init,z,dfinal"),                 # length 1
        (1, 150, 1, 1, 4, 256, "init,seq,softplus,dfinal"),   # the largest d_state; 10 chunks: 3 segments
    ],
)
def test_selective_scan_bwd(emu, dtype, b, l, h, g, p, n, opts):
    gen = torch.Generator().manual_seed(0)
    args, seq, limit = scan_inputs(b, l, h, g, p, n, opts, dtype, gen)
    dout = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dfinal = torch.randn(b, h, p, n, generator=gen) if "dfinal" in opts else None
    got = emu.selective_scan_bwd(dout, dfinal, *args[:5], 64, *args[5:], seq, "softplus" in opts, *limit)
    want = scan_ref_grads(args, seq, "softplus" in opts, limit, dout, dfinal)
    check_scan_grads(got, want, args, dtype)


@pytest.mark.parametrize(
    "l,budget",
    [
        (150, 1),           # 10 chunks, segments of 4: one segment per window, the last one partial
        (300, 2 * 2 * 2 * 64 * 2 * 16 * 5 * 2),  # 19 chunks, segments of 5: two segments per window
    ],
)
def test_selective_scan_bwd_windows(emu, l, budget):
    """dB, dC partial sums held one window of segments at a time (a lowered budget): dS carried between the
    launches, dD and dA added across them, dinitial_states from the first window."""
    gen = torch.Generator().manual_seed(3)
    b, h, g, p, n = 2, 2, 1, 20, 64  # two row tiles, two heads in the group
    args, seq, limit = scan_inputs(b, l, h, g, p, n, "D,z,bias,softplus,seq,init", torch.float32, gen)
    dout, dfinal = torch.randn(b, l, h, p, generator=gen), torch.randn(b, h, p, n, generator=gen)
    old = emu.set_scan_bwd_partial_budget(budget)
    try:
        got = emu.selective_scan_bwd(dout, dfinal, *args[:5], 64, *args[5:], seq, True, *limit)
    finally:
        emu.set_scan_bwd_partial_budget(old)
    check_scan_grads(got, scan_ref_grads(args, seq, True, limit, dout, dfinal), args, torch.float32)
    whole = emu.selective_scan_bwd(dout, dfinal, *args[:5], 64, *args[5:], seq, True, *limit)
    for name, a, w in zip(("dx", "ddt", "dB", "dC", "dz", "dinit"), [got[i] for i in (0, 1, 3, 4, 6, 8)],
                          [whole[i] for i in (0, 1, 3, 4, 6, 8)]):
        assert torch.equal(a, w), name  # same sums in the same order, only launched in pieces


def test_selective_scan_bwd_orders(emu, order):
    gen = torch.Generator().manual_seed(5)
    args, seq, limit = scan_inputs(1, 35, 2, 1, 24, 32, "D,z,bias,softplus,seq,init", torch.float32, gen)
    dout, dfinal = torch.randn(1, 35, 2, 24, generator=gen), torch.randn(1, 2, 24, 32, generator=gen)
    got = emu.selective_scan_bwd(dout, dfinal, *args[:5], 64, *args[5:], seq, True, *limit)
    check_scan_grads(got, scan_ref_grads(args, seq, True, limit, dout, dfinal), args, torch.float32)


# ---- causal_conv1d ---------------------------------------------------------------------------------

def conv_ref(x, weight, bias, seq_idx, init, silu):
    """h1r_ops.reference.causal_conv1d_ref in fp32 on the kernel's inputs: (out, final_states)."""
    return reference.causal_conv1d_ref(x.float(), weight, bias, seq_idx, f32(init), return_final_states=True,
                                       activation="silu" if silu else None)


def _docs(b, l, gen):
    seq = torch.zeros(b, l, dtype=torch.int32)
    for i in range(b):
        cuts = torch.randint(0, l, (3,), generator=gen)
        for c in cuts:
            seq[i, c:] += 1
    return seq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize(
    "b,d,l,w,opts",
    [
        (2, 5, 37, 4, "bias,silu,final"),
        (1, 3, 600, 3, "bias,init,final"),      # two tiles of the channel-first kernel
        (2, 130, 70, 2, "silu,seq,final"),      # two channel blocks / time chunks of the channel-last kernel
        (3, 4, 2, 4, "init,seq,final,silu"),   # l < w - 1
        (1, 6, 1, 3, "bias"),
    ],
)
def test_causal_conv1d_fwd(emu, dtype, layout, b, d, l, w, opts):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, l, generator=gen).to(dtype)
    if layout == "last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight = torch.randn(d, w, generator=gen)
    bias = torch.randn(d, generator=gen) if "bias" in opts else None
    init = torch.randn(b, d, w - 1, generator=gen).to(dtype) if "init" in opts else None
    seq = _docs(b, l, gen) if "seq" in opts else None
    out, fin = emu.causal_conv1d_fwd(x, weight, bias, seq, init, "final" in opts, "silu" in opts)
    want, want_fin = conv_ref(x, weight, bias, seq, init, "silu" in opts)
    assert out.dtype == dtype and out.stride() == x.stride()
    close(out, want, dtype, scale=4)
    if "final" in opts:
        close(fin, want_fin, dtype)
    else:
        assert fin.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d,l,w,state_len,opts", [
    (3, 20, 1, 4, 3, "bias,silu"),
    (2, 130, 3, 3, 5, "silu,indices"),
    (4, 7, 2, 2, 1, "bias,indices,2d"),
])
def test_causal_conv1d_update(emu, dtype, b, d, l, w, state_len, opts):
    gen = torch.Generator().manual_seed(0)
    if "2d" in opts:
        l = 1
    S = b + 2 if "indices" in opts else b
    for state_dtype in {torch.float32, dtype}:
        state = torch.randn(S, d, state_len, generator=gen).to(state_dtype)
        x = torch.randn(b, d, l, generator=gen).to(dtype)
        weight = torch.randn(d, w, generator=gen)
        bias = torch.randn(d, generator=gen) if "bias" in opts else None
        idx = torch.arange(b, dtype=torch.int32)
        if "indices" in opts:
            idx = torch.randperm(S, generator=gen)[:b].int()
            idx[0] = -1
        want_state = state.to(torch.float32, copy=True)
        act = "silu" if "silu" in opts else None
        want = reference.causal_conv1d_update_ref(x.float(), want_state, weight, bias, act, idx)
        want_state = want_state.to(state_dtype)
        got_state = state.clone()
        xin = x[:, :, 0] if "2d" in opts else x
        out = emu.causal_conv1d_update(xin, got_state, weight, bias, "silu" in opts,
                                       idx if "indices" in opts else None)
        assert out.shape == xin.shape and out.dtype == dtype
        close(out, want.reshape(out.shape), dtype, scale=4)
        torch.testing.assert_close(got_state, want_state, rtol=0, atol=0)


def conv_ref_grads(x, weight, bias, seq, init, silu, dout, dfinal):
    """Gradients of h1r_ops.reference.causal_conv1d_ref by torch.autograd, in fp32 on the kernel's (rounded)
    inputs: (dx, dweight, dbias, dinitial_states), None where the input is absent."""
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in (x, weight, bias, init)]
    xr, wr, br, ir = leaves
    out, fin = reference.causal_conv1d_ref(xr, wr, br, seq, ir, return_final_states=True,
                                           activation="silu" if silu else None)
    outs, grads = [out], [dout.float()]
    if dfinal is not None:
        outs.append(fin)
        grads.append(dfinal.float())
    torch.autograd.backward(outs, grads)
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize(
    "b,d,l,w,opts",
    [
        (2, 5, 37, 4, "bias,silu"),
        (1, 3, 600, 3, "bias,init,dfinal"),        # two tiles of the channel-first kernel
        (2, 130, 70, 2, "silu,seq,dfinal"),        # two channel blocks / time chunks of the channel-last kernel
        (2, 3, 1030, 4, "init,seq,silu,dfinal"),   # three tiles, documents across tile edges
        (3, 4, 2, 4, "init,seq,dfinal,silu"),      # l < w - 1: the final state reaches into the history
        (1, 6, 1, 3, "bias,init"),                 # length 1
    ],
)
def test_causal_conv1d_bwd(emu, dtype, layout, b, d, l, w, opts):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, l, generator=gen).to(dtype)
    dout = torch.randn(b, d, l, generator=gen).to(dtype)
    if layout == "last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight = torch.randn(d, w, generator=gen)
    bias = torch.randn(d, generator=gen) if "bias" in opts else None
    init = torch.randn(b, d, w - 1, generator=gen).to(dtype) if "init" in opts else None
    seq = _docs(b, l, gen) if "seq" in opts else None
    dfinal = torch.randn(b, d, w - 1, generator=gen).to(dtype) if "dfinal" in opts else None
    dx, dweight, dbias, dinit = emu.causal_conv1d_bwd(dout, dfinal, x, weight, bias, seq, init, "silu" in opts)
    want = conv_ref_grads(x, weight, bias, seq, init, "silu" in opts, dout, dfinal)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    close(dx, want[0], dtype, scale=4)
    # dweight / dbias sum b * l products in fp32 (on the same rounded inputs): fp32-level agreement.
    close(dweight, want[1], torch.float32, scale=l)
    if bias is not None:
        close(dbias, want[2], torch.float32, scale=l)
    else:
        assert dbias.numel() == 0
    if init is not None:
        assert dinit.dtype == dtype
        close(dinit, want[3], dtype, scale=4)
    else:
        assert dinit.numel() == 0


def test_causal_conv1d_orders(emu, order):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 700, generator=gen)
    weight, seq = torch.randn(3, 4, generator=gen), _docs(2, 700, gen)
    out, fin = emu.causal_conv1d_fwd(x, weight, None, seq, None, True, True)
    want, want_fin = conv_ref(x, weight, None, seq, None, True)
    close(out, want, torch.float32)
    close(fin, want_fin, torch.float32)
    dout, dfinal = torch.randn(2, 3, 700, generator=gen), torch.randn(2, 3, 3, generator=gen)
    got = emu.causal_conv1d_bwd(dout, dfinal, x, weight, None, seq, None, True)
    want = conv_ref_grads(x, weight, None, seq, None, True, dout, dfinal)
    close(got[0], want[0], torch.float32)
    close(got[1], want[1], torch.float32, scale=700)


def test_causal_conv1d_bad_input(emu):
    with pytest.raises(ValueError, match="'weight'"):
        emu.causal_conv1d_fwd(torch.randn(1, 4, 8), torch.randn(4, 5), None, None, None, False, False)
    with pytest.raises(ValueError, match="'conv_state'"):
        emu.causal_conv1d_update(torch.randn(1, 4), torch.randn(1, 4, 2), torch.randn(4, 4), None, False, None)


# ---- the harness can fail ----------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [0, 1, 2])
def test_missing_barrier_is_caught(emu, schedule):
    """The conv kernel without the barrier after its shared-memory tile load must give a wrong result
    in every schedule order, while the real kernel is right (the same inputs)."""
    emu.set_schedule(schedule, 7)
    try:
        gen = torch.Generator().manual_seed(3)
        x, weight = torch.randn(2, 3, 900, generator=gen), torch.randn(3, 4, generator=gen)
        want, _ = conv_ref(x, weight, None, None, None, False)
        good, _ = emu.causal_conv1d_fwd(x, weight, None, None, None, False, False)
        close(good, want, torch.float32)
        bad = emu.causal_conv1d_fwd_without_tile_barrier(x, weight)
        assert not torch.allclose(bad, want, rtol=1e-3, atol=1e-3)
    finally:
        emu.set_schedule(0)


# ---- paged attention -------------------------------------------------------------------------------

def paged_cache(num_blocks, block_size, hk, hd, dtype, gen):
    k = torch.randn(num_blocks, block_size, hk, hd, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block_size, hk, hd, generator=gen).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hq,hk,hd,bs,lens",
    [
        (4, 2, 64, 16, [1, 17, 100]),     # one partition
        (2, 1, 40, 8, [513, 0, 1100]),    # several partitions, an empty context, hd not a multiple of 32
        (3, 3, 128, 32, [600]),
    ],
)
def test_paged_attention_decode(emu, dtype, hq, hk, hd, bs, lens):
    gen = torch.Generator().manual_seed(0)
    b = len(lens)
    max_blocks = -(-max(max(lens), 1) // bs) + 1  # one spare entry: tables may be longer than needed
    num_blocks = b * max_blocks + 3
    kc, vc = paged_cache(num_blocks, bs, hk, hd, dtype, gen)
    tables = torch.randperm(num_blocks, generator=gen)[: b * max_blocks].view(b, max_blocks).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, hq, hd, generator=gen).to(dtype)
    scale = hd ** -0.5
    out = emu.paged_attention_decode(q, kc, vc, tables, seq_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, reference.paged_attention_decode_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, scale), dtype)


def test_paged_attention_decode_orders(emu, order):
    gen = torch.Generator().manual_seed(1)
    kc, vc = paged_cache(80, 16, 2, 64, torch.float32, gen)
    tables = torch.randperm(80, generator=gen)[:72].view(2, 36).int()  # 530 tokens need 34 pages
    seq_lens = torch.tensor([280, 530], dtype=torch.int32)
    q = torch.randn(2, 4, 64, generator=gen)
    out = emu.paged_attention_decode(q, kc, vc, tables, seq_lens, 0.125)
    close(out, reference.paged_attention_decode_ref(q, kc, vc, tables, seq_lens, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hq,hk,hd,bs,lens,qlens",
    [
        (4, 2, 64, 16, [5, 70, 33], [5, 3, 33]),    # full prefill, chunked prefill, a longer one
        (2, 1, 40, 8, [100, 1, 9], [37, 1, 0]),     # hd not a multiple of 32, a sequence with no queries
    ],
)
def test_paged_attention_prefill(emu, dtype, hq, hk, hd, bs, lens, qlens):
    gen = torch.Generator().manual_seed(0)
    b = len(lens)
    max_blocks = -(-max(lens) // bs) + 1
    num_blocks = b * max_blocks + 2
    kc, vc = paged_cache(num_blocks, bs, hk, hd, dtype, gen)
    tables = torch.randperm(num_blocks, generator=gen)[: b * max_blocks].view(b, max_blocks).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0] + qlens).cumsum(0).int()
    q = torch.randn(int(cu[-1]), hq, hd, generator=gen).to(dtype)
    out = emu.paged_attention_prefill(q, kc, vc, tables, seq_lens, cu, hd ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    want = reference.paged_attention_prefill_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, cu, hd ** -0.5)
    close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(emu, dtype):
    gen = torch.Generator().manual_seed(0)
    nb, bs, hk, hd, tokens = 6, 4, 2, 24, 9
    kc, vc = torch.zeros(nb, bs, hk, hd, dtype=dtype), torch.zeros(nb, bs, hk, hd, dtype=dtype)
    qkv = torch.randn(tokens, 3, hk, hd, generator=gen)  # key / value as strided slices of a fused projection
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    slots[3] = -1  # padding token
    emu.reshape_and_cache(key, value, kc, vc, slots)
    want_k, want_v = torch.zeros_like(kc), torch.zeros_like(vc)
    reference.reshape_and_cache_ref(key, value, want_k, want_v, slots)
    torch.testing.assert_close(kc, want_k, rtol=0, atol=0)
    torch.testing.assert_close(vc, want_v, rtol=0, atol=0)


def test_paged_attention_bad_input(emu):
    kc = torch.zeros(4, 8, 2, 16)
    with pytest.raises(ValueError, match="'q'"):
        emu.paged_attention_decode(torch.randn(1, 3, 16), kc, kc, torch.zeros(1, 2, dtype=torch.int32),
                                   torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="'slot_mapping'"):
        emu.reshape_and_cache(torch.randn(2, 2, 16), torch.randn(2, 2, 16), kc, kc, torch.zeros(2, dtype=torch.int32))


# ---- the emulator itself, against CUDA's documented semantics ----------------------------------------

@pytest.mark.parametrize("threads,width", [(64, 32), (64, 8), (48, 16), (96, 4)])
def test_emulator_collectives(emu, threads, width):
    out = emu.collectives(threads, width)
    tid = torch.arange(threads)
    lane, base = tid % 32, (tid // 32) * 32
    lanes_in_warp = torch.clamp(threads - base, max=32)
    seg = (lane // width) * width

    def take(src_lane):  # value 10 * tid of lane src in the same warp; lanes that do not exist: own value
        ok = src_lane < lanes_in_warp
        return torch.where(ok, 10 * (base + src_lane), 10 * tid)

    xor = torch.where((lane ^ 5) // width > lane // width, lane, lane ^ 5)  # later groups: own value
    assert out[0].tolist() == take(xor).tolist()
    down = torch.where(lane % width + 3 < width, lane + 3, lane)
    assert out[1].tolist() == take(down).tolist()
    up = torch.where(lane % width >= 2, lane - 2, lane)
    assert out[2].tolist() == take(up).tolist()
    assert out[3].tolist() == take(seg + 7 % width).tolist()
    ballot = [sum(1 << l for l in range(int(n)) if (w * 32 + l) % 3 == 0) for w, n in zip(tid // 32, lanes_in_warp)]
    assert (out[4].long() & 0xFFFFFFFF).tolist() == ballot
    assert out[5].tolist() == [int(40 >= 32 * w and 40 < 32 * w + n) for w, n in zip(tid // 32, lanes_in_warp)]
    assert out[6].tolist() == [int(32 * w + n <= 64) for w, n in zip(tid // 32, lanes_in_warp)]


def test_emulator_atomics_and_block_reduce(emu, order):
    s, m = emu.atomics(3, 96)
    assert s.item() == 288 and m.item() == 287
    x = torch.randn(5 * 256)
    torch.testing.assert_close(emu.block_sum(x, 256), x.view(5, 256).sum(1), rtol=1e-5, atol=1e-5)


def test_emulator_reports_divergent_barrier_and_bad_config(emu):
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.divergent_barrier()
    with pytest.raises(RuntimeError, match="invalid configuration"):
        emu.too_many_threads()


def test_emulator_half_conversions(emu):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    as_half, as_bf16 = emu.widen(bits)
    want_h, want_b = bits.view(torch.float16).float(), bits.view(torch.bfloat16).float()
    for got, want in ((as_half, want_h), (as_bf16, want_b)):
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])
    # Rounding: random magnitudes over the whole range, exact ties, subnormals, overflow, inf, nan.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100000, generator=gen) * torch.exp2(torch.randint(-30, 20, (100000,), generator=gen).float())
    ties = (bits[:2000].view(torch.float16).float() + bits[1:2001].view(torch.float16).float()) / 2
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                             float("inf"), float("-inf"), 1e-40, 3.4e38])
    x = torch.cat([x, ties, specials])
    h, b = emu.convert(x)
    assert torch.equal(h, x.to(torch.float16).view(torch.int16))
    assert torch.equal(b, x.to(torch.bfloat16).view(torch.int16))
