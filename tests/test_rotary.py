"""Rotary embedding (NeoX layout): every backend against h1r_ops.reference, forward, inverse (= backward), in place.

Tolerances (tests/_norm_helpers.py TOL, max abs error relative to max(1, max |expected|)): fp32 2e-5,
bf16 2e-2, fp16 3e-3. Kernels compute in fp32 and round once; HF rounds after each bf16 product, so against
HF itself bf16 is compared with the same tolerance.

The Triton kernel runs on CUDA tensors when a GPU is present, else under TRITON_INTERPRET=1 on CPU tensors in
a subprocess (test_interpreted_triton_kernels).
"""

from __future__ import annotations

import math

import pytest
import torch

import h1r_ops
from h1r_ops import reference as R
from _norm_helpers import (DTYPE_IDS, DTYPES, KernelOps, assert_close, assert_same_bits_without_hw_bf16,
                           run_subset_under_isa, run_triton_subset_interpreted)
from _triton_interp import triton_device

TRITON_DEVICE = triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="runs in the TRITON_INTERPRET=1 subprocess")


def _hf():
    from transformers.models.falcon_h1 import modeling_falcon_h1

    return modeling_falcon_h1


# ---- the references, against independent formulations -------------------------------------------------------


def test_reference_matches_transformers():
    hf = _hf()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    cos, sin = R.rotary_cos_sin(torch.arange(9).expand(2, 9), 16, 1e4)
    for a, b in zip(R.rotary(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_reference_partial_rotary_and_inverse_explicit():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 10, generator=g), torch.randn(1, 1, 5, 10, generator=g)
    pos = torch.tensor([[3, 0, 7, 7, 1]])
    cos, sin = R.rotary_cos_sin(8, 6, 100.0)
    qo, ko = R.rotary(q, k, cos, sin, pos)
    # explicit per-pair rotation in fp64: channel i pairs with i + rd/2, angle pos * base^(-2i/rd)
    for h in range(2):
        for t in range(5):
            for i in range(3):
                ang = pos[0, t].item() * 100.0 ** (-2 * i / 6)
                x1, x2 = q[0, h, t, i].item(), q[0, h, t, i + 3].item()
                assert math.isclose(qo[0, h, t, i].item(), x1 * math.cos(ang) - x2 * math.sin(ang), abs_tol=1e-5)
                assert math.isclose(qo[0, h, t, i + 3].item(), x2 * math.cos(ang) + x1 * math.sin(ang), abs_tol=1e-5)
    torch.testing.assert_close(qo[..., 6:], q[..., 6:], rtol=0, atol=0)
    qi, ki = R.rotary(qo, ko, cos, sin, pos, inverse=True)
    torch.testing.assert_close(qi, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ki, k, rtol=1e-5, atol=1e-5)


def test_cos_sin_matches_transformers_and_fp64_accuracy():
    """fp32 angles (HF) at large positions: documents the error for Falcon-H1's rope_theta = 1e11."""
    hf = _hf()
    cfg = hf.FalconH1Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                            rope_theta=1e11, max_position_embeddings=262144)
    emb = hf.FalconH1RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 4095, 131071, 200000, 262143]])
    c_hf, s_hf = emb(torch.zeros(1, dtype=torch.float32), pos)
    for dtype in (torch.float32, torch.bfloat16):
        ours = h1r_ops.RotaryEmbedding(128, 1e11)(torch.zeros(1, dtype=dtype), pos)
        for a, b in zip(ours, emb(torch.zeros(1, dtype=dtype), pos)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    c, s = h1r_ops.rotary_cos_sin(pos, 128, 1e11)
    torch.testing.assert_close(c, c_hf, rtol=0, atol=0)
    torch.testing.assert_close(s, s_hf, rtol=0, atol=0)
    c64, s64 = h1r_ops.rotary_cos_sin(pos, 128, 1e11, dtype=torch.float64, compute_dtype=torch.float64)
    err = torch.maximum((c.double() - c64).abs(), (s.double() - s64).abs())
    # Measured (max over the 128 channels of |cos - cos_fp64|, |sin - sin_fp64|): 2.1e-5 at position 1000,
    # 9.6e-5 at 4095, 1.5e-3 at 200000, 2.8e-3 at 262143 (Falcon-H1-7B's max context). The angle error is
    # pos * (relative rounding error of the fp32 inv_freq and of the fp32 product), about 6e-8 * pos rad
    # at most; channel 0 (inv_freq = 1) is exact. compute_dtype=float64 removes it (cos/sin then carry
    # only the final rounding).
    assert err[0, 4].max() < 3e-3, err[0, 4].max()  # 200000
    assert err[0, :3].max() < 2e-4, err[0, :3].max()  # <= 4095
    c64f, _ = h1r_ops.rotary_cos_sin(pos, 128, 1e11, compute_dtype=torch.float64)
    assert (c64f.double() - c64).abs().max() < 1e-6


# ---- kernels (CPU C++ and Triton) against the reference ------------------------------------------------------


CPU_OPS = KernelOps("cpu")
TRITON_OPS = KernelOps(TRITON_DEVICE, "h1r_ops.triton_kernels.rotary")


def check_rotary(ops, dtype, b, hq, hk, s, hd, rd, layout, cos_form, cos_dtype):
    g = torch.Generator().manual_seed(b * 1000 + s)
    dev = ops.device
    if layout == "hf":  # (b, s, h, hd) storage seen as (b, h, s, hd), as HF's q_proj(...).view().transpose(1, 2)
        q = torch.randn(b, s, hq, hd, generator=g).to(dtype).to(dev).transpose(1, 2)
        k = torch.randn(b, s, hk, hd, generator=g).to(dtype).to(dev).transpose(1, 2)
    else:
        q = torch.randn(b, hq, s, hd, generator=g).to(dtype).to(dev)
        k = torch.randn(b, hk, s, hd, generator=g).to(dtype).to(dev)
    pos = None
    if cos_form == "table":
        pos = torch.randint(0, 3 * s + 2, (b, s), generator=g)
        cos, sin = R.rotary_cos_sin(3 * s + 2, rd, 500.0, cos_dtype)
    elif cos_form == "batch":
        cos, sin = R.rotary_cos_sin(torch.randint(0, 1000, (b, s), generator=g), rd, 1e4, cos_dtype)
    else:
        cos, sin = R.rotary_cos_sin(torch.arange(s)[None], rd, 1e4, cos_dtype)
    args = (cos.to(dev), sin.to(dev), pos.to(dev) if pos is not None else None)
    ref_q, ref_k = R.rotary(q.cpu(), k.cpu(), cos, sin, pos)
    qo, ko = ops.rotary(q, k, *args, False)
    assert qo.shape == q.shape and qo.stride() == q.stride()
    assert_close(qo.cpu(), ref_q, dtype, "q_out")
    assert_close(ko.cpu(), ref_k, dtype, "k_out")
    # inverse (the backward) against the reference's inverse, on the same input
    iq, ik = ops.rotary(q, k, *args, True)
    ref_iq, ref_ik = R.rotary(q.cpu(), k.cpu(), cos, sin, pos, inverse=True)
    assert_close(iq.cpu(), ref_iq, dtype, "q inverse")
    assert_close(ik.cpu(), ref_ik, dtype, "k inverse")
    # in place: same values, and the storage of q / k is what changed
    q2, k2 = q.clone(), k.clone()
    q2p = q2.data_ptr()
    ops.rotary_(q2, k2, *args, False)
    assert q2.data_ptr() == q2p
    assert_close(q2.cpu(), ref_q, dtype, "q in place")
    assert_close(k2.cpu(), ref_k, dtype, "k in place")


SHAPES = [  # b, hq, hk, s, hd, rd
    (1, 1, 1, 1, 2, 2),
    (2, 3, 1, 7, 8, 8),
    (1, 12, 2, 33, 128, 128),
    (2, 4, 2, 17, 64, 32),
    (3, 2, 1, 5, 10, 6),
]
FORMS = [("contiguous", "shared"), ("hf", "batch"), ("hf", "table"), ("contiguous", "table")]


@pytest.mark.parametrize("layout,cos_form", FORMS)
@pytest.mark.parametrize("b,hq,hk,s,hd,rd", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_rotary(dtype, b, hq, hk, s, hd, rd, layout, cos_form):
    check_rotary(CPU_OPS, dtype, b, hq, hk, s, hd, rd, layout, cos_form, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS[1:])
def test_cpu_rotary_fp32_cos(dtype):
    check_rotary(CPU_OPS, dtype, 2, 3, 1, 9, 16, 16, "hf", "table", torch.float32)


@pytest.mark.parametrize("dtype,b,hq,hk,s,hd,rd,layout", [
    (torch.bfloat16, 1, 8, 2, 4096, 128, 128, "contiguous"),
    (torch.bfloat16, 1, 8, 2, 4096, 128, 64, "hf"),
    (torch.float32, 1, 4, 1, 4096, 128, 128, "hf"),
], ids=["bf16", "bf16-partial-hf", "f32-hf"])
def test_cpu_rotary_large_outputs_streamed(dtype, b, hq, hk, s, hd, rd, layout):
    """q_out of 8 MiB and more is written with non-temporal stores (k_out, smaller, is not): same results."""
    check_rotary(CPU_OPS, dtype, b, hq, hk, s, hd, rd, layout, "shared", dtype)


def rotary_hw_bf16_outputs():
    """bf16 outputs of the CPU rotary (forward, inverse, in place) on inputs that hold what vcvtneps2bf16
    rounds differently from the software path (denormal results, NaN, inf), with an 8 MiB q_out
    (non-temporal stores) and a small odd shape (vector tails, a partial rotation)."""
    outs = []
    for b, hq, hk, s, hd, rd in ((1, 8, 2, 4096, 128, 128), (2, 3, 1, 7, 10, 6)):
        g = torch.Generator().manual_seed(4)
        q = torch.randn(b, hq, s, hd, generator=g).bfloat16()
        k = torch.randn(b, hk, s, hd, generator=g).bfloat16()
        q[0, 0, 1] *= 1e-38  # a row of tiny values: denormal results
        q[0, 1, 2, 3], k[0, 0, 3, 1], q[0, 2, 4, 0] = float("nan"), float("inf"), 3e-39
        cos, sin = R.rotary_cos_sin(torch.arange(s)[None], rd, 1e4, torch.bfloat16)
        for inverse in (False, True):
            outs += list(torch.ops.h1r.rotary(q, k, cos, sin, None, inverse))
        q2, k2 = q.clone(), k.clone()
        torch.ops.h1r.rotary_(q2, k2, cos, sin, None, False)
        outs += [q2, k2]
    return tuple(outs)


def test_cpu_hw_bf16_rounding_is_bit_exact(tmp_path):
    """bf16 outputs rounded by AVX512-BF16 (where the CPU has it) have the software rounding's bits."""
    assert_same_bits_without_hw_bf16("tests.test_rotary", "rotary_hw_bf16_outputs", tmp_path)


@needs_triton
@pytest.mark.parametrize("layout,cos_form", [("hf", "batch"), ("contiguous", "table")])
@pytest.mark.parametrize("b,hq,hk,s,hd,rd", SHAPES[:2] + [(2, 4, 2, 5, 64, 32), (1, 12, 2, 3, 128, 128), SHAPES[4]])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_rotary(dtype, b, hq, hk, s, hd, rd, layout, cos_form):
    check_rotary(TRITON_OPS, dtype, b, hq, hk, s, hd, rd, layout, cos_form, dtype)


@needs_triton
def test_triton_rotary_fp32_cos():
    check_rotary(TRITON_OPS, torch.bfloat16, 2, 3, 1, 9, 16, 16, "hf", "table", torch.float32)


def test_interpreted_triton_kernels():
    run_triton_subset_interpreted("tests/test_rotary.py", "test_triton_rotary")


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_isa_variants(isa):
    run_subset_under_isa("tests/test_rotary.py", "(test_cpu_rotary and (f32 or bf16) and not 128) or streamed", isa)


# ---- public API: autograd, HF drop-in, opcheck, compile, bad input -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
def test_api_matches_hf_and_autograd(dtype):
    hf = _hf()
    g = torch.Generator().manual_seed(5)
    b, s, hq, hk, hd = 2, 11, 4, 2, 32
    q = torch.randn(b, s, hq, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hk, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    cos, sin = h1r_ops.rotary_cos_sin(torch.arange(s).expand(b, s), hd, 1e11, dtype=dtype)
    qo, ko = h1r_ops.rotary(q, k, cos, sin)
    hq_, hk_ = hf.apply_rotary_pos_emb(q, k, cos, sin)
    assert_close(qo, hq_, dtype, "q vs HF")
    assert_close(ko, hk_, dtype, "k vs HF")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    rq, rk = R.rotary(qf, kf, cos.float(), sin.float())
    ((rq * gq.float()).sum() + (rk * gk.float()).sum()).backward()
    assert_close(q.grad, qf.grad, dtype, "dq")
    assert_close(k.grad, kf.grad, dtype, "dk")


def test_api_unsqueeze_dim_2_and_inplace():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 7, 3, 16, generator=g), torch.randn(2, 7, 1, 16, generator=g)  # (b, s, h, hd)
    cos, sin = h1r_ops.rotary_cos_sin(64, 16, 1e4)
    pos = torch.randint(0, 64, (2, 7), generator=g, dtype=torch.int32)
    qo, ko = h1r_ops.rotary(q, k, cos, sin, pos, unsqueeze_dim=2)
    rq, rk = R.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, pos.long())
    torch.testing.assert_close(qo, rq.transpose(1, 2))
    torch.testing.assert_close(ko, rk.transpose(1, 2))
    q2, k2 = q.clone(), k.clone()
    out = h1r_ops.rotary_(q2, k2, cos, sin, pos, unsqueeze_dim=2)
    assert out[0] is q2 and out[1] is k2
    torch.testing.assert_close(q2, qo)
    torch.testing.assert_close(k2, ko)


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 1, 5, 8, generator=g, requires_grad=True)
    cos, sin = R.rotary_cos_sin(torch.arange(5)[None], 6, 1e4)
    ct, st = R.rotary_cos_sin(9, 8, 1e4)
    pos = torch.randint(0, 9, (2, 5), generator=g)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.h1r.rotary, (q, k, cos, sin, None, inverse))
        torch.library.opcheck(torch.ops.h1r.rotary, (q, k, ct, st, pos, inverse))
    torch.library.opcheck(torch.ops.h1r.rotary_, (q.detach().clone(), k.detach().clone(), ct, st, pos, False))


def test_torch_compile_fullgraph():
    def f(q, k, cos, sin):
        return h1r_ops.rotary(q, k, cos, sin)

    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    cos, sin = R.rotary_cos_sin(torch.arange(6)[None], 16, 1e4)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, k, cos, sin), f(q, k, cos, sin)):
        torch.testing.assert_close(a, b)


_q, _k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
_c, _s = R.rotary_cos_sin(torch.arange(5)[None], 8, 1e4)


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: h1r_ops.rotary(_q, torch.randn(2, 1, 4, 8), _c, _s), "k"),
        (lambda: h1r_ops.rotary(_q, _k.half(), _c, _s), "k"),
        (lambda: h1r_ops.rotary(_q, _k, _c[..., :7], _s[..., :7]), "cos"),
        (lambda: h1r_ops.rotary(_q, _k, torch.cat([_c, _c], -1), torch.cat([_s, _s], -1)), "cos"),
        (lambda: h1r_ops.rotary(_q, _k, _c, _s.half()), "sin"),
        (lambda: h1r_ops.rotary(_q, _k, _c.expand(3, 5, 8), _s.expand(3, 5, 8)), "cos"),
        (lambda: h1r_ops.rotary(_q, _k, _c[0], _s[0], torch.ones(2, 5).float()), "position_ids"),
        (lambda: h1r_ops.rotary(_q, _k, _c, _s, unsqueeze_dim=3), "unsqueeze_dim"),
        (lambda: h1r_ops.rotary_(_q.transpose(-1, -2).contiguous().transpose(-1, -2), _k, _c, _s), "q"),
        (lambda: torch.ops.h1r.rotary(_q, _k, _c[0], _s[0], torch.full((2, 5), 5), False), "position_ids"),
        (lambda: torch.ops.h1r.rotary(_q, _k, _c, _s, None, False) and
         torch.ops.h1r.rotary(_q.transpose(-1, -2), _k, _c, _s, None, False), "q"),
        (lambda: h1r_ops.rotary_cos_sin(10, 7), "dim"),
    ],
)
def test_bad_input_raises_value_error(call, arg):
    with pytest.raises(ValueError, match=f"'{arg}'"):
        call()


def test_empty_sequence():
    q, k = torch.randn(1, 2, 0, 8), torch.randn(1, 1, 0, 8)
    cos, sin = h1r_ops.rotary_cos_sin(torch.arange(0)[None], 8)
    qo, ko = h1r_ops.rotary(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape
