"""h1r::linear (the few-rows linear layer with a fused epilogue) against h1r_ops.reference.linear_ref.

Tolerances: the kernel and the reference both accumulate in fp32 and round once, so they differ by the
accumulation order (fp32: 1e-5 relative) plus at most one output rounding (bf16: 1e-2, fp16: 2e-3 of the
largest |output|). The AVX512-BF16 path and the AMX tiles multiply exact bf16 pairs (no difference beyond
that)."""


import pytest
import torch
from _isa import run_pytest_subset, run_script

import h1r_ops
from h1r_ops.reference import linear_ref, swiglu_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = TOL[dtype] * max(ref.float().abs().max().item(), 1.0)
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    assert err <= tol, f"max error {err} > {tol}"


def make(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    return x, w, torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5, g


# (m, n, k): rows 1..few and past the 4-row tile, odd n (tile and 16-column block tails), odd k (vector
# tails of 8, 16 and 32 lanes), one weight large enough for the threaded path (>= 256 KiB)
SHAPES = [(1, 2, 1), (1, 6, 7), (3, 34, 100), (4, 64, 1024), (5, 18, 33), (16, 40, 130), (17, 8, 64),
          (2, 4100, 40)]


def test_reference_matches_explicit_sum():
    """linear_ref against an fp64 sum over k written element by element (an independent formulation)."""
    x, w, b, s, _ = make(3, 6, 5, torch.float32)
    r = torch.randn(3, 3, dtype=torch.float64)
    y = torch.zeros(3, 6, dtype=torch.float64)
    for i in range(3):
        for j in range(6):
            y[i, j] = sum(float(x[i, c]) * float(w[j, c]) for c in range(5)) * float(s[j]) + float(b[j])
    a = y[:, :3] / (1 + torch.exp(-y[:, :3])) * y[:, 3:]
    want = 0.75 * a + r
    got = linear_ref(x.double(), w.double(), b.double(), s.double(), 0.75, r, swiglu=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_vs_reference(m, n, k, dtype):
    x, w, b, s, g = make(m, n, k, dtype)
    close(torch.ops.h1r.linear(x, w), linear_ref(x, w), dtype)
    res = torch.randn(m, n // 2, generator=g).to(dtype)
    close(torch.ops.h1r.linear(x, w, b, s, 0.5, res, True), linear_ref(x, w, b, s, 0.5, res, True), dtype)
    res = torch.randn(m, n, generator=g).to(dtype)
    close(torch.ops.h1r.linear(x, w, b.to(dtype), None, -1.25, res, False),
          linear_ref(x, w, b.to(dtype), None, -1.25, res, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(dtype):
    """Rows of x, weight and residual with strides larger than their width (views of wider tensors)."""
    x, w, b, s, g = make(5, 36, 70, dtype)
    xw = torch.randn(5, 90, generator=g).to(dtype)
    xw[:, 3:73] = x
    ww = torch.randn(36, 81, generator=g).to(dtype)
    ww[:, :70] = w
    rw = torch.randn(5, 50, generator=g).to(dtype)
    xv, wv, rv = xw[:, 3:73], ww[:, :70], rw[:, 10:46]
    close(torch.ops.h1r.linear(xv, wv, b, s, 2.0, rv, False), linear_ref(x, w, b, s, 2.0, rv.clone(), False), dtype)


# (m, n, k) fitting the AMX path (k % 32 == 0, n_out % 16 == 0, m >= 5): one block of rows and several
# (a partial last B tile, a partial last block of 32; blocks of <= 16 rows run on one B tile: 5, 16, 33, 529),
# one 16-row panel tail (n % 32 == 16), more rows than one pass over the weight takes (the row chunk is 512
# rows at k = 1024, 176 at 2976, 160 at 2816), k steps not a power of two (2816: 88, 96: 3); every block's
# epilogue runs deferred into the next block's k loop, across panels and row chunks
AMX_SHAPES = [(5, 32, 32), (16, 48, 64), (17, 64, 2816), (31, 48, 128), (33, 96, 96), (64, 16, 1024),
              (200, 64, 2976), (529, 48, 1024), (600, 32, 1024)]


@pytest.mark.parametrize("m,n,k", AMX_SHAPES)
def test_amx_vs_reference(m, n, k):
    """bf16 x of 5+ rows on AMX tiles where the CPU has them (the dot-product kernel elsewhere): plain,
    every epilogue term, SwiGLU, strided rows of x and residual, and a weight viewed out of a wider one."""
    x, w, b, s, g = make(m, n, k, torch.bfloat16)
    close(torch.ops.h1r.linear(x, w), linear_ref(x, w), torch.bfloat16)
    res = torch.randn(m, n, generator=g).to(torch.bfloat16)
    close(torch.ops.h1r.linear(x, w, b, s, -0.75, res, False), linear_ref(x, w, b, s, -0.75, res, False),
          torch.bfloat16)
    if n % 32 == 0:
        res = torch.randn(m, n // 2, generator=g).to(torch.bfloat16)
        close(torch.ops.h1r.linear(x, w, b, s, 0.5, res, True), linear_ref(x, w, b, s, 0.5, res, True),
              torch.bfloat16)
    xw = torch.randn(m, k + 64, generator=g).to(torch.bfloat16)
    xw[:, 32 : 32 + k] = x
    ww = torch.randn(n, k + 32, generator=g).to(torch.bfloat16)
    ww[:, :k] = w
    rw = torch.randn(m, n + 8, generator=g).to(torch.bfloat16)
    xv, wv, rv = xw[:, 32 : 32 + k], ww[:, :k], rw[:, 3 : 3 + n]
    close(torch.ops.h1r.linear(xv, wv, b, None, 1.5, rv, False), linear_ref(x, w, b, None, 1.5, rv.clone(), False),
          torch.bfloat16)


def test_amx_flag():
    """linear_amx() says whether the AMX path runs: never under H1R_CPU_NO_AMX or below the avx512 level."""
    assert isinstance(torch.ops.h1r.linear_amx(), bool)
    for env in ({"H1R_CPU_NO_AMX": "1"}, {"H1R_CPU_ISA": "avx2"}):
        run_script("import h1r_ops, torch; assert not torch.ops.h1r.linear_amx(); print('ok')", env)


def test_empty_and_zero_k():
    x, w, *_ = make(0, 8, 16, torch.float32)
    assert torch.ops.h1r.linear(x, w).shape == (0, 8)
    out = torch.ops.h1r.linear(torch.zeros(2, 0), torch.zeros(4, 0), torch.ones(4))
    torch.testing.assert_close(out, torch.ones(2, 4))


def test_public_api_leading_dims_and_autograd():
    """(..., k) inputs, and gradients of every input against torch.autograd through the reference."""
    x, w, b, s, g = make(6, 10, 12, torch.float32)
    x = x.view(2, 3, 12)
    res = torch.randn(2, 3, 5, generator=g)
    args = [t.clone().requires_grad_(True) for t in (x, w, b, s, res)]
    ref_args = [t.clone().requires_grad_(True) for t in (x, w, b, s, res)]
    out = h1r_ops.linear(args[0], args[1], args[2], args[3], 0.7, args[4], swiglu=True)
    ref = linear_ref(ref_args[0], ref_args[1], ref_args[2], ref_args[3], 0.7, ref_args[4], swiglu=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn(2, 3, 5, generator=g)
    out.backward(dout)
    ref.backward(dout)
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


def test_opcheck():
    x, w, b, s, g = make(3, 8, 20, torch.float32)
    res = torch.randn(3, 4, generator=g)
    torch.library.opcheck(torch.ops.h1r.linear, (x, w, b, s, 0.5, res, True))
    torch.library.opcheck(torch.ops.h1r.linear, (x.requires_grad_(True), w, None, s, 1.0, None, False))


def test_torch_compile_fullgraph():
    x, w, b, s, _ = make(2, 8, 16, torch.float32)
    f = torch.compile(lambda x: h1r_ops.linear(x, w, b, s, swiglu=True) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), 2 * linear_ref(x, w, b, s, swiglu=True))


def test_bad_input():
    x, w, *_ = make(2, 8, 16, torch.float32)
    bad = [
        (lambda: h1r_ops.linear(x, w[:, :15]), "weight"),
        (lambda: h1r_ops.linear(x, w.bfloat16()), "weight"),
        (lambda: h1r_ops.linear(x, w[:7], swiglu=True), "weight"),
        (lambda: h1r_ops.linear(x, w, bias=torch.zeros(7)), "bias"),
        (lambda: h1r_ops.linear(x, w, scale=torch.zeros(8, 1)), "scale"),
        (lambda: h1r_ops.linear(x, w, residual=torch.zeros(2, 8), swiglu=True), "residual"),
        (lambda: h1r_ops.linear(x, w, residual=torch.zeros(2, 9)), "residual"),
        (lambda: h1r_ops.linear(x.long(), w), "x"),
        # the op itself (no Python validation) checks what it needs not to read out of bounds
        (lambda: torch.ops.h1r.linear(x, w[:, :15]), "weight"),
        (lambda: torch.ops.h1r.linear(x.t(), w), "x"),
        (lambda: torch.ops.h1r.linear(x, w, None, None, 1.0, torch.zeros(2, 7), False), "residual"),
        (lambda: torch.ops.h1r.linear(x, w, torch.zeros(3)), "bias"),
    ]
    for fn, name in bad:
        with pytest.raises(ValueError, match=f"'{name}'"):
            fn()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,width", [(1, 1), (3, 17), (5, 64), (40, 1800)])
def test_swiglu_vs_reference(m, width, dtype):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(m, 2 * width + 6, generator=g)).to(dtype)[:, 3 : 3 + 2 * width]  # strided rows
    close(torch.ops.h1r.swiglu(x, 0.8), swiglu_ref(x, 0.8), dtype)


def test_swiglu_reference_and_public_api():
    """swiglu_ref against silu written as x * sigmoid(x) in fp64; the public API's (..., 2w) inputs and
    gradients against torch.autograd through the reference; opcheck; bad input."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    gate, up = x[..., :5] * 1.5, x[..., 5:]
    torch.testing.assert_close(swiglu_ref(x, 1.5), gate * torch.sigmoid(gate) * up)
    xf = x.float().requires_grad_(True)
    xr = x.float().requires_grad_(True)
    out, ref = h1r_ops.swiglu(xf, 1.5), swiglu_ref(xr, 1.5)
    torch.testing.assert_close(out, ref)
    dout = torch.randn(2, 3, 5, generator=g)
    out.backward(dout)
    ref.backward(dout)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.h1r.swiglu, (torch.randn(3, 8, generator=g).requires_grad_(True), 0.5))
    with pytest.raises(ValueError, match="'x'"):
        h1r_ops.swiglu(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="'x'"):
        torch.ops.h1r.swiglu(torch.zeros(2, 5), 1.0)


def test_model_uses_kernel_for_few_rows():
    """The native model's projection helpers route few CPU rows through the kernel, many through the BLAS."""
    from h1r_ops.model import falcon_h1

    assert falcon_h1.row_kernel(torch.zeros(1, 8, dtype=torch.bfloat16))
    assert not falcon_h1.row_kernel(torch.zeros(64, 8, dtype=torch.bfloat16))
    # 5..512 bf16 rows (amx_max_rows): the AMX tiles where there are some, the shapes fit and no prepacked copy
    x16, w = torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(96, 64, dtype=torch.bfloat16)
    assert falcon_h1.row_kernel(x16, w) == falcon_h1.amx_rows()
    assert not falcon_h1.row_kernel(x16, w, packed=w)
    assert not falcon_h1.row_kernel(x16[:, :48], w[:, :48])   # k % 32 != 0
    assert not falcon_h1.row_kernel(x16, w[:40])   # n % 16 != 0
    assert falcon_h1.row_kernel(x16, w[:64], swiglu=True) == falcon_h1.amx_rows()   # n_out 32
    assert not falcon_h1.row_kernel(x16, w[:48], swiglu=True)   # n_out 24
    assert not falcon_h1.row_kernel(x16.repeat(65, 1), w)   # 1040 rows: the BLAS
    assert falcon_h1.row_kernel(x16.repeat(65, 1), w, amx_max_rows=4096) == falcon_h1.amx_rows()
    assert not falcon_h1.row_kernel(x16.float().repeat(2, 1)[:17], w.float())   # fp32: the kernel to 16 rows only
    x, w, b, _, g = make(3, 8, 16, torch.float32)
    r = torch.randn(3, 8, generator=g)
    torch.testing.assert_close(falcon_h1.addlinear_nt(r, x, w, 0.5, b), r + 0.5 * (x @ w.t() + b))


@pytest.mark.parametrize("env", [{"H1R_CPU_ISA": "scalar"}, {"H1R_CPU_ISA": "avx2"}, {"H1R_CPU_NO_AVX512_BF16": "1"},
                                 {"H1R_CPU_NO_AMX": "1"}],
                         ids=["scalar", "avx2", "no-avx512-bf16", "no-amx"])
def test_lower_isa_levels(env):
    """Every ISA variant, AVX-512 without its bf16 instructions (the dot product; AMX's epilogue rounds in
    software) and without AMX (bf16 batches on the dot-product kernel): a subset of the kernel tests."""
    sel = ("kernel_vs_reference and (3-34-100 or 16-40-130 or 2-4100-40) or strided_rows or swiglu_vs_reference"
           " or amx_vs_reference and (33-96-96 or 64-16-1024)")
    run_pytest_subset(__file__, sel, env)
    if "H1R_CPU_ISA" in env:
        run_script(f"import h1r_ops, torch; assert torch.ops.h1r.cpu_isa() == {env['H1R_CPU_ISA']!r}; print('ok')", env)
