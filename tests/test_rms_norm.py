"""RMSNorm (+ fused residual) and gated RMSNorm: every backend against h1r_ops.reference, forward and backward.

Tolerances (tests/_norm_helpers.py TOL, max abs error relative to max(1, max |expected|)): fp32 2e-5,
bf16 2e-2, fp16 3e-3; backward errors are allowed 2x (more fp32 terms are summed). Forward outputs are
compared with the reference run in the input dtype (transformers' numerics), gradients with the
reference's autograd in fp32 on the same (rounded) inputs.

The Triton kernels run on CUDA tensors when a GPU is present, else under TRITON_INTERPRET=1 on CPU tensors
in a subprocess (test_triton_kernels_in_interpreter). The interpreter rounds fp32 -> bf16 / fp16 by
truncation where GPUs round to nearest even, one more reason why bf16 / fp16 are compared with tolerances.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import h1r_ops
from h1r_ops import reference as R
from _norm_helpers import (DTYPE_IDS, DTYPES, KernelOps, assert_close, assert_same_bits_without_hw_bf16,
                           run_subset_under_isa, run_triton_subset_interpreted)
from _triton_interp import triton_device

EPS = 1e-6
TRITON_DEVICE = triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="runs in the TRITON_INTERPRET=1 subprocess")


def _inputs(rows, d, dtype, device="cpu", wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(d, generator=g)).to(wdtype or dtype)
    return x.to(device), w.to(device), g


# ---- the references, against independent formulations -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_rms_norm_matches_transformers(dtype):
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNorm

    x, w, g = _inputs(6, 40, dtype)
    r = torch.randn(6, 40, generator=g).to(dtype)
    m = FalconH1RMSNorm(40, eps=EPS).to(dtype)
    m.weight.data.copy_(w)
    torch.testing.assert_close(R.rms_norm(x, w, EPS), m(x), rtol=0, atol=0)
    out, h = R.rms_norm(x, w, EPS, residual=r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, m(x + r), rtol=0, atol=0)
    # an explicit per-row loop, in fp64
    for i in range(6):
        hi = h[i].double()
        ref = (hi / torch.sqrt(hi.pow(2).mean() + EPS)).to(dtype).double() * w.double()
        assert_close(out[i], ref, dtype)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
def test_reference_gated_matches_transformers(dtype, norm_before_gate):
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated

    d, ngroups = 48, 4
    x, w, g = _inputs(5, d, dtype)
    z = torch.randn(5, d, generator=g).to(dtype)
    m = FalconH1RMSNormGated(d, eps=EPS, n_groups=ngroups, norm_before_gate=norm_before_gate).to(dtype)
    m.weight.data.copy_(w)
    for zz in (z, None):
        ref = R.gated_rms_norm(x, zz, w, EPS, d // ngroups, norm_before_gate)
        torch.testing.assert_close(ref, m(x, zz), rtol=1e-6, atol=1e-6)
    # an explicit loop over groups, in fp64
    xd, zd = x.double(), z.double()
    u = xd * F.silu(zd) if not norm_before_gate else xd
    gs = d // ngroups
    out = torch.empty_like(xd)
    for j in range(ngroups):
        sl = slice(j * gs, (j + 1) * gs)
        out[:, sl] = u[:, sl] / torch.sqrt(u[:, sl].pow(2).mean(-1, keepdim=True) + EPS) * w[sl].double()
    if norm_before_gate:
        out = out * F.silu(zd)
    assert_close(R.gated_rms_norm(x, z, w, EPS, gs, norm_before_gate), out, dtype)


# ---- kernels (CPU C++ and Triton) against the reference ------------------------------------------------------


CPU_OPS = KernelOps("cpu")
TRITON_OPS = KernelOps(TRITON_DEVICE, "h1r_ops.triton_kernels.rms_norm")


def check_rms_norm(ops, dtype, rows, d, fused, wdtype=None):
    x, w, g = _inputs(rows, d, dtype, ops.device, wdtype)
    r = torch.randn(rows, d, generator=g).to(dtype).to(ops.device) if fused else None
    out, h, rstd = ops.rms_norm_fwd(x, w, EPS, r)
    ref = R.rms_norm(x.cpu(), w.cpu(), EPS, r.cpu() if fused else None)
    ref_out, ref_h = ref if fused else (ref, x.cpu())
    assert_close(out.cpu(), ref_out, dtype, "out")
    if fused:
        assert_close(h.cpu(), ref_h, dtype, "residual_out")
    else:
        assert h.numel() == 0
    assert_close(rstd.cpu(), torch.rsqrt(h.cpu().float().pow(2).mean(-1) + EPS) if fused else
                 torch.rsqrt(x.cpu().float().pow(2).mean(-1) + EPS), torch.float32, "rstd", factor=10)
    # backward: against autograd through the fp32 reference on the same rounded h
    dout = torch.randn(rows, d, generator=g).to(dtype)
    dres = torch.randn(rows, d, generator=g).to(dtype) if fused else None
    hf = ref_h.float().requires_grad_()
    wf = w.cpu().float().requires_grad_()
    (R.rms_norm(hf, wf, EPS) * dout.float()).sum().backward()
    ref_dh = hf.grad + (dres.float() if fused else 0)
    dh, dw = ops.rms_norm_bwd(dout.to(ops.device), dres.to(ops.device) if fused else None,
                              (h if fused else x), w, rstd)
    assert dw.dtype == torch.float32
    assert_close(dh.cpu(), ref_dh, dtype, "dh", factor=2)
    assert_close(dw.cpu(), wf.grad, dtype, "dweight", factor=2)


def check_gated(ops, dtype, rows, d, group_size, has_z, norm_before_gate):
    x, w, g = _inputs(rows, d, dtype, ops.device)
    z = torch.randn(rows, d, generator=g).to(dtype).to(ops.device) if has_z else None
    out, rstd = ops.gated_rms_norm_fwd(x, z, w, EPS, group_size, norm_before_gate)
    assert rstd.shape == (rows, d // group_size)
    zc = z.cpu() if has_z else None
    assert_close(out.cpu(), R.gated_rms_norm(x.cpu(), zc, w.cpu(), EPS, group_size, norm_before_gate), dtype, "out")
    dout = torch.randn(rows, d, generator=g).to(dtype)
    xf = x.cpu().float().requires_grad_()
    zf = zc.float().requires_grad_() if has_z else None
    wf = w.cpu().float().requires_grad_()
    (R.gated_rms_norm(xf, zf, wf, EPS, group_size, norm_before_gate) * dout.float()).sum().backward()
    dx, dz, dw = ops.gated_rms_norm_bwd(dout.to(ops.device), x, z, w, rstd, EPS, group_size, norm_before_gate)
    assert_close(dx.cpu(), xf.grad, dtype, "dx", factor=2)
    if has_z:
        assert_close(dz.cpu(), zf.grad, dtype, "dz", factor=2)
    else:
        assert dz.numel() == 0
    assert_close(dw.cpu(), wf.grad, dtype, "dweight", factor=2)


RMS_SHAPES = [(1, 1), (37, 1), (1, 7), (37, 7), (5, 3072), (1, 8191), (3, 8191), (130, 96)]
GATED_SHAPES = [(1, 1, 1), (9, 7, 7), (1, 12, 4), (9, 12, 3), (4, 3072, 1536), (2, 8191, 8191)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows,d", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_rms_norm(dtype, rows, d, fused):
    check_rms_norm(CPU_OPS, dtype, rows, d, fused)


@pytest.mark.parametrize("xdtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_cpu_rms_norm_mixed_weight_dtype(xdtype, wdtype):
    check_rms_norm(CPU_OPS, xdtype, 11, 70, True, wdtype)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("has_z", [True, False])
@pytest.mark.parametrize("rows,d,group_size", GATED_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_gated(dtype, rows, d, group_size, has_z, norm_before_gate):
    check_gated(CPU_OPS, dtype, rows, d, group_size, has_z, norm_before_gate)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("shape", [(7, 96), (2, 5, 64), (1, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_gated_strided_z_rows(dtype, shape, norm_before_gate):
    """z as a column slice of a wider buffer (the fused model's in-projection output) is read in place and
    gives the bits of its contiguous copy; a z whose last dimension is strided is copied, same result."""
    torch.manual_seed(3)
    d = shape[-1]
    x = torch.randn(shape).to(dtype)
    wide = torch.randn(*shape[:-1], 3 * d + 5).to(dtype)
    z = wide[..., d + 3:2 * d + 3]
    w = (1 + 0.1 * torch.randn(d)).to(dtype)
    want = torch.ops.h1r.gated_rms_norm_fwd(x, z.contiguous(), w, 1e-5, d // 2 if d % 2 == 0 else d,
                                            norm_before_gate)
    got = torch.ops.h1r.gated_rms_norm_fwd(x, z, w, 1e-5, d // 2 if d % 2 == 0 else d, norm_before_gate)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    zt = wide[..., :2 * d:2]  # last-dimension stride 2
    got = torch.ops.h1r.gated_rms_norm_fwd(x, zt, w, 1e-5, d, norm_before_gate)
    want = torch.ops.h1r.gated_rms_norm_fwd(x, zt.contiguous(), w, 1e-5, d, norm_before_gate)
    assert torch.equal(got[0], want[0])
    with pytest.raises(ValueError, match="'z'"):
        torch.ops.h1r.gated_rms_norm_fwd(x, wide, w, 1e-5, d, norm_before_gate)


@needs_triton
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows,d", [(1, 1), (5, 7), (3, 3072), (2, 8191), (37, 96)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_rms_norm(dtype, rows, d, fused):
    check_rms_norm(TRITON_OPS, dtype, rows, d, fused)


@needs_triton
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("has_z", [True, False])
@pytest.mark.parametrize("rows,d,group_size", [(1, 1, 1), (6, 7, 7), (5, 12, 3), (2, 3072, 1536), (1, 8191, 8191)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_gated(dtype, rows, d, group_size, has_z, norm_before_gate):
    check_gated(TRITON_OPS, dtype, rows, d, group_size, has_z, norm_before_gate)


def test_interpreted_triton_kernels():
    run_triton_subset_interpreted("tests/test_rms_norm.py", "test_triton_rms_norm or test_triton_gated")


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_isa_variants(isa):
    run_subset_under_isa("tests/test_rms_norm.py",
                         "((test_cpu_rms_norm or test_cpu_gated) and (f32 or bf16) and not 3072 and not 8191) or streamed",
                         isa)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS[1:])
def test_cpu_forward_rounding_is_torch_rounding(dtype, fused):
    """With the kernel's own rstd, out = T(w * T(h * rstd)) is a handful of IEEE operations, so the result must
    match torch's (round to nearest even) bit for bit. 1M values hit ~16 exact ties of the bf16 rounding."""
    x, w, g = _inputs(512, 2048, dtype)
    r = torch.randn(512, 2048, generator=g).to(dtype) if fused else None
    out, h, rstd = torch.ops.h1r.rms_norm_fwd(x, w, EPS, r)
    if fused:
        assert torch.equal(h, (x.float() + r.float()).to(dtype))
    else:
        h = x
    want = (w.float() * (h.float() * rstd[:, None]).to(dtype).float()).to(dtype)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_nan_stays_in_its_row(dtype):
    x, w, g = _inputs(4, 100, dtype)
    x[1, 37] = float("nan")
    x.requires_grad_()
    out = h1r_ops.rms_norm(x, w)
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()
    out.backward(torch.randn(4, 100, generator=g).to(dtype))
    assert x.grad[1].isnan().all() and not x.grad[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_gated_extreme_gate(dtype, norm_before_gate):
    # The kernels' sigmoid uses a saturating polynomial exp and a refined hardware reciprocal: check the
    # gate at |z| far past exp's range (silu -> 0 or z, silu' -> 0 or 1) in fwd and bwd against the
    # reference, over a row long enough for full vectors and a tail; a NaN in z stays in its row.
    rows, d = 4, 67
    x, w, g = _inputs(rows, d, dtype)
    z = torch.tensor([-1e4, -200.0, -88.0, -30.0, -0.5, 0.0, 0.5, 30.0, 88.0, 200.0, 1e4]).repeat(rows * 7)
    z = z[: rows * d].reshape(rows, d).to(dtype)
    check = lambda zz: R.gated_rms_norm(x.float(), zz.float(), w.float(), EPS, None, norm_before_gate)  # noqa: E731
    out, rstd = torch.ops.h1r.gated_rms_norm_fwd(x, z, w, EPS, d, norm_before_gate)
    assert_close(out, check(z), dtype, "out")
    dout = torch.randn(rows, d, generator=g).to(dtype)
    xf, zf = x.float().clone().requires_grad_(), z.float().clone().requires_grad_()
    (R.gated_rms_norm(xf, zf, w.float(), EPS, None, norm_before_gate) * dout.float()).sum().backward()
    dx, dz, _ = torch.ops.h1r.gated_rms_norm_bwd(dout, x, z, w, rstd, EPS, d, norm_before_gate)
    assert_close(dx, xf.grad, dtype, "dx", factor=2)
    assert_close(dz, zf.grad, dtype, "dz", factor=2)
    z[2, 5] = float("nan")
    out, rstd = torch.ops.h1r.gated_rms_norm_fwd(x, z, w, EPS, d, norm_before_gate)
    dx, dz, _ = torch.ops.h1r.gated_rms_norm_bwd(dout, x, z, w, rstd, EPS, d, norm_before_gate)
    for t in (out, dx):
        assert t[2].isnan().any() and not t[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_large_outputs_streamed(dtype):
    """Outputs of 8 MiB and more are written with non-temporal stores (rows 64-byte aligned): same results."""
    check_rms_norm(CPU_OPS, dtype, 1024, 4096, True)
    check_gated(CPU_OPS, dtype, 1024, 4096, 2048, True, False)


def hw_bf16_outputs():
    """Every bf16 output of the CPU norm kernels on inputs that hold what vcvtneps2bf16 rounds differently
    from the software path (denormal results from denormal weights and gradients, NaN, inf) and many exact
    ties (products of bf16 values), at 1024 x 4096 (8 MiB outputs: non-temporal stores) and 37 x 1000 (a
    vector tail)."""
    outs = []
    for rows, d in ((1024, 4096), (37, 1000)):
        g = torch.Generator().manual_seed(3)
        x, r, dout, dres, z = (torch.randn(rows, d, generator=g).bfloat16() for _ in range(5))
        w = (1 + 0.5 * torch.randn(d, generator=g)).bfloat16()
        w[3::97] = 3e-39  # denormal: w * xn and the gradients through w are denormal
        x[5, 7], x[6, 8], r[8, 9] = float("nan"), float("inf"), float("-inf")
        dout[9] *= 1e-37  # a row of tiny gradients: denormal dh
        z[10, 11] = float("nan")
        for res, dr in ((None, None), (r, dres)):
            out, h, rstd = torch.ops.h1r.rms_norm_fwd(x, w, EPS, res)
            outs += [out, h, rstd, *torch.ops.h1r.rms_norm_bwd(dout, dr, h if res is not None else x, w, rstd)]
        for zz in (z, None):
            for nbg in (False, True):
                out, rstd = torch.ops.h1r.gated_rms_norm_fwd(x, zz, w, EPS, d // 2 if nbg else d, nbg)
                outs += [out, rstd, *torch.ops.h1r.gated_rms_norm_bwd(dout, x, zz, w, rstd, EPS,
                                                                      d // 2 if nbg else d, nbg)]
    return tuple(outs)


def test_cpu_hw_bf16_rounding_is_bit_exact(tmp_path):
    """bf16 outputs rounded by AVX512-BF16 (where the CPU has it) have the software rounding's bits."""
    assert_same_bits_without_hw_bf16("tests.test_rms_norm", "hw_bf16_outputs", tmp_path)


def test_dweight_deterministic_across_thread_counts():
    x, w, g = _inputs(301, 257, torch.float32)
    dout = torch.randn(301, 257, generator=g)
    _, _, rstd = torch.ops.h1r.rms_norm_fwd(x, w, EPS, None)
    z = torch.randn(301, 257, generator=g)
    _, grstd = torch.ops.h1r.gated_rms_norm_fwd(x, z, w, EPS, 257, False)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((torch.ops.h1r.rms_norm_bwd(dout, None, x, w, rstd)[1],
                            torch.ops.h1r.gated_rms_norm_bwd(dout, x, z, w, grstd, EPS, 257, False)[2]))
    finally:
        torch.set_num_threads(threads)
    for a, b in results[1:]:
        assert torch.equal(a, results[0][0]) and torch.equal(b, results[0][1])


# ---- public API: autograd, modules, opcheck, compile, bad input ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS[:2])
def test_api_autograd_fused_residual(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 33, generator=g).to(dtype).requires_grad_()
    r = torch.randn(2, 5, 33, generator=g).to(dtype).requires_grad_()
    m = h1r_ops.RMSNorm(33, eps=1e-5)
    with torch.no_grad():
        m.weight.add_(0.3 * torch.randn(33, generator=g))
    out, h = m(x, r)
    go, gh = torch.randn_like(out), torch.randn_like(h)
    ((out * go).sum() + (h * gh).sum()).backward()
    xf, rf = x.detach().float().requires_grad_(), r.detach().float().requires_grad_()
    wf = m.weight.detach().clone().requires_grad_()
    of, hf = R.rms_norm(xf, wf, 1e-5, rf)
    ((of * go.float()).sum() + (hf * gh.float()).sum()).backward()
    assert_close(out, of, dtype, "out")
    assert_close(x.grad, xf.grad, dtype, "dx", factor=2)
    assert_close(r.grad, rf.grad, dtype, "dresidual", factor=2)
    assert_close(m.weight.grad, wf.grad, dtype, "dweight", factor=2)
    assert m.weight.grad.dtype == torch.float32 and out.dtype == dtype


def test_api_gated_module_autograd():
    g = torch.Generator().manual_seed(2)
    m = h1r_ops.RMSNormGated(24, eps=1e-5, group_size=8, norm_before_gate=False)
    x = torch.randn(3, 4, 24, generator=g, requires_grad=True)
    z = torch.randn(3, 4, 24, generator=g, requires_grad=True)
    m(x, z).square().sum().backward()
    xf, zf = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    wf = m.weight.detach().clone().requires_grad_()
    R.gated_rms_norm(xf, zf, wf, 1e-5, 8, False).square().sum().backward()
    for a, b in ((x.grad, xf.grad), (z.grad, zf.grad), (m.weight.grad, wf.grad)):
        assert_close(a, b, torch.float32, factor=2)


def test_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, generator=g)
    r = torch.randn(4, 10, generator=g)
    z = torch.randn(4, 10, generator=g)
    w = torch.randn(10, generator=g, requires_grad=True)
    xg = x.clone().requires_grad_()
    for res in (None, r.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.h1r.rms_norm_fwd, (xg, w, EPS, res))
    out, h, rstd = torch.ops.h1r.rms_norm_fwd(x, w.detach(), EPS, r)
    torch.library.opcheck(torch.ops.h1r.rms_norm_bwd, (x, r, h, w.detach(), rstd))
    for nbg in (True, False):
        torch.library.opcheck(torch.ops.h1r.gated_rms_norm_fwd, (xg, z.clone().requires_grad_(), w, EPS, 5, nbg))
        _, grstd = torch.ops.h1r.gated_rms_norm_fwd(x, z, w.detach(), EPS, 5, nbg)
        torch.library.opcheck(torch.ops.h1r.gated_rms_norm_bwd, (r, x, z, w.detach(), grstd, EPS, 5, nbg))
    torch.library.opcheck(torch.ops.h1r.gated_rms_norm_fwd, (xg, None, w, EPS, 10, True))


def test_torch_compile_fullgraph():
    def f(x, r, w, z, wg):
        out, h = h1r_ops.rms_norm(x, w, 1e-6, r)
        return h1r_ops.gated_rms_norm(out, z, wg, 1e-6, 4, False), h

    args = [torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(3, 8), torch.randn(8)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), f(*args)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: h1r_ops.rms_norm(torch.randn(3, 8), torch.randn(7)), "weight"),
        (lambda: h1r_ops.rms_norm(torch.randn(3, 8).double(), torch.randn(8)), "x"),
        (lambda: h1r_ops.rms_norm("x", torch.randn(8)), "x"),
        (lambda: h1r_ops.rms_norm(torch.randn(3, 8), torch.randn(8), residual=torch.randn(3, 9)), "residual"),
        (lambda: h1r_ops.rms_norm(torch.randn(3, 8), torch.randn(8), residual=torch.randn(3, 8).half()), "residual"),
        (lambda: h1r_ops.rms_norm(torch.randn(3, 8), torch.randn(8), eps=-1.0), "eps"),
        (lambda: h1r_ops.gated_rms_norm(torch.randn(3, 8), torch.randn(3, 7), torch.randn(8)), "z"),
        (lambda: h1r_ops.gated_rms_norm(torch.randn(3, 8), None, torch.randn(8), group_size=3), "group_size"),
        (lambda: torch.ops.h1r.rms_norm_fwd(torch.randn(3, 8).t(), torch.randn(3), 1e-6, None), "x"),
        (lambda: torch.ops.h1r.rms_norm_bwd(torch.randn(3, 8), None, torch.randn(3, 8), torch.randn(8),
                                            torch.randn(2)), "rstd"),
        (lambda: torch.ops.h1r.gated_rms_norm_fwd(torch.randn(3, 8), None, torch.randn(8), 1e-6, 3, True),
         "group_size"),
    ],
)
def test_bad_input_raises_value_error(call, arg):
    with pytest.raises(ValueError, match=f"'{arg}'"):
        call()


def test_empty_batch():
    x = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    out = h1r_ops.rms_norm(x, w)
    out.sum().backward()
    assert out.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))
    assert h1r_ops.gated_rms_norm(x, torch.randn(0, 8), w, group_size=4).shape == (0, 8)
