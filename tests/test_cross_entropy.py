"""Tests for the lm head fused with cross entropy / log-probs / entropy (h1r_ops.cross_entropy family).

Tolerances (against the fp32 reference, which uses fp32 logits):
  fp32: 1e-4 relative on losses, 1e-4 on gradients (normalized by their scale);
  bf16 / fp16: the chunk's logits (and dlogits) are rounded to the input dtype before the fp32
  statistics, as in every fused-linear CE (Liger), so losses carry ~2^-8 relative error of a logit:
  atol 3e-2 on losses, and gradients are compared relative to their max magnitude (4e-2 bf16, 1e-2 fp16).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from _isa import run_script

from h1r_ops import reference as ref

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ---------------------------------------------------------------------------------- the fused ops (CPU)
import h1r_ops  # noqa: E402

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 4e-2), torch.float16: (5e-3, 1e-2)}  # (loss atol, grad rel)


def _close_rel(got, want, rel, name=""):
    """|got - want| <= rel * max|want| (+ a tiny floor), elementwise; for gradients."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.numel():
        return
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    assert err <= rel * scale + 1e-7, f"{name}: max err {err:.3g} > {rel} * {scale:.3g}"


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _run_both(fn_ours, fn_ref, tensors, grad_out_fn):
    """Forward + backward of ours (on the given dtype) and of the reference (on fp32 copies)."""
    ours = [_leaf(t) for t in tensors]
    refs = [_leaf(None if t is None else t.float()) for t in tensors]
    out_o, out_r = fn_ours(*ours), fn_ref(*refs)
    outs_o = out_o if isinstance(out_o, tuple) else (out_o,)
    outs_r = out_r if isinstance(out_r, tuple) else (out_r,)
    gos = [grad_out_fn(o) for o in outs_r]
    torch.autograd.backward([o for o, g in zip(outs_o, gos) if g is not None], [g for g in gos if g is not None])
    torch.autograd.backward([o for o, g in zip(outs_r, gos) if g is not None], [g for g in gos if g is not None])
    return outs_o, outs_r, ours, refs


CE_CASES = [  # T, d, V, bias, n_ignored, label_smoothing, z_loss, logit_scale, chunk rows (None: default)
    (1, 1, 5, False, 0, 0.0, 0.0, 1.0, None),
    (7, 7, 1000, True, 2, 0.1, 0.0, 1.0, 3),
    (33, 300, 4099, False, 5, 0.0, 1e-3, 0.5, 8),
    (16, 64, 1000, True, 3, 0.2, 1e-2, 2.0, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_reference(dtype, case, reduction, monkeypatch):
    T, d, V, bias, n_ign, ls, zl, scale, chunk = case
    if chunk:
        monkeypatch.setenv("H1R_CE_CHUNK", str(chunk))
    h, W, y, b = _inputs(T, d, V, dtype, bias, n_ign, seed=T + V)
    kw = dict(reduction=reduction, label_smoothing=ls, z_loss=zl, logit_scale=scale, return_z_loss=True)
    g = torch.Generator().manual_seed(1)
    counter = iter(range(2))

    def grad_fn(o):  # a non-uniform upstream gradient for the loss; none for the (logged) z-loss
        if next(counter) == 1:
            return None
        return (torch.rand(o.shape, generator=g) + 0.5) if o.dim() else torch.tensor(0.7)

    (lo, zo), (lr, zr), ours, refs = _run_both(
        lambda h_, W_, b_: h1r_ops.fused_linear_cross_entropy(h_, W_, y, b_, **kw),
        lambda h_, W_, b_: ref.fused_linear_cross_entropy(h_, W_, y, b_, **kw),
        [h, W, b], grad_fn)
    atol, rel = TOL[dtype]
    assert lo.dtype == torch.float32 and lo.shape == lr.shape
    torch.testing.assert_close(lo, lr.detach(), atol=atol * (1 if reduction != "sum" else T), rtol=1e-4)
    torch.testing.assert_close(zo, zr.detach(), atol=atol * (1 if reduction != "sum" else T), rtol=1e-4)
    for name, o, r in zip(("hidden", "weight", "bias"), ours, refs):
        if o is not None:
            assert o.grad.dtype == dtype
            _close_rel(o.grad, r.grad, rel, name)


def test_all_ignored_gives_zero_loss_and_grads():
    h, W, y, b = _inputs(6, 8, 50, torch.float32, bias=True)
    y = torch.full_like(y, -100)
    for reduction in ("mean", "sum", "none"):
        hh, WW, bb = _leaf(h), _leaf(W), _leaf(b)
        loss = h1r_ops.fused_linear_cross_entropy(hh, WW, y, bb, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
        loss.sum().backward()
        assert torch.all(loss == 0)
        for t in (hh, WW, bb):
            assert torch.all(t.grad == 0) and not t.grad.isnan().any()


def test_batched_hidden_module_and_int32_target():
    h, W, y, _ = _inputs(12, 16, 97, torch.float32, n_ignored=2)
    h3, y3 = h.view(3, 4, 16), y.view(3, 4).to(torch.int32)
    mod = h1r_ops.FusedLinearCrossEntropyLoss(reduction="none", logit_scale=0.8)
    out = mod(h3, W, y3)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, ref.fused_linear_cross_entropy(h3, W, y3.long(), reduction="none", logit_scale=0.8))
    assert "logit_scale=0.8" in repr(mod)


def test_no_grad_forward_and_grad_of_hidden_only():
    h, W, y, _ = _inputs(9, 10, 300, torch.float32, n_ignored=1)
    with torch.no_grad():
        torch.testing.assert_close(h1r_ops.fused_linear_cross_entropy(h, W, y), ref.fused_linear_cross_entropy(h, W, y))
    hh = _leaf(h)
    h1r_ops.fused_linear_cross_entropy(hh, W, y, reduction="sum").backward(torch.tensor(3.0))
    hr = _leaf(h)
    ref.fused_linear_cross_entropy(hr, W, y, reduction="sum").backward(torch.tensor(3.0))
    _close_rel(hh.grad, hr.grad, 1e-4)


def test_side_outputs_and_second_backward():
    h, W, y, _ = _inputs(8, 6, 50, torch.float32, n_ignored=1)
    hh = _leaf(h)
    loss, zl = h1r_ops.fused_linear_cross_entropy(hh, W, y, z_loss=1e-2, return_z_loss=True)
    assert not zl.requires_grad and zl.item() > 0
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError):  # the precomputed gradients were scaled in place
        loss.backward()
    # an upstream gradient of exactly 1 leaves them untouched: a second backward is then right
    hh = _leaf(h)
    loss = h1r_ops.fused_linear_cross_entropy(hh, W, y)
    loss.backward(retain_graph=True)
    once = hh.grad.clone()
    loss.backward()
    torch.testing.assert_close(hh.grad, 2 * once)
    hr = _leaf(h)
    ref.fused_linear_cross_entropy(hr, W, y).backward()
    _close_rel(once, hr.grad, 1e-4)


def test_chunking_does_not_change_the_result(monkeypatch):
    h, W, y, b = _inputs(23, 12, 257, torch.float32, bias=True, n_ignored=3)
    res = []
    for chunk in ("1", "5", "64"):
        monkeypatch.setenv("H1R_CE_CHUNK", chunk)
        hh, WW, bb = _leaf(h), _leaf(W), _leaf(b)
        loss = h1r_ops.fused_linear_cross_entropy(hh, WW, y, bb, label_smoothing=0.1)
        loss.backward()
        res.append((loss.detach(), hh.grad, WW.grad, bb.grad))
    for r in res[1:]:
        for a, b_ in zip(r, res[0]):
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunks_of_a_large_vocabulary(dtype, monkeypatch):
    """The default chunk comes from a 128 MiB logits budget: at V 300000 that is 64 (fp32) / 128 (bf16) rows,
    so 130 tokens run as several chunks with a short last one; the result must be that of one chunk."""
    h, W, y, b = _inputs(130, 8, 300_000, dtype, bias=True, n_ignored=9, seed=3)
    res = []
    for chunk in (None, "130"):
        if chunk:
            monkeypatch.setenv("H1R_CE_CHUNK", chunk)
        hh, WW, bb = _leaf(h), _leaf(W), _leaf(b)
        loss = h1r_ops.fused_linear_cross_entropy(hh, WW, y, bb, z_loss=1e-3)
        loss.backward()
        res.append((loss.detach(), hh.grad, WW.grad, bb.grad))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    for a, b_ in zip(res[1], res[0]):
        torch.testing.assert_close(a, b_, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_chunks_give_no_nan(dtype, reduction, monkeypatch):
    """A chunk whose tokens are all ignored, and a batch with every token ignored: finite losses, zero
    gradients for the ignored tokens, and (for the mixed batch) the reference's values."""
    monkeypatch.setenv("H1R_CE_CHUNK", "4")
    h, W, y, b = _inputs(10, 16, 301, dtype, bias=True, seed=5)
    y[:4] = -100  # the whole first chunk
    y[9] = -100  # and one token of the short last chunk
    ours, refs = [_leaf(t) for t in (h, W, b)], [_leaf(t.float()) for t in (h, W, b)]
    lo = h1r_ops.fused_linear_cross_entropy(ours[0], ours[1], y, ours[2], reduction=reduction, label_smoothing=0.1)
    lr = ref.fused_linear_cross_entropy(refs[0], refs[1], y, refs[2], reduction=reduction, label_smoothing=0.1)
    lo.sum().backward()
    lr.sum().backward()
    atol, rel = TOL[dtype]
    torch.testing.assert_close(lo, lr.detach(), atol=atol * 10, rtol=1e-4)
    assert torch.all(ours[0].grad[:4] == 0) and torch.all(ours[0].grad[9] == 0)
    for name, o, r in zip(("hidden", "weight", "bias"), ours, refs):
        assert not o.grad.isnan().any()
        _close_rel(o.grad, r.grad, rel, name)
    # every token ignored
    y_all = torch.full_like(y, -100)
    ours = [_leaf(t) for t in (h, W, b)]
    loss = h1r_ops.fused_linear_cross_entropy(ours[0], ours[1], y_all, ours[2], reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0)
    for o in ours:
        assert torch.all(o.grad == 0)


# ------------------------------------------------------------------------------ log-probs and entropy
LP_CASES = [  # T, d, V, bias, n_ignored, temperature, logit_scale, chunk rows
    (1, 1, 5, False, 0, 1.0, 1.0, None), (7, 7, 1000, True, 2, 0.7, 1.0, 2), (33, 300, 4099, False, 4, 1.3, 0.5, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LP_CASES)
@pytest.mark.parametrize("grads", ["logprobs", "entropy", "both"])
def test_logprobs_matches_reference(dtype, case, grads, monkeypatch):
    T, d, V, bias, n_ign, temp, scale, chunk = case
    if chunk:
        monkeypatch.setenv("H1R_CE_CHUNK", str(chunk))
    h, W, y, b = _inputs(T, d, V, dtype, bias, n_ign, seed=T * V)
    g = torch.Generator().manual_seed(2)
    want = {"logprobs": (0,), "entropy": (1,), "both": (0, 1)}[grads]
    counter = iter(range(2))

    def grad_fn(o):
        i = next(counter)
        return torch.randn(o.shape, generator=g) if i in want else None

    (lp, ent), (lpr, entr), ours, refs = _run_both(
        lambda h_, W_, b_: h1r_ops.fused_linear_logprobs(h_, W_, y, b_, temperature=temp, logit_scale=scale),
        lambda h_, W_, b_: ref.fused_linear_logprobs(h_, W_, y, b_, temperature=temp, logit_scale=scale),
        [h, W, b], grad_fn)
    atol, rel = TOL[dtype]
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp, lpr.detach(), atol=atol, rtol=1e-4)
    torch.testing.assert_close(ent, entr.detach(), atol=atol, rtol=1e-4)
    assert torch.all(lp[y == -100] == 0) and torch.all(ent[y == -100] == 0)
    for name, o, r in zip(("hidden", "weight", "bias"), ours, refs):
        if o is not None:
            _close_rel(o.grad, r.grad, rel, name)


# --------------------------------------------------------------------------- opcheck, compile, errors
def test_opcheck():
    h, W, y, b = _inputs(5, 6, 37, torch.float32, bias=True, n_ignored=1)
    hh, WW, bb = _leaf(h), _leaf(W), _leaf(b)
    for red, cg in ((1, True), (0, False), (2, True)):
        torch.library.opcheck(torch.ops.h1r.fused_linear_cross_entropy_fwd,
                              (hh, WW, y, bb, -100, 0.1, 1e-3, 0.5, red, cg))
    lse = torch.ops.h1r.fused_linear_cross_entropy_fwd(h, W, y, b, -100, 0.1, 1e-3, 0.5, 0, False)[2]
    torch.library.opcheck(torch.ops.h1r.fused_linear_cross_entropy_bwd, (torch.rand(5), h, W, y, b, lse, -100, 0.1, 1e-3, 0.5))
    torch.library.opcheck(torch.ops.h1r.fused_linear_logprobs_fwd, (hh, WW, y, bb, 0.7, 1.0, -100))
    lse = torch.ops.h1r.fused_linear_logprobs_fwd(h, W, y, None, 0.7, 1.0, -100)[2]
    torch.library.opcheck(torch.ops.h1r.fused_linear_logprobs_bwd, (torch.randn(5), None, h, W, y, None, 0.7, 1.0, -100, lse))


def test_torch_compile_fullgraph():
    h, W, y, b = _inputs(10, 8, 60, torch.float32, bias=True, n_ignored=2)

    def f(h_, W_, b_):
        lp, ent = h1r_ops.fused_linear_logprobs(h_, W_, y, b_, temperature=0.9)
        return h1r_ops.fused_linear_cross_entropy(h_, W_, y, b_, z_loss=1e-3) + (lp * ent).sum()

    hh, WW, bb = _leaf(h), _leaf(W), _leaf(b)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(hh, WW, bb)
    out.backward()
    hr, Wr, br = _leaf(h), _leaf(W), _leaf(b)
    lp, ent = ref.fused_linear_logprobs(hr, Wr, y, br, temperature=0.9)
    want = ref.fused_linear_cross_entropy(hr, Wr, y, br, z_loss=1e-3) + (lp * ent).sum()
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for o, r in ((hh, hr), (WW, Wr), (bb, br)):
        _close_rel(o.grad, r.grad, 1e-4)


@pytest.mark.parametrize("mutate,arg", [
    (lambda a: a.update(target=a["target"][:-1]), "target"),
    (lambda a: a.update(target=a["target"].float()), "target"),
    (lambda a: a.update(weight=a["weight"][:, :-1]), "hidden"),
    (lambda a: a.update(bias=torch.zeros(3)), "bias"),
    (lambda a: a.update(hidden=a["hidden"].double(), weight=a["weight"].double()), "weight"),
    (lambda a: a.update(hidden=a["hidden"].bfloat16()), "hidden"),
    (lambda a: a.update(reduction="avg"), "reduction"),
    (lambda a: a.update(label_smoothing=1.5), "label_smoothing"),
])
def test_bad_input_raises_value_error(mutate, arg):
    h, W, y, _ = _inputs(4, 5, 11, torch.float32)
    a = dict(hidden=h, weight=W, target=y, bias=None, reduction="mean", label_smoothing=0.0)
    mutate(a)
    with pytest.raises(ValueError, match=f"'{arg}'"):
        h1r_ops.fused_linear_cross_entropy(**a)


def test_bad_target_and_temperature_raise_value_error():
    h, W, y, _ = _inputs(4, 5, 11, torch.float32)
    with pytest.raises(ValueError, match="'target'"):
        h1r_ops.fused_linear_cross_entropy(h, W, torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match="'temperature'"):
        h1r_ops.fused_linear_logprobs(h, W, y, temperature=0.0)
    with pytest.raises(ValueError, match="'lse'"):  # direct op call, checked in C++
        torch.ops.h1r.fused_linear_logprobs_bwd(None, None, h, W, y, None, 1.0, 1.0, -100, torch.zeros(3))


_ISA_SCRIPT = r"""
import torch, h1r_ops
from h1r_ops import reference as ref
assert torch.ops.h1r.cpu_isa() == "{isa}"
torch.manual_seed(0)
for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
    h = torch.randn(9, 13, dtype=dt); W = (torch.randn(203, 13) / 4).to(dt); y = torch.randint(0, 203, (9,)); y[2] = -100
    hh = h.clone().requires_grad_(); l = h1r_ops.fused_linear_cross_entropy(hh, W, y, label_smoothing=0.1); l.backward()
    hr = h.float().requires_grad_(); lr = ref.fused_linear_cross_entropy(hr, W.float(), y, label_smoothing=0.1); lr.backward()
    assert abs(l.item() - lr.item()) < tol, (l, lr)
    assert (hh.grad.float() - hr.grad).abs().max() < tol * hr.grad.abs().max()
    lp, ent = h1r_ops.fused_linear_logprobs(h, W, y, temperature=0.7)
    lpr, entr = ref.fused_linear_logprobs(h, W, y, temperature=0.7)
    assert (lp - lpr).abs().max() < tol * 10 and (ent - entr).abs().max() < tol * 10
print("ok")
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_lower_isa_levels(isa):
    run_script(_ISA_SCRIPT.replace("{isa}", isa), {"H1R_CPU_ISA": isa}, timeout=120)


# ------------------------------------------------------------------- Triton kernels (TRITON_INTERPRET=1)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def triton_ce():
    """h1r_ops/triton_kernels/cross_entropy.py, its kernels running in Triton's interpreter on CPU tensors.

    @triton.jit (triton.language's own helpers included) picks the interpreter when Triton is first
    imported, so these tests run in a subprocess started with TRITON_INTERPRET=1
    (test_triton_kernels_under_interpreter below)."""
    if not _INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_triton_kernels_under_interpreter")
    from h1r_ops.triton_kernels import cross_entropy as mod

    return mod


@pytest.mark.skipif(_INTERPRETED, reason="this is the driver of the interpreted run")
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_ and interpreted"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=_ROOT)
    assert r.returncode == 0 and " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


TRITON_CASES = [  # T, d, V, dtype, bias, n_ignored, block_v (small blocks: several per row, with a tail)
    (1, 1, 5, torch.float32, False, 0, None),
    (7, 7, 1000, torch.bfloat16, True, 2, 128),
    (5, 300, 4099, torch.float32, False, 1, 1024),
]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_cross_entropy_interpreted(triton_ce, case):
    T, d, V, dtype, bias, n_ign, bv = case
    h, W, y, b = _inputs(T, d, V, dtype, bias, n_ign, seed=V)
    args = (-100, 0.1, 1e-3, 0.7)
    atol, rel = TOL[dtype]
    for reduction in (1, 0):
        got = triton_ce.fused_linear_cross_entropy_fwd(h, W, y, b, *args, reduction, True, block_v=bv)
        want = torch.ops.h1r.fused_linear_cross_entropy_fwd(h, W, y, b, *args, reduction, True)
        for name, g_, w_ in zip(("loss", "z_loss", "lse", "gh", "gw", "gb"), got, want):
            assert g_.shape == w_.shape and g_.dtype == w_.dtype, name
            _close_rel(g_, w_, rel, name)
    lr = ref.fused_linear_cross_entropy(h, W, y, b, reduction="none", label_smoothing=0.1, z_loss=1e-3, logit_scale=0.7)
    torch.testing.assert_close(got[0], lr, atol=atol, rtol=1e-4)
    g = torch.rand(T)
    got = triton_ce.fused_linear_cross_entropy_bwd(g, h, W, y, b, want[2], *args, block_v=bv)
    want = torch.ops.h1r.fused_linear_cross_entropy_bwd(g, h, W, y, b, want[2], *args)
    for name, g_, w_ in zip(("gh", "gw", "gb"), got, want):
        _close_rel(g_, w_, rel, name)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_logprobs_interpreted(triton_ce, case):
    T, d, V, dtype, bias, n_ign, bv = case
    h, W, y, b = _inputs(T, d, V, dtype, bias, n_ign, seed=V + 1)
    atol, rel = TOL[dtype]
    lp, ent, lse = triton_ce.fused_linear_logprobs_fwd(h, W, y, b, 0.8, 1.2, -100, block_v=bv)
    lpr, entr = ref.fused_linear_logprobs(h, W, y, b, temperature=0.8, logit_scale=1.2)
    torch.testing.assert_close(lp, lpr, atol=atol, rtol=1e-4)
    torch.testing.assert_close(ent, entr, atol=atol, rtol=1e-4)
    _, _, lse_cpu = torch.ops.h1r.fused_linear_logprobs_fwd(h, W, y, b, 0.8, 1.2, -100)
    torch.testing.assert_close(lse, lse_cpu, atol=atol, rtol=1e-5)
    for dlp, dent in ((torch.randn(T), None), (torch.randn(T), torch.randn(T))):
        got = triton_ce.fused_linear_logprobs_bwd(dlp, dent, h, W, y, b, 0.8, 1.2, -100, lse, block_v=bv)
        want = torch.ops.h1r.fused_linear_logprobs_bwd(dlp, dent, h, W, y, b, 0.8, 1.2, -100, lse_cpu)
        for name, g_, w_ in zip(("gh", "gw", "gb"), got, want):
            _close_rel(g_, w_, rel, name)


def test_triton_all_ignored_interpreted(triton_ce):
    h, W, y, b = _inputs(4, 6, 40, torch.float32, bias=True)
    y = torch.full_like(y, -100)
    loss, _, _, gh, gw, gb = triton_ce.fused_linear_cross_entropy_fwd(h, W, y, b, -100, 0.0, 0.0, 1.0, 1, True)
    assert loss.item() == 0 and not gh.any() and not gw.any() and not gb.any()
    with pytest.raises(ValueError, match="'target'"):
        triton_ce.fused_linear_cross_entropy_fwd(h, W, torch.tensor([0, 1, 40, 2]), b, -100, 0.0, 0.0, 1.0, 1, True)
