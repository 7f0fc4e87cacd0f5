"""The CUDA kernels (csrc/cuda/*.cu), run through the CPU emulator against plain-torch math.

tests/cuda_emu.py compiles the kernel files and their glue with g++ in emulator mode (csrc/cuda/
portability.h): every block and thread of every launch runs, with real barriers and warp shuffles, on
CPU tensors. Each kernel is compared with the math written here in a few lines of fp32 torch (the
family references in h1r_ops.reference are being written alongside; the lead points these tests at
them once merged). Shapes are small but cover partial tiles, odd sizes, groups, padding rows and
several partitions. Tolerances: fp32 1e-5 (relative + absolute); bf16 / fp16 one output rounding
(2^-7 resp. 2^-10 relative, a little absolute slack) since the kernels accumulate in fp32 and the math
here is fp32 on the same rounded inputs.

The emulator runs the threads of a block in a chosen order between barriers: a subset of every test
runs in reverse and random order too, and test_missing_barrier_is_caught shows that a kernel variant
without its barrier fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_emu import load

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

def ssu_math(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx):
    """One Mamba2 step in fp32; returns (new state rows, out)."""
    b, h, p = x.shape
    g = B.shape[1]
    s = state[idx.long()].float()
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    s = torch.exp(dt * A)[..., None, None] * s + (dt[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    y = (s * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return s, y


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
        want_state = state.clone()
        valid = idx >= 0
        s_new, want = ssu_math(state, x, dt, A, B, C, D, z, dt_bias, softplus, idx.clamp(min=0))
        want_state[idx[valid].long()] = s_new[valid].to(state_dtype)
        want[~valid] = 0
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
    s_new, want = ssu_math(state, x, dt, A, B, C, None, z, None, True, torch.arange(b))
    out = emu.selective_state_update(state, x, dt, A, B, C, None, z, None, True, None)
    close(out, want, torch.float32)
    close(state, s_new, torch.float32)


def test_selective_state_update_bad_input(emu):
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="'dt'"):
        emu.selective_state_update(torch.randn(2, 4, 8, 16), x, torch.randn(2, 3), torch.randn(4),
                                   torch.randn(2, 1, 16), torch.randn(2, 1, 16), None, None, None, False, None)
