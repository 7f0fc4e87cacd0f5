"""Tests for the lm head fused with cross entropy / log-probs / entropy (h1r_ops.cross_entropy family).

Tolerances (against the fp32 reference, which uses fp32 logits):
  fp32: 1e-4 relative on losses, 1e-4 on gradients (normalized by their scale);
  bf16 / fp16: the chunk's logits (and dlogits) are rounded to the input dtype before the fp32
  statistics, as in every fused-linear CE (Liger), so losses carry ~2^-8 relative error of a logit:
  atol 3e-2 on losses, and gradients are compared relative to their max magnitude (4e-2 bf16, 1e-2 fp16).
"""

from __future__ import annotations

import math

import pytest
import torch

from h1r_ops import reference as ref


def _loop_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, logit_scale):
    """Per-token losses from an explicit loop over tokens and classes, in fp64 Python floats."""
    T, _ = hidden.shape
    V = weight.shape[0]
    h, W = hidden.double().tolist(), weight.double().tolist()
    b = bias.double().tolist() if bias is not None else [0.0] * V
    out = []
    for t in range(T):
        y = int(target[t])
        if y == ignore_index:
            out.append(0.0)
            continue
        z = [(sum(hi * wi for hi, wi in zip(h[t], W[j])) + b[j]) * logit_scale for j in range(V)]
        m = max(z)
        lse = m + math.log(sum(math.exp(zj - m) for zj in z))
        nll = lse - z[y]
        smooth = sum(lse - zj for zj in z) / V
        out.append((1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse * lse)
    return torch.tensor(out, dtype=torch.float64)


def _loop_logprobs(hidden, weight, target, bias, temperature, logit_scale, ignore_index):
    T, _ = hidden.shape
    V = weight.shape[0]
    h, W = hidden.double().tolist(), weight.double().tolist()
    b = bias.double().tolist() if bias is not None else [0.0] * V
    lps, ents = [], []
    for t in range(T):
        y = int(target[t])
        if y == ignore_index:
            lps.append(0.0)
            ents.append(0.0)
            continue
        u = [(sum(hi * wi for hi, wi in zip(h[t], W[j])) + b[j]) * logit_scale / temperature for j in range(V)]
        m = max(u)
        lse = m + math.log(sum(math.exp(uj - m) for uj in u))
        lps.append(u[y] - lse)
        ents.append(-sum(math.exp(uj - lse) * (uj - lse) for uj in u))
    return torch.tensor(lps, dtype=torch.float64), torch.tensor(ents, dtype=torch.float64)


def _inputs(T, d, V, dtype=torch.float32, bias=False, n_ignored=0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, d, generator=g) / math.sqrt(d)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    target = torch.randint(0, V, (T,), generator=g)
    if n_ignored:
        target[torch.randperm(T, generator=g)[:n_ignored]] = -100
    return hidden, weight, target, b


# ---------------------------------------------------------------- the reference against explicit loops
@pytest.mark.parametrize("T,d,V,bias,n_ign,ls,zl,scale", [
    (5, 3, 7, False, 0, 0.0, 0.0, 1.0),
    (6, 4, 11, True, 2, 0.1, 1e-2, 0.5),
    (3, 1, 5, True, 3, 0.2, 1e-3, 2.0),
])
def test_reference_cross_entropy_matches_loop(T, d, V, bias, n_ign, ls, zl, scale):
    h, W, y, b = _inputs(T, d, V, torch.float64, bias, n_ign)
    want = _loop_cross_entropy(h, W, y, b, -100, ls, zl, scale)
    got = ref.fused_linear_cross_entropy(h, W, y, b, reduction="none", label_smoothing=ls, z_loss=zl,
                                         logit_scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    n_valid = max(T - n_ign, 1)
    torch.testing.assert_close(ref.fused_linear_cross_entropy(h, W, y, b, reduction="sum", label_smoothing=ls,
                                                              z_loss=zl, logit_scale=scale), want.sum())
    torch.testing.assert_close(ref.fused_linear_cross_entropy(h, W, y, b, reduction="mean", label_smoothing=ls,
                                                              z_loss=zl, logit_scale=scale), want.sum() / n_valid)


@pytest.mark.parametrize("T,d,V,bias,n_ign,temp,scale", [(5, 3, 7, False, 0, 1.0, 1.0), (6, 4, 9, True, 2, 0.7, 1.5)])
def test_reference_logprobs_matches_loop(T, d, V, bias, n_ign, temp, scale):
    h, W, y, b = _inputs(T, d, V, torch.float64, bias, n_ign)
    lp_want, ent_want = _loop_logprobs(h, W, y, b, temp, scale, -100)
    lp, ent = ref.fused_linear_logprobs(h, W, y, b, temperature=temp, logit_scale=scale)
    torch.testing.assert_close(lp, lp_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ent_want, rtol=1e-10, atol=1e-10)


def test_reference_all_ignored_mean_is_zero():
    h, W, y, b = _inputs(4, 3, 5, torch.float64)
    h.requires_grad_(True)
    loss = ref.fused_linear_cross_entropy(h, W, torch.full_like(y, -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)
