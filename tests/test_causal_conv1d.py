"""causal_conv1d / causal_conv1d_update: the reference against independent formulations, then every
kernel against the reference (forward, backward, decode step), opcheck, torch.compile and input checks.

Tolerances (max abs error vs the fp32/fp64 reference on O(1) inputs): fp32 1e-5 (only the order of the
fp32 sums differs), fp16 2e-3 and bf16 2e-2 (one rounding of the output, ~2^-11 / 2^-8 relative)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
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
