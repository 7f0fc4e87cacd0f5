"""causal_conv1d / causal_conv1d_update: the reference against independent formulations, then every
kernel against the reference (forward, backward, decode step), opcheck, torch.compile and input checks.

Tolerances (max abs error vs the fp32/fp64 reference on O(1) inputs): fp32 1e-5 (only the order of the
fp32 sums differs), fp16 2e-3 and bf16 2e-2 (one rounding of the output, ~2^-11 / 2^-8 relative)."""

from __future__ import annotations

import os

import pytest
import torch
from _isa import run_pytest_subset
import torch.nn.functional as F

from h1r_ops.reference import causal_conv1d_ref, causal_conv1d_update_ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_seq_idx(b, l, ndocs, gen=None):
    """Non-decreasing document ids per row with random boundaries."""
    seq = torch.zeros(b, l, dtype=torch.int32)
    for i in range(b):
        if l > 1 and ndocs > 1:
            cuts = torch.randperm(l - 1, generator=gen)[: ndocs - 1] + 1
            for c in cuts.tolist():
                seq[i, c:] += 1
    return seq


# ------------------------------------------------------------------------------------------------
# The reference itself
# ------------------------------------------------------------------------------------------------


def conv1d_torch(x, weight, bias, initial_states, silu):
    """nn.functional.conv1d with groups=d on x with its history prepended (left padding)."""
    b, d, l = x.shape
    w = weight.shape[-1]
    hist = initial_states if initial_states is not None else x.new_zeros(b, d, w - 1)
    pre = F.conv1d(torch.cat([hist, x], -1), weight.unsqueeze(1), bias, groups=d)
    return F.silu(pre) if silu else pre


def conv1d_loops(x, weight, bias, seq_idx, initial_states, silu):
    """Explicit loops: out[b, c, t] = sum over taps of the same document (history = first document)."""
    b, d, l = x.shape
    w = weight.shape[-1]
    out = torch.zeros(b, d, l, dtype=x.dtype)
    final = torch.zeros(b, d, w - 1, dtype=x.dtype)

    def step(i, p):  # (value per channel, document id) of time p of row i
        if p >= 0:
            return x[i, :, p], int(seq_idx[i, p])
        hist = initial_states[i, :, w - 1 + p] if initial_states is not None else torch.zeros(d, dtype=x.dtype)
        return hist, int(seq_idx[i, 0])

    for i in range(b):
        for t in range(l):
            acc = bias.clone() if bias is not None else torch.zeros(d, dtype=x.dtype)
            for k in range(w):
                v, doc = step(i, t - (w - 1) + k)
                if doc == int(seq_idx[i, t]):
                    acc += weight[:, k] * v
            out[i, :, t] = F.silu(acc) if silu else acc
        for j in range(w - 1):
            v, doc = step(i, l - (w - 1) + j)
            if doc == int(seq_idx[i, l - 1]):
                final[i, :, j] = v
    return out, final


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("l", [1, 3, 17])
@pytest.mark.parametrize("with_init", [False, True])
def test_reference_vs_conv1d(w, l, with_init):
    torch.manual_seed(0)
    b, d = 2, 5
    x = torch.randn(b, d, l, dtype=torch.float64)
    weight = torch.randn(d, w, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64)
    init = torch.randn(b, d, w - 1, dtype=torch.float64) if with_init else None
    for silu in (False, True):
        out, final = causal_conv1d_ref(x, weight, bias, initial_states=init, return_final_states=True,
                                       activation="silu" if silu else None)
        torch.testing.assert_close(out, conv1d_torch(x, weight, bias, init, silu))
        full = torch.cat([init if init is not None else x.new_zeros(b, d, w - 1), x], -1)
        torch.testing.assert_close(final, full[..., -(w - 1):])
    # nn.Conv1d's (d, 1, w) weight layout gives the same result
    torch.testing.assert_close(causal_conv1d_ref(x, weight.unsqueeze(1), bias, initial_states=init),
                               causal_conv1d_ref(x, weight, bias, initial_states=init))


@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("with_init", [False, True])
def test_reference_seq_idx_vs_loops(w, with_init):
    gen = torch.Generator().manual_seed(1)
    b, d, l = 2, 3, 13
    x = torch.randn(b, d, l, dtype=torch.float64, generator=gen)
    weight = torch.randn(d, w, dtype=torch.float64, generator=gen)
    bias = torch.randn(d, dtype=torch.float64, generator=gen)
    init = torch.randn(b, d, w - 1, dtype=torch.float64, generator=gen) if with_init else None
    seq = make_seq_idx(b, l, 4, gen)
    seq[1, -1] = seq[1, -2] + 1  # a one-token last document
    out, final = causal_conv1d_ref(x, weight, bias, seq, init, True, "silu")
    out2, final2 = conv1d_loops(x, weight, bias, seq, init, True)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(final, final2)
    # one document everywhere == no seq_idx
    zero = torch.zeros(b, l, dtype=torch.int32)
    torch.testing.assert_close(causal_conv1d_ref(x, weight, bias, zero, init, activation="silu"),
                               causal_conv1d_ref(x, weight, bias, None, init, activation="silu"))


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("extra", [0, 2])
def test_reference_update_token_by_token(w, extra):
    """Decoding token by token (and a few tokens at a time) reproduces the full conv and its final state."""
    torch.manual_seed(2)
    b, d, l = 3, 6, 9
    state_len = w - 1 + extra
    x = torch.randn(b, d, l, dtype=torch.float64)
    weight = torch.randn(d, w, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64)
    init_full = torch.randn(b, d, state_len, dtype=torch.float64)
    init = init_full[..., -(w - 1):]
    out_full, final = causal_conv1d_ref(x, weight, bias, initial_states=init, return_final_states=True,
                                        activation="silu")
    state = init_full.clone()
    outs = [causal_conv1d_update_ref(x[..., t], state, weight, bias, "silu") for t in range(l)]
    torch.testing.assert_close(torch.stack(outs, -1), out_full)
    torch.testing.assert_close(state[..., -(w - 1):], final)
    torch.testing.assert_close(state, torch.cat([init_full, x], -1)[..., -state_len:])
    # several tokens per call, through a pool with row indices (and a padded row)
    pool = torch.randn(7, d, state_len, dtype=torch.float64)
    rows = torch.tensor([5, 0, 2], dtype=torch.int32)
    pool[rows.long()] = init_full
    untouched = pool.clone()
    o1 = causal_conv1d_update_ref(x[..., :4], pool, weight, bias, "silu", rows)
    o2 = causal_conv1d_update_ref(x[..., 4:], pool, weight, bias, "silu", rows)
    torch.testing.assert_close(torch.cat([o1, o2], -1), out_full)
    torch.testing.assert_close(pool[rows.long()][..., -(w - 1):], final)
    others = [i for i in range(7) if i not in rows.tolist()]
    torch.testing.assert_close(pool[others], untouched[others])
    pad = torch.tensor([-1, 0, 2], dtype=torch.int32)
    before = pool.clone()
    o3 = causal_conv1d_update_ref(x[..., :1], pool, weight, bias, "silu", pad)
    assert (o3[0] == 0).all()
    torch.testing.assert_close(pool[5], before[5])


# ------------------------------------------------------------------------------------------------
# Kernels vs the reference
# ------------------------------------------------------------------------------------------------

from h1r_ops import causal_conv1d, causal_conv1d_update  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
D = 37  # not a multiple of any vector width


def _id(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


def make_x(b, d, l, dtype, channel_last, gen=None):
    if channel_last:  # a slice of a wider (b, l, *) tensor, transposed: Falcon-H1's xBC
        return torch.randn(b, l, d + 5, generator=gen).to(dtype)[..., 3 : 3 + d].transpose(1, 2)
    return torch.randn(b, d, l, generator=gen).to(dtype)


def make_case(b, d, l, w, dtype, channel_last, has_bias, has_seq, has_init, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(b, d, l, dtype, channel_last, gen)
    weight = (torch.randn(d, w, generator=gen) / w**0.5).to(dtype)
    bias = torch.randn(d, generator=gen).to(dtype) if has_bias else None
    seq = make_seq_idx(b, l, 3, gen) if has_seq else None
    init = torch.randn(b, d, w - 1, generator=gen).to(dtype) if has_init else None
    return x, weight, bias, seq, init


def f32(t):
    return None if t is None else t.detach().float()


def assert_close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=RTOL[dtype])


# (bias, silu, seq_idx, initial_states): none, all, and two complementary halves (every flag on and off,
# every pair of flags together at least once across the four)
FLAGS = [(False, False, False, False), (True, True, True, True), (True, False, True, False), (False, True, False, True),
         (True, True, False, False), (False, False, True, True)]


@pytest.mark.parametrize("l", [1, 2, 3, 7, 64, 65, 257])
@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_kernel_forward(l, w, channel_last, dtype):
    for has_bias, silu, has_seq, has_init in FLAGS:
        x, weight, bias, seq, init = make_case(2, D, l, w, dtype, channel_last, has_bias, has_seq, has_init)
        act = "silu" if silu else None
        out, final = causal_conv1d(x, weight, bias, seq, init, True, act)
        ref_out, ref_final = causal_conv1d_ref(f32(x), f32(weight), f32(bias), seq, f32(init), True, act)
        assert out.dtype == dtype and out.shape == x.shape and final.shape == (2, D, w - 1)
        if l > 1:  # the output keeps x's layout
            assert (out.stride(1) == 1) == channel_last and (out.stride(2) == 1) != channel_last
        assert_close(out, ref_out, dtype)
        assert_close(final, ref_final, dtype)
        if not (has_seq or has_init):  # also without final states, weight as nn.Conv1d stores it
            assert_close(causal_conv1d(x, weight.unsqueeze(1), bias, activation=act), ref_out, dtype)


def test_kernel_forward_odd_strides_and_seq_with_init_large():
    """Neither layout (copied), int64 seq_idx, batch stride 0, and a bigger channel-last case."""
    torch.manual_seed(3)
    x = torch.randn(2, 9, 21)[:, :, ::2]  # stride(2) == 2, stride(1) == 21
    wt = torch.randn(9, 4)
    torch.testing.assert_close(causal_conv1d(x, wt, activation="silu"), causal_conv1d_ref(x, wt, activation="silu"))
    xb = torch.randn(1, 5, 300).expand(3, 5, 300)
    seq = make_seq_idx(3, 300, 5).long()
    init = torch.randn(3, 5, 3)
    torch.testing.assert_close(causal_conv1d(xb, torch.randn(5, 4).abs(), None, seq, init),
                               causal_conv1d_ref(xb, torch.randn(5, 4).abs(), None, seq, init), rtol=1, atol=1e9)
    x, weight, bias, seq, init = make_case(3, 200, 700, 4, torch.bfloat16, True, True, True, True)
    out, final = causal_conv1d(x, weight, bias, seq, init, True, "silu")
    ref_out, ref_final = causal_conv1d_ref(f32(x), f32(weight), f32(bias), seq, f32(init), True, "silu")
    assert_close(out, ref_out, torch.bfloat16)
    assert_close(final, ref_final, torch.bfloat16)


def test_final_states_out_and_reference_dtype():
    x, weight, bias, _, _ = make_case(2, D, 9, 4, torch.float32, True, True, False, False)
    buf = torch.empty(2, D, 3)
    out, final = causal_conv1d(x, weight, bias, return_final_states=True, final_states_out=buf)
    assert final is buf or torch.equal(final, buf)
    torch.testing.assert_close(buf, x[..., -3:])


# ---- decode step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("extra", [0, 3])
def test_kernel_update_token_by_token(w, dtype, extra):
    """Decoding token by token with the kernel reproduces the kernel's full conv, through a state pool."""
    b, l = 3, 11
    state_len = w - 1 + extra
    x, weight, bias, _, _ = make_case(b, D, l, w, dtype, True, True, False, False, seed=4)
    gen = torch.Generator().manual_seed(5)
    hist = torch.randn(b, D, state_len, generator=gen).to(dtype)
    out_full, final = causal_conv1d(x, weight, bias, None, hist[..., state_len - (w - 1):].contiguous(), True, "silu")
    pool = torch.randn(8, D, state_len, generator=gen).to(dtype)
    rows = torch.tensor([6, 1, 3], dtype=torch.int32)
    pool[rows.long()] = hist
    others = pool[[0, 2, 4, 5, 7]].clone()
    outs = [causal_conv1d_update(x[..., t], pool, weight, bias, "silu", rows) for t in range(l)]
    assert outs[0].shape == (b, D)
    # both sides round once to dtype from fp32 sums of the same products
    assert_close(torch.stack(outs, -1), out_full, dtype)
    torch.testing.assert_close(pool[rows.long()], torch.cat([hist, x], -1)[..., -state_len:])
    assert_close(pool[rows.long()][..., -(w - 1):], final, dtype)
    assert torch.equal(pool[[0, 2, 4, 5, 7]], others)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_kernel_update_vs_reference(dtype):
    """Several tokens per call, no indices, a transposed (dim-last) state, padded rows."""
    b, w, l = 4, 4, 3
    x, weight, bias, _, _ = make_case(b, D, l, w, dtype, False, True, False, False, seed=6)
    for state in (torch.randn(b, D, 5).to(dtype), torch.randn(b, 5, D).to(dtype).transpose(1, 2)):
        s_ref = state.clone()
        got = causal_conv1d_update(x, state, weight, bias, None)
        want = causal_conv1d_update_ref(x, s_ref, weight, bias, None)
        assert_close(got, want, dtype)
        assert torch.equal(state, s_ref)
    pool = torch.randn(6, D, 3).to(dtype)
    pool_ref = pool.clone()
    idx = torch.tensor([2, -1, 5, 0], dtype=torch.int32)
    got = causal_conv1d_update(x[..., 0], pool, weight.unsqueeze(1), None, "swish", idx)
    want = causal_conv1d_update_ref(x[..., 0], pool_ref, weight, None, "swish", idx)
    assert_close(got, want, dtype)
    assert (got[1] == 0).all()
    assert torch.equal(pool, pool_ref)


# The decode fast path: the public API hands a well-formed CPU call straight to the glue, and the kernel
# runs the usual (S, d, w-1) contiguous cache as one vectorized pass over the channels, in blocks of 256.
# d = 300 spans two blocks, the second partial and not a multiple of any vector width.
from h1r_ops.ops import causal_conv1d as conv_api  # noqa: E402


def update_case(b, d, w, dtype, param_dtype, has_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen).to(dtype)
    state = torch.randn(b, d, w - 1, generator=gen).to(dtype)
    weight = (torch.randn(d, w, generator=gen) / w**0.5).to(param_dtype)
    bias = torch.randn(d, generator=gen).to(param_dtype) if has_bias else None
    return x, state, weight, bias


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=lambda v: _id(v))
@pytest.mark.parametrize("has_bias,act", [(True, "silu"), (False, None)])
def test_update_step_vs_reference(w, dtype, param_dtype, has_bias, act):
    """One decode step of the usual cache, parameters in x's dtype or fp32, against the reference."""
    x, state, weight, bias = update_case(3, 300, w, dtype, param_dtype, has_bias, seed=w)
    s_ref = state.clone()
    got = causal_conv1d_update(x, state, weight.unsqueeze(1), bias, act)
    want = causal_conv1d_update_ref(x, s_ref, weight, bias, act)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, want, dtype)
    assert torch.equal(state, s_ref)  # the shift moves stored values: exact


def test_update_fast_path_matches_checked_path():
    """The fast path and the validating path give the same output and state, over layouts the glue reads
    as they are: strided x, a transposed state, a strided int64 index with padded rows, mixed-dtype
    parameters (bf16 weight, fp32 bias: both widened), a non-contiguous (d, 1, w) weight."""
    gen = torch.Generator().manual_seed(11)
    d, w = 300, 4
    cases = []
    x, state, weight, bias = update_case(4, d, w, torch.float32, torch.float32, True, seed=1)
    cases.append((x, state, weight, bias, None))
    xs = torch.randn(4, 2 * d, generator=gen)[:, ::2]  # channel stride 2
    st = torch.randn(4, w - 1, d, generator=gen).transpose(1, 2)  # time-major state
    cases.append((xs, st, weight, bias, None))
    pool = torch.randn(9, d, w - 1, generator=gen).to(torch.bfloat16)
    idx = torch.tensor([7, 0, -1, 5, 2, 8, -1, 1], dtype=torch.int64)[::2]  # [7, -1, 2, -1], stride 2
    xb = torch.randn(4, d, generator=gen).to(torch.bfloat16)
    cases.append((xb, pool, weight.to(torch.bfloat16), bias, idx))
    w3 = torch.randn(d, 2, w, generator=gen)[:, :1, :]  # (d, 1, w), not contiguous
    cases.append((x, state, w3, None, torch.tensor([3, -1, 0, 1], dtype=torch.int32)))
    for x, state, weight, bias, idx in cases:
        s_fast, s_checked = state.clone(), state.clone()
        fast = causal_conv1d_update(x, s_fast, weight, bias, "silu", idx)
        checked = conv_api._causal_conv1d_update_checked(x, s_checked, weight, bias, "silu", idx, None)
        torch.testing.assert_close(fast, checked, atol=0, rtol=0)
        assert torch.equal(s_fast, s_checked)
        s_ref = state.clone()
        want = causal_conv1d_update_ref(x, s_ref, weight, bias, "silu", idx)
        assert_close(fast, want, x.dtype)
        assert torch.equal(s_fast, s_ref)
        if idx is not None:
            assert (fast[idx < 0] == 0).all()


def test_update_fast_path_is_taken(monkeypatch):
    """A well-formed CPU call never reaches the Python checks; a bad one does, and raises there."""

    def checked(*args):
        raise AssertionError("validating path taken")

    monkeypatch.setattr(conv_api, "_causal_conv1d_update_checked", checked)
    x, state, weight, bias = update_case(2, 40, 4, torch.float32, torch.float32, True)
    causal_conv1d_update(x, state, weight.unsqueeze(1), bias, "silu", torch.tensor([1, 0]))
    with pytest.raises(AssertionError, match="validating path"):
        causal_conv1d_update(x, state[:, :, :2], weight, bias, "silu")


def test_update_parallel_batch():
    """Enough channels for the kernel to split the work over threads: rows are independent."""
    x, state, weight, bias = update_case(9, 3700, 4, torch.bfloat16, torch.bfloat16, True, seed=3)
    s_ref = state.clone()
    got = causal_conv1d_update(x, state, weight, bias, "silu")
    assert_close(got, causal_conv1d_update_ref(x, s_ref, weight, bias, "silu"), torch.bfloat16)
    assert torch.equal(state, s_ref)


def test_update_bad_inputs_raise_api_errors():
    """Bad input through the fast path still raises the API's ValueError, prefixed with the op's name."""
    x, state, weight, bias = update_case(2, 8, 4, torch.float32, torch.float32, True)
    bad = [
        (lambda: causal_conv1d_update(x, state, torch.randn(8, 2, 4)), "weight"),
        (lambda: causal_conv1d_update(x, state, torch.randn(8, 5)), "weight"),
        (lambda: causal_conv1d_update(x, state, weight, torch.randn(9)), "bias"),
        (lambda: causal_conv1d_update(x, state, weight, None, None, torch.tensor([0, 1], dtype=torch.int16)),
         "conv_state_indices"),
        (lambda: causal_conv1d_update(x.double(), state.double(), weight), "x"),
        (lambda: causal_conv1d_update(x.tolist(), state, weight), "x"),
        (lambda: causal_conv1d_update(x, state.bfloat16(), weight), "conv_state"),
        (lambda: causal_conv1d_update(x, state[:1], weight), "conv_state"),
        (lambda: causal_conv1d_update(x, state, weight, activation="gelu"), "activation"),
        (lambda: causal_conv1d_update(x, state, weight, cache_seqlens=torch.zeros(2)), "cache_seqlens"),
    ]
    for fn, name in bad:
        with pytest.raises(ValueError, match=f"^causal_conv1d_update: argument '{name}'"):
            fn()
    # an index out of range is found by the glue (the Python checks do not read index values)
    with pytest.raises(ValueError, match="argument 'conv_state_indices': index 2"):
        causal_conv1d_update(x, state, weight, None, None, torch.tensor([0, 2]))
    # the raw CPU op checks for itself (a direct torch.ops call)
    with pytest.raises(ValueError, match="'weight'"):
        torch.ops.h1r.causal_conv1d_update(x, state, torch.randn(8, 2, 4), None, False, None)
    with pytest.raises(ValueError, match="'conv_state_indices'"):
        torch.ops.h1r.causal_conv1d_update(x, state, weight, None, False, torch.tensor([0, 5]))


# ---- backward -------------------------------------------------------------------------------------

GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 3e-2)}


def check_backward(b, d, l, w, dtype, channel_last, has_bias, silu, has_seq, has_init, final_grad, seed=0):
    x, weight, bias, seq, init = make_case(b, d, l, w, dtype, channel_last, has_bias, has_seq, has_init, seed)
    act = "silu" if silu else None
    leaves = [t for t in (x, weight, bias, init) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    ref_leaves = [f32(t).requires_grad_(True) for t in leaves]
    it = iter(ref_leaves)
    rx, rw = next(it), next(it)
    rb = next(it) if has_bias else None
    ri = next(it) if has_init else None

    gen = torch.Generator().manual_seed(seed + 100)
    dout = torch.randn(b, d, l, generator=gen).to(dtype)
    dfinal = torch.randn(b, d, w - 1, generator=gen).to(dtype)
    out, final = causal_conv1d(x, weight, bias, seq, init, True, act)
    ref_out, ref_final = causal_conv1d_ref(rx, rw, rb, seq, ri, True, act)
    loss = (out.float() * dout.float()).sum() + (final.float() * dfinal.float()).sum() * final_grad
    ref_loss = (ref_out * dout.float()).sum() + (ref_final * dfinal.float()).sum() * final_grad
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    atol, rtol = GRAD_TOL[dtype]
    for name, g, rg in zip(("x", "weight", "bias", "initial_states"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        scale = max(1.0, rg.abs().max().item())  # dweight sums b*l terms: compare relative to its size
        torch.testing.assert_close(g.float(), rg, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


BWD_CASES = [(l, w, dtype) for l in (1, 2, 3, 7, 65, 257) for w in (2, 3, 4) for dtype in DTYPES
             if dtype == torch.float32 or (l in (3, 65) and w != 3)]


@pytest.mark.parametrize("l,w,dtype", BWD_CASES, ids=_id)
@pytest.mark.parametrize("channel_last", [False, True])
def test_kernel_backward(l, w, dtype, channel_last):
    for i, (has_bias, silu, has_seq, has_init) in enumerate(FLAGS):
        check_backward(2, D, l, w, dtype, channel_last, has_bias, silu, has_seq, has_init, final_grad=i % 2,
                       seed=i)


def test_kernel_backward_multichunk_deterministic():
    """Long channel-last input (several time chunks per row): dweight is summed in a fixed order."""
    check_backward(2, 40, 1300, 4, torch.float32, True, True, True, True, True, final_grad=1)
    x, weight, bias, seq, init = make_case(2, 40, 1300, 4, torch.float32, True, True, True, True)
    weight.requires_grad_(True)
    gs = [torch.autograd.grad(causal_conv1d(x, weight, bias, seq, init, activation="silu").sum(), weight)[0]
          for _ in range(3)]
    assert all(torch.equal(gs[0], g) for g in gs[1:])


# ---- op registration, compile, input validation -----------------------------------------------------


def test_opcheck():
    x, weight, bias, seq, init = make_case(2, 19, 6, 4, torch.float32, True, True, True, True)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), seq, init.requires_grad_(), True, True)
    torch.library.opcheck(torch.ops.h1r.causal_conv1d_fwd, args)
    xf = make_x(2, 19, 6, torch.float32, False).requires_grad_()
    torch.library.opcheck(torch.ops.h1r.causal_conv1d_fwd, (xf, weight, None, None, None, False, False))
    torch.library.opcheck(torch.ops.h1r.causal_conv1d_bwd,
                          (torch.randn(2, 19, 6), torch.randn(2, 19, 3), x.detach(), weight.detach(),
                           bias.detach(), seq, init.detach(), True))
    state = torch.randn(5, 19, 4)
    torch.library.opcheck(torch.ops.h1r.causal_conv1d_update,
                          (torch.randn(3, 19, 2), state, torch.randn(19, 3), torch.randn(19), True,
                           torch.tensor([4, 0, 2], dtype=torch.int32)))


def test_torch_compile_fullgraph():
    x, weight, bias, seq, init = make_case(2, 19, 10, 4, torch.float32, True, True, True, True)
    weight.requires_grad_(True)

    def f(x, weight, bias, seq, init, state):
        out, final = causal_conv1d(x, weight, bias, seq, init, True, "silu")
        step = causal_conv1d_update(out[..., -1].detach(), state, weight.detach(), bias, "silu")
        return out.sum() + final.sum() + step.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    s1, s2 = torch.randn(2, 19, 3), None
    s2 = s1.clone()
    got = compiled(x, weight, bias, seq, init, s1)
    want = f(x, weight, bias, seq, init, s2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(torch.autograd.grad(got, weight)[0], torch.autograd.grad(want, weight)[0])


def test_bad_inputs_raise_value_error():
    x = torch.randn(2, 8, 5)
    wt = torch.randn(8, 4)
    bad = [
        (lambda: causal_conv1d(x, torch.randn(8, 5)), "weight"),
        (lambda: causal_conv1d(x, torch.randn(7, 4)), "weight"),
        (lambda: causal_conv1d(x, wt, torch.randn(7)), "bias"),
        (lambda: causal_conv1d(x, wt, seq_idx=torch.zeros(2, 5)), "seq_idx"),
        (lambda: causal_conv1d(x, wt, seq_idx=torch.zeros(2, 4, dtype=torch.int32)), "seq_idx"),
        (lambda: causal_conv1d(x, wt, initial_states=torch.randn(2, 8, 4)), "initial_states"),
        (lambda: causal_conv1d(x, wt, activation="relu"), "activation"),
        (lambda: causal_conv1d(x.double(), wt.double()), "x"),
        (lambda: causal_conv1d(torch.randn(2, 8), wt), "x"),
        (lambda: causal_conv1d_update(x[..., 0], torch.randn(2, 8, 2), wt), "conv_state"),
        (lambda: causal_conv1d_update(x[..., 0], torch.randn(2, 8, 3).half(), wt), "conv_state"),
        (lambda: causal_conv1d_update(x[..., 0], torch.randn(1, 8, 3), wt), "conv_state"),
        (lambda: causal_conv1d_update(x[..., 0], torch.randn(4, 8, 3), wt, None, None,
                                      torch.tensor([0, 4], dtype=torch.int32)), "conv_state_indices"),
        (lambda: torch.ops.h1r.causal_conv1d_fwd(x, torch.randn(8, 5), None, None, None, False, False), "weight"),
        (lambda: torch.ops.h1r.causal_conv1d_fwd(x, wt, None, torch.zeros(2, 5, dtype=torch.int64), None, False,
                                                 False), "seq_idx"),
    ]
    for fn, name in bad:
        with pytest.raises(ValueError, match=f"'{name}'"):
            fn()


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_lower_isa_levels(isa):
    """Every ISA variant of the kernels: a small subset of the kernel tests under H1R_CPU_ISA."""
    sel = ("kernel_forward and bfloat16-True-4-65 or kernel_forward and float16-False-3-7 or "
           "kernel_backward and 65-4-float32 or update_vs_reference and float32 or update_step_vs_reference "
           "or fast_path_matches or expect_isa")
    run_pytest_subset(__file__, sel, {"H1R_CPU_ISA": isa, "H1R_CONV_EXPECT_ISA": isa})


@pytest.mark.skipif("H1R_CONV_EXPECT_ISA" not in os.environ, reason="only inside test_lower_isa_levels")
def test_expect_isa():
    assert torch.ops.h1r.cpu_isa() == os.environ["H1R_CONV_EXPECT_ISA"]


def test_conv1d_weight_layout_and_mixed_dtypes_backward():
    """An nn.Conv1d (d, 1, w) fp32 weight and bias with a bf16 x: gradients reach the parameters in fp32."""
    conv = torch.nn.Conv1d(D, D, 4, groups=D, padding=3)
    x = make_x(2, D, 33, torch.bfloat16, True).requires_grad_(True)
    out = causal_conv1d(x, conv.weight, conv.bias, activation="silu")
    assert out.dtype == torch.bfloat16
    dout = torch.randn_like(out)
    out.backward(dout)
    rx = f32(x).requires_grad_(True)
    rw, rb = conv.weight.detach().clone().requires_grad_(True), conv.bias.detach().clone().requires_grad_(True)
    causal_conv1d_ref(rx, rw, rb, activation="silu").backward(dout.float())
    assert conv.weight.grad.dtype == torch.float32 and conv.weight.grad.shape == (D, 1, 4)
    torch.testing.assert_close(conv.weight.grad, rw.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(conv.bias.grad, rb.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad.float(), rx.grad, atol=3e-2, rtol=2e-2)
