"""Triton kernels for RMSNorm (+ fused residual add) and Mamba2's gated RMSNorm, forward and backward.

Registered for the CUDA dispatch key of ``torch.ops.h1r.{rms_norm,gated_rms_norm}_{fwd,bwd}`` by
h1r_ops/ops/rms_norm.py; the launchers below take torch tensors and also run on CPU tensors under
``TRITON_INTERPRET=1`` (that is how the tests exercise them without a GPU).

Layout (as Liger's and mamba_ssm's norms): one program normalizes one row (or one group of a row) held
entirely in registers, BLOCK = next_pow2(row width), fp32 statistics. The backward gives each program a
contiguous block of rows and accumulates its partial dweight in registers, written to a (programs, d)
buffer that is summed afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 65536  # widest row (or group) held in registers


def _settings(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `width` elements."""
    block = triton.next_power_of_2(width)
    if block > MAX_BLOCK:
        raise ValueError(f"rms_norm (Triton): rows of {width} elements exceed the {MAX_BLOCK} supported")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _num_programs(device: torch.device, rows: int) -> int:
    """Programs of the backward: a few per SM on a GPU, a handful in the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 2 * sms))
    return max(1, min(rows, 4))


@triton.jit
def _rms_norm_fwd_kernel(X, RES, W, OUT, RES_OUT, RSTD, d, eps, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    h = tl.load(X + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # h = x + residual, rounded to the input dtype: it is also the new residual stream.
        r = tl.load(RES + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        h_t = (h + r).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * d + cols, h_t, mask=mask)
        h = h_t.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / d + eps)
    tl.store(RSTD + row, rstd)
    # FalconH1RMSNorm: normalize in fp32, cast to the input dtype, then scale by the weight.
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xn = (h * rstd).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * d + cols, (w * xn).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DOUT, DRES, H, W, RSTD, DH, DW_PARTIAL, rows, d, rows_per_program,
                         BLOCK: tl.constexpr, HAS_DRES: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 offsets: rows * d may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        offs = row * d + cols
        dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xn = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) * rstd
        # dh = rstd * (g - xn * mean(g * xn)), g = dout * w the gradient w.r.t. xn.
        g = dy * w
        dh = rstd * (g - xn * (tl.sum(g * xn, axis=0) / d))
        if HAS_DRES:
            dh += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)
        dw += dy * xn.to(H.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * d + cols, dw, mask=mask)


@triton.jit
def _gated_rms_norm_fwd_kernel(X, Z, W, OUT, RSTD, d, group_size, eps, BLOCK: tl.constexpr,
                               HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    ngroups = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < group_size
    offs = row * d + grp * group_size + cols
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        silu_z = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            u = u * silu_z  # normalize x * silu(z)
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=0) / group_size + eps)
    tl.store(RSTD + row * ngroups + grp, rstd)
    w = tl.load(W + grp * group_size + cols, mask=mask, other=0.0).to(tl.float32)
    y = u * rstd * w
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * silu_z
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rms_norm_bwd_kernel(DOUT, X, Z, W, RSTD, DX, DZ, DW_PARTIAL, rows, d, group_size, rows_per_program,
                               BLOCK: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    ngroups = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < group_size
    w = tl.load(W + grp * group_size + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 offsets: rows * d may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        offs = row * d + grp * group_size + cols
        dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row * ngroups + grp)
        # xh: the normalized quantity (x or x * silu(z), times rstd); dy becomes the gradient reaching w * xh.
        if HAS_Z:
            z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            dsilu = sig * (1.0 + z * (1.0 - sig))
            if NORM_BEFORE_GATE:
                xh = x * rstd
                tl.store(DZ + offs, (dy * xh * w * dsilu).to(DZ.dtype.element_ty), mask=mask)
                dy = dy * z * sig
            else:
                xh = x * z * sig * rstd
        else:
            xh = x * rstd
        dw += dy * xh
        g = dy * w
        du = rstd * (g - xh * (tl.sum(g * xh, axis=0) / group_size))
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                tl.store(DZ + offs, (du * x * dsilu).to(DZ.dtype.element_ty), mask=mask)
                du = du * z * sig
        tl.store(DX + offs, du.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * d + grp * group_size + cols, dw, mask=mask)


def _check(cond: bool, name: str, msg: str):
    if not cond:
        raise ValueError(f"argument '{name}': {msg}")


def _check_rows(x: torch.Tensor, name: str) -> int:
    _check(x.dim() >= 1 and x.shape[-1] >= 1 and x.is_contiguous(), name,
           f"expected a contiguous (..., d) tensor with d >= 1, got shape {tuple(x.shape)}")
    return x.shape[-1]


def rms_norm_fwd(x, weight, eps, residual):
    """torch.ops.h1r.rms_norm_fwd: returns (out, residual_out, rstd)."""
    d = _check_rows(x, "x")
    rows = x.numel() // d
    _check(weight.shape == (d,) and weight.is_contiguous(), "weight", f"expected shape ({d},)")
    if residual is not None:
        _check(residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous(), "residual",
               "expected a contiguous tensor like x")
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        block, num_warps = _settings(d)
        _rms_norm_fwd_kernel[(rows,)](x, residual, weight, out, residual_out, rstd, d, eps, BLOCK=block,
                                      HAS_RESIDUAL=residual is not None, num_warps=num_warps)
    return out, residual_out, rstd


def rms_norm_bwd(dout, dresidual_out, h, weight, rstd):
    """torch.ops.h1r.rms_norm_bwd: returns (dh, dweight fp32)."""
    d = _check_rows(h, "h")
    rows = h.numel() // d
    _check(dout.shape == h.shape and dout.dtype == h.dtype and dout.is_contiguous(), "dout", "expected like h")
    if dresidual_out is not None:
        _check(dresidual_out.shape == h.shape and dresidual_out.dtype == h.dtype and dresidual_out.is_contiguous(),
               "dresidual_out", "expected like h")
    _check(weight.shape == (d,), "weight", f"expected shape ({d},)")
    _check(rstd.numel() == rows and rstd.dtype == torch.float32, "rstd", f"expected {rows} fp32 values")
    dh = torch.empty_like(h)
    if rows == 0:
        return dh, torch.zeros((d,), dtype=torch.float32, device=h.device)
    block, num_warps = _settings(d)
    programs = _num_programs(h.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    partial = torch.empty((programs, d), dtype=torch.float32, device=h.device)
    _rms_norm_bwd_kernel[(programs,)](dout, dresidual_out, h, weight, rstd, dh, partial, rows, d, rows_per_program,
                                      BLOCK=block, HAS_DRES=dresidual_out is not None, num_warps=num_warps)
    return dh, partial.sum(0)


def _check_gated(x, z, weight, group_size):
    d = _check_rows(x, "x")
    _check(group_size >= 1 and d % group_size == 0, "group_size", f"expected a positive divisor of d = {d}")
    if z is not None:
        _check(z.shape == x.shape and z.dtype == x.dtype and z.is_contiguous(), "z", "expected a contiguous tensor like x")
    _check(weight.shape == (d,) and weight.is_contiguous(), "weight", f"expected shape ({d},)")
    return d, x.numel() // d, d // group_size


def gated_rms_norm_fwd(x, z, weight, eps, group_size, norm_before_gate):
    """torch.ops.h1r.gated_rms_norm_fwd: returns (out, rstd (rows, ngroups))."""
    d, rows, ngroups = _check_gated(x, z, weight, group_size)
    out = torch.empty_like(x)
    rstd = torch.empty((rows, ngroups), dtype=torch.float32, device=x.device)
    if rows:
        block, num_warps = _settings(group_size)
        _gated_rms_norm_fwd_kernel[(rows, ngroups)](x, z, weight, out, rstd, d, group_size, eps, BLOCK=block,
                                                    HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate),
                                                    num_warps=num_warps)
    return out, rstd


def gated_rms_norm_bwd(dout, x, z, weight, rstd, eps, group_size, norm_before_gate):
    """torch.ops.h1r.gated_rms_norm_bwd: returns (dx, dz (empty without z), dweight fp32)."""
    d, rows, ngroups = _check_gated(x, z, weight, group_size)
    _check(dout.shape == x.shape and dout.dtype == x.dtype and dout.is_contiguous(), "dout", "expected like x")
    _check(rstd.numel() == rows * ngroups and rstd.dtype == torch.float32, "rstd",
           f"expected {rows * ngroups} fp32 values")
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if z is not None else x.new_empty((0,))
    if rows == 0:
        return dx, dz, torch.zeros((d,), dtype=torch.float32, device=x.device)
    block, num_warps = _settings(group_size)
    programs = _num_programs(x.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _gated_rms_norm_bwd_kernel[(programs, ngroups)](dout, x, z, weight, rstd, dx, dz, partial, rows, d, group_size,
                                                    rows_per_program, BLOCK=block, HAS_Z=z is not None,
                                                    NORM_BEFORE_GATE=bool(norm_before_gate), num_warps=num_warps)
    return dx, dz, partial.sum(0)
