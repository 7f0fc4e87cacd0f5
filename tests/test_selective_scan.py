"""selective_scan / selective_state_update: references against each other, kernels against the reference.

Tolerances (max abs error relative to the reference's max magnitude, both computed in fp32 from the same
rounded inputs): fp32 1e-4; bf16 / fp16 one output rounding, 2e-2 / 4e-3. Gradients: fp32 1e-3, bf16 4e-2.
Final states 1e-4, or 1e-2 for bf16 on AMX tiles (bf16 operands, see AMX_STATE_TOL).
"""

import math

import pytest
import torch
from _isa import run_script

import h1r_ops
from h1r_ops import _registry
from h1r_ops.reference import selective_scan_ref, selective_scan_sequential_ref, selective_state_update_ref

HAS_CPU = _registry.has_kernel("selective_scan_fwd", "cpu")
HAS_BWD = _registry.has_kernel("selective_scan_bwd", "cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="h1r_ops._C not built with the selective_scan CPU kernels")
needs_bwd = pytest.mark.skipif(not HAS_BWD, reason="no selective_scan_bwd CPU kernel")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-10}


def make_inputs(b, l, h, p, g, n, dtype=torch.float32, D="hp", z=True, dt_bias=True, init=True, seq=True,
                seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    kw = {}
    args = dict(x=r(b, l, h, p), dt=r(b, l, h, scale=0.5), A=-(torch.rand(h, generator=gen) + 0.3),
                B=r(b, l, g, n, scale=n ** -0.5), C=r(b, l, g, n, scale=n ** -0.5))
    if D == "hp":
        kw["D"] = r(h, p, dt=torch.float32)
    elif D == "h":
        kw["D"] = r(h, dt=torch.float32)
    if z:
        kw["z"] = r(b, l, h, p)
    if dt_bias:
        kw["dt_bias"] = r(h, scale=0.5, dt=torch.float32)
    if init:
        kw["initial_states"] = r(b, h, p, n, scale=0.5, dt=torch.float32)
    if seq and l > 1:
        cuts = torch.sort(torch.randint(0, l, (b, 2), generator=gen), dim=1).values
        pos = torch.arange(l)[None]
        kw["seq_idx"] = ((pos >= cuts[:, :1]).int() + (pos >= cuts[:, 1:]).int()).to(torch.int32)
    if requires_grad:
        for d in (args, kw):
            for k, v in d.items():
                if v.is_floating_point():
                    v.requires_grad_(True)
    return args, kw


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def upcast(args, kw):
    f = lambda v: v.detach().float() if v.is_floating_point() else v  # noqa: E731
    return {k: f(v) for k, v in args.items()}, {k: f(v) for k, v in kw.items()}


# ---- the references against each other ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 7, 4, 3, 2, 5, 4), (1, 17, 2, 4, 1, 8, 8), (2, 1, 2, 2, 1, 3, 4),
                                   (1, 33, 4, 5, 2, 6, 8), (2, 24, 2, 3, 2, 4, 8)])
@pytest.mark.parametrize("opts", [{}, dict(D="h", z=False, dt_bias=False, init=False, seq=False)])
def test_chunked_ref_matches_sequential(shape, opts):
    b, l, h, p, g, n, Q = shape
    args, kw = make_inputs(b, l, h, p, g, n, dtype=torch.float64, **opts)
    kw = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    args["A"] = args["A"].double()
    for softplus, limit in [(True, (0.0, math.inf)), (False, (0.05, 0.7))]:
        o1, s1 = selective_scan_ref(**args, chunk_size=Q, **kw, dt_softplus=softplus, dt_limit=limit,
                                    return_final_states=True)
        o2, s2 = selective_scan_sequential_ref(**args, **kw, dt_softplus=softplus, dt_limit=limit,
                                               return_final_states=True)
        assert rel_err(o1, o2) < 1e-10 and rel_err(s1, s2) < 1e-10


@pytest.mark.parametrize("g", [1, 2])
def test_state_update_ref_reproduces_scan(g):
    b, l, h, p, n = 2, 9, 4, 3, 5
    args, kw = make_inputs(b, l, h, p, g, n, seq=False)
    out, final = selective_scan_ref(**args, chunk_size=4, **kw, dt_softplus=True, return_final_states=True)
    state = kw["initial_states"].clone()
    ys = [selective_state_update_ref(state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t],
                                     args["C"][:, t], D=kw["D"], z=kw["z"][:, t], dt_bias=kw["dt_bias"],
                                     dt_softplus=True) for t in range(l)]
    assert rel_err(torch.stack(ys, 1), out) < 1e-5
    assert rel_err(state, final) < 1e-5


# ---- forward kernel -----------------------------------------------------------------------------------
Q = 8
LENGTHS = [1, 2, 7, Q - 1, Q, Q + 1, 3 * Q + 5]


def check_fwd(b, l, h, p, g, n, chunk, dtype=torch.float32, state_tol=1e-4, **opts):
    args, kw = make_inputs(b, l, h, p, g, n, dtype=dtype, **opts)
    for softplus, limit in [(True, (0.0, math.inf))] + ([(False, (0.05, 0.7))] if dtype == torch.float32 else []):
        out, fs = h1r_ops.selective_scan(**args, chunk_size=chunk, **kw, dt_softplus=softplus, dt_limit=limit,
                                         return_final_states=True)
        a32, k32 = upcast(args, kw)
        ro, rs = selective_scan_ref(**a32, chunk_size=chunk, **k32, dt_softplus=softplus, dt_limit=limit,
                                    return_final_states=True)
        assert out.dtype == dtype and out.shape == args["x"].shape
        assert fs.dtype == torch.float32
        assert rel_err(out, ro) < TOL[dtype], (l, dtype, opts)
        assert rel_err(fs, rs) < state_tol, (l, dtype, opts)


@needs_cpu
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("g", [1, 2])
def test_fwd_lengths(l, g):
    check_fwd(2, l, 4, 5, g, 6, Q)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [{}, dict(D=None, z=False, dt_bias=False, init=False, seq=False),
                                  dict(D="h", z=False, init=False), dict(seq=False, z=False)])
def test_fwd_options(dtype, opts):
    check_fwd(2, 3 * Q + 5, 4, 19, 2, 12, Q, dtype=dtype, **opts)


@needs_cpu
@pytest.mark.parametrize("shape", [(1, 70, 2, 64, 1, 256, 32), (1, 45, 4, 33, 2, 40, 16), (2, 37, 3, 17, 3, 65, 64)])
def test_fwd_big(shape):
    b, l, h, p, g, n, chunk = shape
    check_fwd(b, l, h, p, g, n, chunk)


@needs_cpu
def test_fwd_bf16_big_state():
    check_fwd(1, 40, 2, 32, 1, 256, 16, dtype=torch.bfloat16)


# ---- bf16 forward on AMX tiles -------------------------------------------------------------------------
# bf16 inputs run the forward's chunk products on AMX tiles where the CPU has them (torch.ops.h1r.linear_amx():
# the same amx_usable()) and chunk % 32 == dstate % 32 == headdim % 16 == 0, with mamba_ssm's bf16 operands:
# the decay-masked CB (o dt'), the state read by C and (w o dt') B are each rounded once to bf16 (relative
# error <= 2^-9 ~ 2e-3 per operand), products exact and summed in fp32; the state itself stays fp32.
# Output: its own bf16 rounding (2^-9 of the value) still dominates, so TOL[bf16] (2e-2) holds as for the
# fp32 path. Final states (fp32): every chunk's contribution carries the rounding of its (w o dt') B operand,
# and the state passed on carries the rounded-state reads of the outputs only (not the recurrence): measured
# ~3e-3 of the max magnitude, against 1e-6 for the fp32 path; AMX_STATE_TOL = 1e-2 allows ~5 roundings.
AMX = HAS_CPU and bool(torch.ops.h1r.linear_amx())
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX tiles (CPU, ISA or H1R_CPU_NO_AMX)")
AMX_STATE_TOL = 1e-2
AMX_SHAPES = [(1, 300, 4, 64, 1, 128, 128),   # Falcon-H1's head / state / chunk, last chunk partial (44 steps)
              (2, 200, 4, 32, 2, 64, 64),     # two groups, last chunk of 8 steps
              (1, 96, 2, 16, 1, 32, 32),      # chunks filled exactly
              (2, 77, 6, 48, 3, 96, 32)]      # three groups, odd chunk tail (13 steps), 3 column tiles


@needs_cpu
@pytest.mark.parametrize("shape", AMX_SHAPES)
@pytest.mark.parametrize("opts", [{}, dict(D="h", z=False, init=False, seq=False), dict(D=None, dt_bias=False)])
def test_fwd_bf16_amx_shapes(shape, opts):
    """bf16 on the AMX path (where there is one; else the fp32 path) against the fp32 reference."""
    b, l, h, p, g, n, chunk = shape
    check_fwd(b, l, h, p, g, n, chunk, dtype=torch.bfloat16, state_tol=AMX_STATE_TOL, **opts)


@needs_cpu
def test_fwd_bf16_amx_rising_decay():
    """Raw dt with negative entries (no softplus, no clamp): the log-decay rises inside chunks, where the AMX
    path's decay matrix takes the direct exp instead of its factored form."""
    args, kw = make_inputs(1, 150, 2, 32, 1, 64, dtype=torch.bfloat16, seq=False)
    assert (args["dt"] < 0).any()
    out, fs = h1r_ops.selective_scan(**args, chunk_size=64, **kw, dt_softplus=False, return_final_states=True)
    a32, k32 = upcast(args, kw)
    ro, rs = selective_scan_ref(**a32, chunk_size=64, **k32, dt_softplus=False, return_final_states=True)
    assert rel_err(out, ro) < TOL[torch.bfloat16] and rel_err(fs, rs) < AMX_STATE_TOL


def _fwd_paths(shape=(2, 150, 4, 64, 2, 128, 64)):
    """The bf16 kernel's out / final states and the fp32 kernel's on the same (upcast) inputs, out rounded
    to bf16: what the fp32 path gives bf16 inputs, bit for bit (it widens the inputs exactly and rounds once)."""
    b, l, h, p, g, n, chunk = shape
    args, kw = make_inputs(b, l, h, p, g, n, dtype=torch.bfloat16)
    out, fs = h1r_ops.selective_scan(**args, chunk_size=chunk, **kw, dt_softplus=True, return_final_states=True)
    a32, k32 = upcast(args, kw)
    o32, s32 = h1r_ops.selective_scan(**a32, chunk_size=chunk, **k32, dt_softplus=True, return_final_states=True)
    ro, rs = selective_scan_ref(**a32, chunk_size=chunk, **k32, dt_softplus=True, return_final_states=True)
    return out, fs, o32.to(torch.bfloat16), s32, ro, rs


@needs_amx
def test_fwd_bf16_amx_taken_and_no_amx_is_the_fp32_path():
    """The AMX path runs (its results differ from the fp32 path's, both within tolerance of the reference),
    and under H1R_CPU_NO_AMX=1 bf16 gives exactly the fp32 path's bits (subprocess)."""
    out, fs, out_f32path, fs_f32path, ro, rs = _fwd_paths()
    assert not torch.equal(fs, fs_f32path), "final states equal the fp32 path's: the AMX path did not run"
    assert not torch.equal(out.view(torch.int16), out_f32path.view(torch.int16))
    assert rel_err(out, ro) < TOL[torch.bfloat16] and rel_err(out_f32path, ro) < TOL[torch.bfloat16]
    assert rel_err(fs, rs) < AMX_STATE_TOL and rel_err(fs_f32path, rs) < 1e-4
    code = (
        "import torch, tests.test_selective_scan as t\n"
        "assert not torch.ops.h1r.linear_amx()\n"
        "out, fs, o, s, ro, rs = t._fwd_paths()\n"
        "assert torch.equal(out.view(torch.int16), o.view(torch.int16))\n"
        "assert torch.equal(fs, s)\n"
        "print('ok')\n"
    )
    run_script(code, {"H1R_CPU_NO_AMX": "1"}, timeout=120)


# ---- backward kernel ----------------------------------------------------------------------------------
GTOL = {torch.float32: 1e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}


def check_bwd(b, l, h, p, g, n, chunk, dtype=torch.float32, softplus=True, limit=(0.0, math.inf),
              final_grad=True, **opts):
    """Gradients of every input (out and final states both used) against the reference's autograd."""
    args, kw = make_inputs(b, l, h, p, g, n, dtype=dtype, requires_grad=True, **opts)
    names = [k for k in list(args) + list(kw) if (args.get(k) if k in args else kw[k]).is_floating_point()]
    out, fs = h1r_ops.selective_scan(**args, chunk_size=chunk, **kw, dt_softplus=softplus, dt_limit=limit,
                                     return_final_states=True)
    gen = torch.Generator().manual_seed(5)
    go = torch.randn(out.shape, generator=gen).to(dtype)
    gs = torch.randn(fs.shape, generator=gen) if final_grad else torch.zeros(fs.shape)
    loss = (out.float() * go.float()).sum() + ((fs * gs).sum() if final_grad else 0)
    grads = torch.autograd.grad(loss, [args[k] if k in args else kw[k] for k in names])
    a32, k32 = upcast(args, kw)
    for v in list(a32.values()) + list(k32.values()):
        if v.is_floating_point():
            v.requires_grad_(True)
    ro, rs = selective_scan_ref(**a32, chunk_size=chunk, **k32, dt_softplus=softplus, dt_limit=limit,
                                return_final_states=True)
    ref = torch.autograd.grad((ro * go.float()).sum() + (rs * gs).sum(), [a32[k] if k in a32 else k32[k] for k in names])
    for name, g1, g2 in zip(names, grads, ref):
        src = args.get(name, kw.get(name))
        assert g1.dtype == src.dtype and g1.shape == src.shape, name
        assert rel_err(g1, g2) < GTOL[dtype], (name, rel_err(g1, g2), l, dtype, opts)


@needs_bwd
@pytest.mark.parametrize("l", [1, 7, Q, Q + 1, 3 * Q + 5])
@pytest.mark.parametrize("g", [1, 2])
def test_bwd_lengths(l, g):
    check_bwd(2, l, 4, 5, g, 6, Q)


@needs_bwd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{}, dict(D=None, z=False, dt_bias=False, init=False, seq=False),
                                  dict(D="h", z=False, init=False), dict(seq=False, final_grad=False)])
def test_bwd_options(dtype, opts):
    check_bwd(2, 3 * Q + 5, 4, 19, 2, 12, Q, dtype=dtype, **opts)


@needs_bwd
def test_bwd_no_softplus_clamped():
    check_bwd(1, 29, 2, 5, 1, 12, 8, softplus=False, limit=(0.05, 0.7))


@needs_bwd
def test_bwd_big():
    check_bwd(1, 70, 2, 64, 1, 256, 32)


@needs_bwd
def test_opcheck_bwd():
    args, kw = make_inputs(2, 11, 4, 3, 2, 5, requires_grad=True)
    a = (args["x"], args["dt"], args["A"], args["B"], args["C"], 4, kw["D"], kw["z"], kw["dt_bias"],
         kw["initial_states"], kw["seq_idx"], True, 0.0, float("inf"))
    torch.library.opcheck(torch.ops.h1r.selective_scan_fwd.default, a,
                          test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"))


# ---- decode step --------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("g,n", [(1, 16), (2, 37), (1, 256)])
def test_state_update(dtype, state_dtype, g, n, b=3, h=4, p=10):
    """16-bit states are widened / narrowed per vector (n = 37 leaves a tail); small calls run on one thread."""
    gen = torch.Generator().manual_seed(1)
    S = b + 2
    state = torch.randn(S, h, p, n, generator=gen).to(state_dtype)
    x = torch.randn(b, h, p, generator=gen).to(dtype)
    dt = torch.randn(b, h, generator=gen).to(dtype)
    A = -torch.rand(h, generator=gen) - 0.3
    B = torch.randn(b, g, n, generator=gen).to(dtype)
    C = torch.randn(b, g, n, generator=gen).to(dtype)
    D = torch.randn(h, p, generator=gen)
    z = torch.randn(b, h, p, generator=gen).to(dtype)
    bias = torch.randn(h, generator=gen)
    idx = torch.tensor([4, 0, 2] + list(range(5, S)), dtype=torch.int32)[:b]  # rows 1 and 3 never picked
    ref_state = state.float().clone()
    ro = selective_state_update_ref(ref_state, x.float(), dt.float(), A, B.float(), C.float(), D=D, z=z.float(),
                                    dt_bias=bias, dt_softplus=True, state_batch_indices=idx)
    st = state.clone()
    out = h1r_ops.selective_state_update(st, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                         state_batch_indices=idx)
    tol = max(TOL[dtype], TOL[state_dtype])
    assert rel_err(out, ro) < tol
    assert rel_err(st.float(), ref_state) < tol
    assert torch.equal(st[[1, 3]], state[[1, 3]])  # rows not picked are untouched


@needs_cpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_update_parallel(state_dtype):
    """A step with state large enough (b h p n >= 2^18) to open the OpenMP team."""
    test_state_update(torch.bfloat16, state_dtype, 1, 67, b=9, h=8, p=64)


@needs_cpu
def test_state_update_mamba_ssm_shapes():
    """mamba_ssm / transformers pass head-tied expansions: dt (b, h, p), A (h, p, n), D, dt_bias (h, p)."""
    b, h, p, g, n = 2, 4, 6, 2, 8
    gen = torch.Generator().manual_seed(2)
    state = torch.randn(b, h, p, n, generator=gen)
    x = torch.randn(b, h, p, generator=gen)
    dt = torch.randn(b, h, generator=gen)
    A = -torch.rand(h, generator=gen) - 0.3
    B, C = torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen)
    D, bias = torch.randn(h, generator=gen), torch.randn(h, generator=gen)
    s1, s2 = state.clone(), state.clone()
    o1 = h1r_ops.selective_state_update(s1, x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True)
    o2 = h1r_ops.selective_state_update(
        s2, x, dt[:, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
        D=D[:, None].expand(h, p), dt_bias=bias[:, None].expand(h, p), dt_softplus=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    with pytest.raises(ValueError, match="'dt'"):
        h1r_ops.selective_state_update(s1, x, torch.randn(b, h, p), A, B, C)
    with pytest.raises(ValueError, match="'A'"):
        h1r_ops.selective_state_update(s1, x, dt, torch.randn(h, p, n), B, C)


@needs_cpu
def test_state_update_fast_path_matches_checked_path():
    """The fast path (eager CPU calls go straight to the glue) and the validating path agree, over inputs
    the glue normalizes itself: mixed dtypes (fp32 dt / B / C with bf16 x), strided x, D (h,), int64 and
    strided indices with a padded row."""
    from h1r_ops.ops import selective_scan as api

    b, h, p, g, n = 3, 4, 10, 2, 16
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(6, h, p, n, generator=gen)
    x = torch.randn(b, h, 2 * p, generator=gen).to(torch.bfloat16)[..., ::2]  # strided over p
    dt = torch.randn(b, h, generator=gen)  # fp32: converted to x's dtype
    A = -torch.rand(h, generator=gen) - 0.3
    B, C = torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen).to(torch.bfloat16)
    D, bias = torch.randn(h, generator=gen), torch.randn(h, generator=gen)
    z = torch.randn(b, h, p, generator=gen).to(torch.bfloat16)
    idx = torch.tensor([5, 9, -1, 9, 0, 9], dtype=torch.int64)[::2]  # [5, -1, 0], stride 2
    for kw in (dict(D=D, z=z, dt_bias=bias, dt_softplus=True, state_batch_indices=idx),
               dict(D=D[:, None].expand(h, p).contiguous(), state_batch_indices=idx.to(torch.int32))):
        s_fast, s_checked = pool.clone(), pool.clone()
        fast = h1r_ops.selective_state_update(s_fast, x, dt, A, B, C, **kw)
        checked = api._selective_state_update_checked(s_checked, x, dt, A, B, C, kw["D"], kw.get("z"),
                                                      kw.get("dt_bias"), kw.get("dt_softplus", False),
                                                      kw["state_batch_indices"])
        assert torch.equal(fast, checked) and torch.equal(s_fast, s_checked)
        assert (fast[1] == 0).all() and torch.equal(s_fast[[1, 2, 3, 4]], pool[[1, 2, 3, 4]])


@needs_cpu
@pytest.mark.parametrize("b", [1, 5])
def test_state_update_row_views(b):
    """x, dt, B, C, z as row views of one projection buffer (the decode step's layout: any batch stride,
    the rest contiguous) are read in place and give the same bits as contiguous copies."""
    h, p, g, n = 4, 8, 2, 16
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(b, h * p + 2 * g * n + h + h * p + 3, generator=gen).to(torch.bfloat16)
    x, B, C, dt, z, _ = proj.split([h * p, g * n, g * n, h, h * p, 3], dim=-1)
    x, B, C, z = x.view(b, h, p), B.view(b, g, n), C.view(b, g, n), z.view(b, h, p)
    A = -torch.rand(h, generator=gen) - 0.3
    D, bias = torch.randn(h, p, generator=gen), torch.randn(h, generator=gen)
    idx = torch.arange(b, dtype=torch.int32).flip(0)
    pool = torch.randn(b + 1, h, p, n, generator=gen).to(torch.bfloat16)
    s_view, s_copy = pool.clone(), pool.clone()
    got = torch.ops.h1r.selective_state_update(s_view, x, dt, A, B, C, D, z, bias, True, idx)
    want = torch.ops.h1r.selective_state_update(s_copy, x.contiguous(), dt.contiguous(), A, B.contiguous(),
                                                C.contiguous(), D, z.contiguous(), bias, True, idx)
    assert got.is_contiguous() and torch.equal(got, want) and torch.equal(s_view, s_copy)


@needs_cpu
def test_state_update_fast_path_taken_and_bad_input_raises(monkeypatch):
    """A well-formed CPU call skips the Python checks; bad input still raises the API's ValueError."""
    from h1r_ops.ops import selective_scan as api

    b, h, p, g, n = 2, 4, 6, 1, 8
    state = torch.randn(b, h, p, n)
    x, dt, A = torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h)
    B, C = torch.randn(b, g, n), torch.randn(b, g, n)
    ssu = h1r_ops.selective_state_update
    real = api._selective_state_update_checked

    def checked(*args):
        raise AssertionError("validating path taken")

    monkeypatch.setattr(api, "_selective_state_update_checked", checked)
    ssu(state, x, dt, A, B, C, D=torch.randn(h), dt_bias=torch.randn(h), state_batch_indices=torch.tensor([1, 0]))
    monkeypatch.setattr(api, "_selective_state_update_checked", real)
    bad = [
        (lambda: ssu(state, x, torch.randn(b, h + 1), A, B, C), "dt"),
        (lambda: ssu(state, x, dt, A, torch.randn(b, g, n + 1), C), "B"),
        (lambda: ssu(state, x, dt, A, B, torch.randn(b, g, n + 1)), "C"),
        (lambda: ssu(state, x, dt, A, B, C, D=torch.randn(h + 1)), "D"),
        (lambda: ssu(state, x, dt, A, B, C, z=torch.randn(b, h, p + 1)), "z"),
        (lambda: ssu(state, x.double(), dt, A, B, C), "x"),
        (lambda: ssu(state.transpose(2, 3).contiguous().transpose(2, 3), x, dt, A, B, C), "state"),
        (lambda: ssu(state[:1], x, dt, A, B, C), "state"),
        (lambda: ssu(state, x, dt, A, B, C, state_batch_indices=torch.tensor([0.0, 1.0])), "state_batch_indices"),
        (lambda: ssu(state, x.tolist(), dt, A, B, C), "x"),
    ]
    for fn, name in bad:
        with pytest.raises(ValueError, match=f"^selective_state_update: argument '{name}'"):
            fn()
    with pytest.raises(ValueError, match="'state_batch_indices'"):  # the range is checked by the glue
        ssu(state, x, dt, A, B, C, state_batch_indices=torch.tensor([0, 2]))


@needs_cpu
def test_state_update_steps_reproduce_scan_kernel():
    b, l, h, p, g, n = 2, 11, 4, 8, 2, 16
    args, kw = make_inputs(b, l, h, p, g, n, seq=False)
    out, final = h1r_ops.selective_scan(**args, chunk_size=4, **kw, dt_softplus=True, return_final_states=True)
    state = kw["initial_states"].clone()
    ys = [h1r_ops.selective_state_update(state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t],
                                         args["C"][:, t], D=kw["D"], z=kw["z"][:, t], dt_bias=kw["dt_bias"],
                                         dt_softplus=True) for t in range(l)]
    assert rel_err(torch.stack(ys, 1), out) < 1e-5
    assert rel_err(state, final) < 1e-5


# ---- validation, opcheck, compile ---------------------------------------------------------------------
@needs_cpu
def test_bad_inputs():
    args, kw = make_inputs(2, 7, 4, 3, 2, 5)
    bad = dict(args, dt=torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="'dt'"):
        h1r_ops.selective_scan(**bad, chunk_size=4)
    with pytest.raises(ValueError, match="'B'"):
        h1r_ops.selective_scan(**dict(args, B=torch.randn(2, 7, 3, 5), C=torch.randn(2, 7, 3, 5)), chunk_size=4)
    with pytest.raises(ValueError, match="'initial_states'"):
        h1r_ops.selective_scan(**args, chunk_size=4, initial_states=torch.randn(2, 4, 3, 6))
    with pytest.raises(ValueError, match="'chunk_size'"):
        h1r_ops.selective_scan(**args, chunk_size=0)
    with pytest.raises(ValueError, match="'x'"):
        h1r_ops.selective_scan(**dict(args, x=args["x"].double()), chunk_size=4)
    with pytest.raises(ValueError, match="'seq_idx'"):
        h1r_ops.selective_scan(**args, chunk_size=4, seq_idx=torch.zeros(2, 7))


@needs_cpu
def test_opcheck():
    args, kw = make_inputs(2, 11, 4, 3, 2, 5)
    a = (args["x"], args["dt"], args["A"], args["B"], args["C"], 4, kw["D"], kw["z"], kw["dt_bias"],
         kw["initial_states"], kw["seq_idx"], True, 0.0, float("inf"))
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.h1r.selective_scan_fwd.default, a, test_utils=tests)
    state = torch.randn(3, 4, 3, 5)
    u = (state, args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0], kw["D"],
         kw["z"][:, 0], kw["dt_bias"], True, torch.tensor([2, 0], dtype=torch.int32))
    torch.library.opcheck(torch.ops.h1r.selective_state_update.default, u, test_utils=tests)


@needs_cpu
def test_compile_fullgraph():
    args, kw = make_inputs(1, 13, 2, 4, 1, 8)
    f = torch.compile(h1r_ops.selective_scan, fullgraph=True, backend="aot_eager")
    out = f(**args, chunk_size=4, **kw, dt_softplus=True)
    ref = h1r_ops.selective_scan(**args, chunk_size=4, **kw, dt_softplus=True)
    assert torch.allclose(out, ref)


@needs_cpu
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512-no-bf16"])
def test_lower_isa_subprocess(isa):
    """The avx2 and scalar builds of the kernels, and the avx512 one without its AVX512-BF16 rounding of bf16
    states, give the same results (small subset, in a subprocess)."""
    env = {"H1R_CPU_NO_AVX512_BF16": "1"} if isa == "avx512-no-bf16" else {"H1R_CPU_ISA": isa}
    if isa == "avx512-no-bf16" and torch.ops.h1r.cpu_isa() != "avx512":
        pytest.skip("no avx512 kernels on this CPU")
    expect = "avx512" if isa == "avx512-no-bf16" else isa
    code = (
        "import torch, tests.test_selective_scan as t\n"
        f"assert torch.ops.h1r.cpu_isa() == '{expect}', torch.ops.h1r.cpu_isa()\n"
        "t.check_fwd(2, 29, 4, 19, 2, 12, 8)\n"
        "t.check_fwd(1, 20, 2, 5, 1, 37, 8, dtype=torch.bfloat16)\n"
        "t.test_state_update(torch.bfloat16, torch.float32, 2, 37)\n"
        "t.test_state_update(torch.bfloat16, torch.bfloat16, 2, 37)\n"
        "t.test_state_update(torch.float32, torch.float16, 1, 16)\n"
        "t.test_state_update(torch.float32, torch.float32, 1, 16)\n"
        "if t.HAS_BWD:\n    t.check_bwd(2, 21, 4, 7, 2, 12, 8, torch.float32)\n"
        "print('ok')\n"
    )
    run_script(code, env, timeout=120)


def _bf16_state_step(b=40, h=8, p=16, n=37):
    """One decode step on a bf16 state large enough for the OpenMP path, n = 37 leaving a vector tail."""
    gen = torch.Generator().manual_seed(5)
    state = (torch.randn(b, h, p, n, generator=gen) * 3).to(torch.bfloat16)
    x, z = torch.randn(b, h, p, generator=gen).bfloat16(), torch.randn(b, h, p, generator=gen).bfloat16()
    dt, A = torch.randn(b, h, generator=gen).bfloat16(), -torch.rand(h, generator=gen) - 0.3
    B, C = torch.randn(b, 2, n, generator=gen).bfloat16(), torch.randn(b, 2, n, generator=gen).bfloat16()
    y = h1r_ops.selective_state_update(state, x, dt, A, B, C, D=torch.randn(h, generator=gen), z=z,
                                       dt_bias=torch.randn(h, generator=gen), dt_softplus=True)
    return state, y


@needs_cpu
def test_bf16_state_hardware_rounding_is_bit_exact(tmp_path):
    """AVX512-BF16's vcvtneps2bf16 (used for bf16 states where the CPU has it) rounds exactly as the software
    path (H1R_CPU_NO_AVX512_BF16=1): same state and output bits."""
    if torch.ops.h1r.cpu_isa() != "avx512":
        pytest.skip("no avx512 kernels on this CPU")
    state, y = _bf16_state_step()
    torch.save((state, y), tmp_path / "ours.pt")
    code = (
        "import torch, tests.test_selective_scan as t\n"
        f"state, y = torch.load({str(tmp_path / 'ours.pt')!r})\n"
        "s2, y2 = t._bf16_state_step()\n"
        "assert torch.equal(state.view(torch.int16), s2.view(torch.int16))\n"
        "assert torch.equal(y.view(torch.int16), y2.view(torch.int16))\n"
        "print('ok')\n"
    )
    run_script(code, {"H1R_CPU_NO_AVX512_BF16": "1"}, timeout=120)


# ---- parity with transformers' Falcon-H1 torch path ---------------------------------------------------
def _hf():
    try:
        from transformers.models.falcon_h1 import modeling_falcon_h1 as hf
    except Exception:  # pragma: no cover
        return None
    return hf


@pytest.mark.skipif(_hf() is None, reason="transformers with Falcon-H1 not installed")
@pytest.mark.parametrize("l", [1, 13, 32])
def test_matches_transformers_falcon_h1(l):
    """transformers' mamba2_chunk_scan / mamba2_selective_state_update (what FalconH1Mixer.torch_forward
    runs without mamba_ssm) agree with the reference and the kernels (no seq_idx, D (h,), no z)."""
    hf = _hf()
    b, h, p, g, n, chunk = 2, 4, 6, 2, 8, 8
    args, kw = make_inputs(b, l, h, p, g, n, D="h", z=False, seq=False)
    kw.pop("z", None)
    common = dict(chunk_size=chunk, D=kw["D"], dt_bias=kw["dt_bias"], initial_states=kw["initial_states"],
                  dt_softplus=True, return_final_states=True)
    ho, hs = hf.mamba2_chunk_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], **common)
    ro, rs = selective_scan_ref(**args, **common)
    assert rel_err(ro, ho) < 1e-5 and rel_err(rs, hs) < 1e-5
    if HAS_CPU:
        ko, ks = h1r_ops.selective_scan(**args, **common)
        assert rel_err(ko, ho) < 1e-4 and rel_err(ks, hs) < 1e-4
        state, hstate = kw["initial_states"].clone(), kw["initial_states"].clone()
        x0, dt0, B0, C0 = args["x"][:, 0], args["dt"][:, 0], args["B"][:, 0], args["C"][:, 0]
        ko = h1r_ops.selective_state_update(state, x0, dt0, args["A"], B0, C0, D=kw["D"], dt_bias=kw["dt_bias"],
                                            dt_softplus=True)
        ho = hf.mamba2_selective_state_update(
            hstate, x0, dt0[:, :, None].expand(b, h, p), args["A"][:, None, None].expand(h, p, n), B0, C0,
            D=kw["D"][:, None].expand(h, p), dt_bias=kw["dt_bias"][:, None].expand(h, p), dt_softplus=True)
        assert rel_err(ko, ho) < 1e-5 and rel_err(state, hstate) < 1e-5
