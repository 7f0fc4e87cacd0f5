"""Triton kernels of the lm head fused with cross entropy / log-probs / entropy (CUDA tensors).

The chunk loop is the same as the CPU glue's (csrc/cpu/cross_entropy.cpp): per chunk of tokens the
lm head runs as a cuBLAS matmul into a reused (n, V) buffer, then one Triton program per token (row)
sweeps the row in blocks of BLOCK_V:

  statistics  online softmax: m (running max), s = sum exp(u - m), and when needed
              t = sum exp(u - m) (u - m) (entropy) and sum u (label smoothing); u = x * scale
  gradient    x_j <- scale * (p_j (alpha + beta u_j) + kappa + gamma [j == y]), p_j = exp(u_j - lse),
              in place over the logits, ready for the dhidden / dweight matmuls

The coefficients (alpha, beta, kappa, gamma) of each loss are those of the CPU kernel
(csrc/cpu/cross_entropy_kernels.cpp). The launchers take any tensors (tests run them on CPU tensors
under TRITON_INTERPRET=1); :func:`register_cuda_kernels` registers the ops for the CUDA dispatch key.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _row_stats(x_ptr, V, scale, BLOCK_V: tl.constexpr, WANT_SUM_U: tl.constexpr, WANT_ENTROPY: tl.constexpr):
    """One online sweep: returns (lse, sum_j u_j, sum_j p_j u_j - lse = -entropy)."""
    m = -1e30  # finite: keeps (m_old - m_new) * s at 0, not nan, on the first block
    s = 0.0
    t = 0.0
    su = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
        u = tl.where(mask, u, float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(u - m_new)
        if WANT_ENTROPY:
            # t is relative to the running max: rebase it to m_new, then add the block.
            t = rescale * (t + (m - m_new) * s) + tl.sum(e * tl.where(mask, u - m_new, 0.0), axis=0)
        if WANT_SUM_U:
            su += tl.sum(tl.where(mask, u, 0.0), axis=0)
        s = rescale * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    return m + log_s, su, t / s - log_s


@triton.jit
def _write_grad(x_ptr, V, scale, lse, alpha, beta, kappa, gamma, y, BLOCK_V: tl.constexpr):
    """x_j <- scale (p_j (alpha + beta u_j) + kappa + gamma [j == y]) over the row, in place."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
        p = tl.exp(u - lse)
        g = scale * (p * (alpha + beta * u) + kappa + tl.where(offs == y, gamma, 0.0))
        tl.store(x_ptr + offs, g.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_zero(x_ptr, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(x_ptr + offs, tl.zeros([BLOCK_V], dtype=x_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _this_row(x_ptr, stride, target_ptr):
    """The program's row (one per token): its index, the pointer to its logits and its target."""
    row = tl.program_id(0).to(tl.int64)
    return row, x_ptr + row * stride, tl.load(target_ptr + row)


@triton.jit
def _ignored(y, ignore_index, V):
    """A row without loss or gradient: its target is ignore_index or out of [0, V)."""
    return (y == ignore_index) | (y < 0) | (y >= V)


@triton.jit
def _ce_write_grad(x_ptr, V, scale, lse, g, eps, z_loss_scale, y, BLOCK_V: tl.constexpr):
    """The cross-entropy gradient of a row of loss weight g, written over its logits:
    dloss/du_j = p_j (1 + 2 zl lse) - (1 - eps) [j == y] - eps / V."""
    _write_grad(x_ptr, V, scale, lse, g * (1.0 + 2.0 * z_loss_scale * lse), 0.0, -g * eps / V, -g * (1.0 - eps), y,
                BLOCK_V)


@triton.jit
def _ce_fwd_kernel(x_ptr, stride, target_ptr, loss_ptr, zloss_ptr, lse_ptr, V, ignore_index, scale, eps,
                   z_loss_scale, grad_scale, WRITE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """Cross entropy of one row; with WRITE_GRAD its gradient (weighted by grad_scale) over the row:
    dloss/du_j = p_j (1 + 2 zl lse) - (1 - eps) [j == y] - eps / V."""
    row, x_ptr, y = _this_row(x_ptr, stride, target_ptr)
    if _ignored(y, ignore_index, V):
        tl.store(loss_ptr + row, 0.0)
        tl.store(zloss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _write_zero(x_ptr, V, BLOCK_V)
    else:
        lse, su, _ = _row_stats(x_ptr, V, scale, BLOCK_V, HAS_SMOOTHING, False)
        u_y = tl.load(x_ptr + y).to(tl.float32) * scale
        zl = z_loss_scale * lse * lse
        loss = (1.0 - eps) * (lse - u_y) + zl
        if HAS_SMOOTHING:
            loss += eps * (lse - su / V)
        tl.store(loss_ptr + row, loss)
        tl.store(zloss_ptr + row, zl)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            _ce_write_grad(x_ptr, V, scale, lse, grad_scale, eps, z_loss_scale, y, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(x_ptr, stride, target_ptr, lse_ptr, grad_ptr, V, ignore_index, scale, eps, z_loss_scale,
                   BLOCK_V: tl.constexpr):
    """The cross-entropy gradient of one row for the saved lse and an upstream gradient g_row."""
    row, x_ptr, y = _this_row(x_ptr, stride, target_ptr)
    g = tl.load(grad_ptr + row)
    if _ignored(y, ignore_index, V) | (g == 0.0):
        _write_zero(x_ptr, V, BLOCK_V)
    else:
        lse = tl.load(lse_ptr + row)
        _ce_write_grad(x_ptr, V, scale, lse, g, eps, z_loss_scale, y, BLOCK_V)


@triton.jit
def _logprobs_fwd_kernel(x_ptr, stride, target_ptr, logprobs_ptr, entropy_ptr, lse_ptr, V, ignore_index, scale,
                         BLOCK_V: tl.constexpr):
    row, x_ptr, y = _this_row(x_ptr, stride, target_ptr)
    if _ignored(y, ignore_index, V):
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        lse, _, mean_pu = _row_stats(x_ptr, V, scale, BLOCK_V, False, True)
        tl.store(logprobs_ptr + row, tl.load(x_ptr + y).to(tl.float32) * scale - lse)
        tl.store(entropy_ptr + row, -mean_pu)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(x_ptr, stride, target_ptr, lse_ptr, dlp_ptr, dent_ptr, V, ignore_index, scale,
                         HAS_DLP: tl.constexpr, HAS_DENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """dL/du_j = a ([j == y] - p_j) - b p_j (log p_j + H) = p_j (-a - b (H - lse) - b u_j) + a [j == y]."""
    row, x_ptr, y = _this_row(x_ptr, stride, target_ptr)
    a = 0.0
    b = 0.0
    if HAS_DLP:
        a = tl.load(dlp_ptr + row)
    if HAS_DENT:
        b = tl.load(dent_ptr + row)
    if _ignored(y, ignore_index, V) | ((a == 0.0) & (b == 0.0)):
        _write_zero(x_ptr, V, BLOCK_V)
    else:
        lse = tl.load(lse_ptr + row)
        H = 0.0
        if HAS_DENT:  # the entropy is recomputed (one more sweep) only when its gradient is needed
            _, _, mean_pu = _row_stats(x_ptr, V, scale, BLOCK_V, False, True)
            H = -mean_pu
        _write_grad(x_ptr, V, scale, lse, -a - b * (H - lse), -b, 0.0, a, y, BLOCK_V)


# ---------------------------------------------------------------------------------------- launchers
def _block_v(V: int, block_v: int | None) -> int:
    return block_v or min(8192, triton.next_power_of_2(V))


def _launch_args(x: torch.Tensor, block_v: int | None):
    bv = _block_v(x.shape[1], block_v)
    return dict(BLOCK_V=bv, num_warps=4 if bv <= 1024 else (8 if bv <= 4096 else 16))


def ce_rows_fwd(x, target, loss, z_loss, lse, *, ignore_index, scale, label_smoothing, z_loss_scale,
                write_grad, grad_scale=1.0, block_v=None):
    """Per-row cross entropy of the chunk's logits x (n, V) (unit last stride); the (n,) fp32 outputs
    loss, z_loss, lse are written; with write_grad, x is overwritten with grad_scale * dloss/dx."""
    n, V = x.shape
    if n:
        _ce_fwd_kernel[(n,)](x, x.stride(0), target, loss, z_loss, lse, V, ignore_index, float(scale),
                             float(label_smoothing), float(z_loss_scale), float(grad_scale),
                             WRITE_GRAD=bool(write_grad), HAS_SMOOTHING=label_smoothing != 0,
                             **_launch_args(x, block_v))


def ce_rows_bwd(x, target, lse, grad_rows, *, ignore_index, scale, label_smoothing, z_loss_scale, block_v=None):
    """Overwrites x (n, V) with grad_rows[t] * dloss_t/dx, from the saved lse (n,)."""
    n, V = x.shape
    if n:
        _ce_bwd_kernel[(n,)](x, x.stride(0), target, lse, grad_rows, V, ignore_index, float(scale),
                             float(label_smoothing), float(z_loss_scale), **_launch_args(x, block_v))


def logprobs_rows_fwd(x, target, logprobs, entropy, lse, *, ignore_index, scale, block_v=None):
    n, V = x.shape
    if n:
        _logprobs_fwd_kernel[(n,)](x, x.stride(0), target, logprobs, entropy, lse, V, ignore_index, float(scale),
                                   **_launch_args(x, block_v))


def logprobs_rows_bwd(x, target, lse, dlogprobs, dentropy, *, ignore_index, scale, block_v=None):
    """Overwrites x (n, V) with dL/dx for upstream gradients dlogprobs, dentropy (n,) (either None)."""
    n, V = x.shape
    if n:
        _logprobs_bwd_kernel[(n,)](x, x.stride(0), target, lse, dlogprobs if dlogprobs is not None else lse,
                                   dentropy if dentropy is not None else lse, V, ignore_index, float(scale),
                                   HAS_DLP=dlogprobs is not None, HAS_DENT=dentropy is not None,
                                   **_launch_args(x, block_v))


# ------------------------------------------------------------------------- the ops: chunk loop + rows
def _chunk_rows(T: int, V: int, d: int) -> int:
    """Liger's chunk: next_pow2(ceil(T / ceil(V / d))) tokens, so the chunk's logits ~ hidden in size."""
    env = int(os.environ.get("H1R_CE_CHUNK", "0") or 0)
    if env > 0:
        return max(min(env, T), 1)
    inc = -(-V // max(d, 1))
    return max(min(triton.next_power_of_2(-(-T // inc)), T), 1)


def _check_targets(target: torch.Tensor, V: int, ignore_index: int) -> int:
    """Validates the targets; returns the number of non-ignored tokens (one device sync)."""
    valid = target != ignore_index
    bad = (valid & ((target < 0) | (target >= V))).sum()
    n_valid, n_bad = torch.stack([valid.sum(), bad]).tolist()
    if n_bad:
        raise ValueError(f"argument 'target': expected class indices in [0, {V}) or ignore_index ({ignore_index})")
    return n_valid


def _for_each_chunk(hidden, weight, bias, target, grads, rows):
    """x = hidden[chunk] @ weight^T (+ bias) into a reused buffer, rows(x, sl), then (when grads) the
    gradient matmuls from the dL/dx that rows left in x."""
    T, d = hidden.shape
    V = weight.shape[0]
    if T == 0:
        return
    n_max = _chunk_rows(T, V, d)
    buffer = hidden.new_empty((n_max, V))
    for start in range(0, T, n_max):
        sl = slice(start, min(start + n_max, T))
        h, x = hidden[sl], buffer[: sl.stop - start]
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=x)
        else:
            torch.mm(h, weight.t(), out=x)
        rows(x, sl)
        if grads is not None:
            gh, gw, gb = grads
            torch.mm(x, weight, out=gh[sl])
            gw.addmm_(x.t(), h)
            if gb is not None:
                gb += x.sum(0, dtype=torch.float32)


def _new_grads(hidden, weight, bias):
    gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if bias is not None else None
    return torch.empty_like(hidden), torch.zeros_like(weight), gb


def _finish_grads(grads, hidden, bias):
    gh, gw, gb = grads
    return gh, gw, gb.to(bias.dtype) if bias is not None else hidden.new_empty((0,))


def fused_linear_cross_entropy_fwd(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss_scale,
                                   logit_scale, reduction, compute_grad, block_v=None):
    T, V = hidden.shape[0], weight.shape[0]
    n_valid = _check_targets(target, V, ignore_index)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss, zl, lse = (torch.empty(T, **f32) for _ in range(3))
    w_row = 1.0 / max(n_valid, 1) if reduction == 1 else 1.0
    grads = _new_grads(hidden, weight, bias) if compute_grad else None

    def rows(x, sl):
        ce_rows_fwd(x, target[sl], loss[sl], zl[sl], lse[sl], ignore_index=ignore_index, scale=logit_scale,
                    label_smoothing=label_smoothing, z_loss_scale=z_loss_scale, write_grad=compute_grad,
                    grad_scale=w_row, block_v=block_v)

    _for_each_chunk(hidden, weight, bias, target, grads, rows)
    if reduction != 0:
        loss, zl = loss.sum() * w_row, zl.sum() * w_row
    none = hidden.new_empty((0,))
    gh, gw, gb = _finish_grads(grads, hidden, bias) if grads else (none, none.clone(), none.clone())
    return loss, zl, lse, gh, gw, gb


def fused_linear_cross_entropy_bwd(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing,
                                   z_loss_scale, logit_scale, block_v=None):
    grads = _new_grads(hidden, weight, bias)

    def rows(x, sl):
        ce_rows_bwd(x, target[sl], lse[sl], grad_loss[sl], ignore_index=ignore_index, scale=logit_scale,
                    label_smoothing=label_smoothing, z_loss_scale=z_loss_scale, block_v=block_v)

    _for_each_chunk(hidden, weight, bias, target, grads, rows)
    return _finish_grads(grads, hidden, bias)


def fused_linear_logprobs_fwd(hidden, weight, target, bias, temperature, logit_scale, ignore_index, block_v=None):
    T, V = hidden.shape[0], weight.shape[0]
    _check_targets(target, V, ignore_index)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lp, ent, lse = (torch.empty(T, **f32) for _ in range(3))

    def rows(x, sl):
        logprobs_rows_fwd(x, target[sl], lp[sl], ent[sl], lse[sl], ignore_index=ignore_index,
                          scale=logit_scale / temperature, block_v=block_v)

    _for_each_chunk(hidden, weight, bias, target, None, rows)
    return lp, ent, lse


def fused_linear_logprobs_bwd(dlogprobs, dentropy, hidden, weight, target, bias, temperature, logit_scale,
                              ignore_index, lse, block_v=None):
    grads = _new_grads(hidden, weight, bias)

    def rows(x, sl):
        logprobs_rows_bwd(x, target[sl], lse[sl], None if dlogprobs is None else dlogprobs[sl],
                          None if dentropy is None else dentropy[sl], ignore_index=ignore_index,
                          scale=logit_scale / temperature, block_v=block_v)

    _for_each_chunk(hidden, weight, bias, target, grads, rows)
    return _finish_grads(grads, hidden, bias)


_OPS = {
    "fused_linear_cross_entropy_fwd": fused_linear_cross_entropy_fwd,
    "fused_linear_cross_entropy_bwd": fused_linear_cross_entropy_bwd,
    "fused_linear_logprobs_fwd": fused_linear_logprobs_fwd,
    "fused_linear_logprobs_bwd": fused_linear_logprobs_bwd,
}


def register_cuda_kernels() -> None:
    """Register the ops above as the CUDA kernels of torch.ops.h1r.* (unless C++ CUDA kernels exist)."""
    for name, fn in _OPS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"h1r::{name}", "CUDA"):
            torch.library.register_kernel(f"h1r::{name}", "cuda", fn)
