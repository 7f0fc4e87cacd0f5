"""Mamba2 selective scan (chunked SSD) and its decode step, as drop-in torch ops.

``selective_scan`` has the arguments of mamba_ssm's ``mamba_chunk_scan_combined``;
``selective_state_update`` those of mamba_ssm's ``selective_state_update``. Both validate their arguments
(ValueError naming the argument), normalize them to the op contract of csrc/registration.cpp (A, D,
dt_bias and initial states in fp32, dt / B / C / z in x's dtype, seq_idx int32, contiguous) and call
``torch.ops.h1r.*``, which works under autograd (the backward is the ``selective_scan_bwd`` op) and
torch.compile (fake implementations below).
"""

from __future__ import annotations

import math

import torch

from .. import _registry
from .._checks import INDEX_DTYPES, Shapes

__all__ = ["selective_scan", "selective_state_update"]


def _limits(dt_limit):
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return lo, hi


def selective_scan(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
    dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
):
    """Mamba2 chunked selective scan (SSD), ``mamba_chunk_scan_combined`` semantics.

    Args:
        x: (b, l, h, p) fp32 / bf16 / fp16.
        dt: (b, l, h). A: (h,) (negative). B, C: (b, l, g, n), g divides h.
        chunk_size: tokens per chunk of the SSD algorithm (128 or 256 typically).
        D: (h, p) or (h,) skip connection. z: (b, l, h, p) gate, out = y * silu(z).
        dt_bias: (h,). initial_states: (b, h, p, n). seq_idx: (b, l) int, non-decreasing: the state resets
            where it changes (packed documents); the initial state belongs to the first document.
        dt_softplus: apply softplus to dt + dt_bias. dt_limit: (min, max) clamp of the processed dt.
        return_final_states: also return the state after the last token.

    Returns:
        out (b, l, h, p) in x's dtype, and final_states (b, h, p, n) fp32 when ``return_final_states``.
    """
    s = Shapes("selective_scan")
    s.check("x", x, ("b", "l", "h", "p"))
    s.check("dt", dt, ("b", "l", "h"))
    s.check("A", A, ("h",))
    s.check("B", B, ("b", "l", "g", "n"))
    s.check("C", C, ("b", "l", "g", "n"))
    s.require(s["h"] % s["g"] == 0, "B", f"the number of groups g = {s['g']} must divide nheads h = {s['h']}")
    s.require(isinstance(chunk_size, int) and chunk_size > 0, "chunk_size",
              f"expected a positive int, got {chunk_size!r}")
    if D is not None:
        s.check("D", D, ("h", "p") if D.dim() == 2 else ("h",))
    s.check("z", z, ("b", "l", "h", "p"), optional=True)
    s.check("dt_bias", dt_bias, ("h",), optional=True)
    s.check("initial_states", initial_states, ("b", "h", "p", "n"), optional=True)
    s.check("seq_idx", seq_idx, ("b", "l"), dtypes=INDEX_DTYPES, optional=True)
    lo, hi = _limits(dt_limit)
    s.require(lo <= hi, "dt_limit", f"expected min <= max, got {dt_limit!r}")
    _registry.require_kernel("selective_scan_fwd", x.device)

    dtype = x.dtype
    h, p = s["h"], s["p"]
    if D is not None and D.dim() == 1:
        D = D[:, None].expand(h, p)
    out, final_states = torch.ops.h1r.selective_scan_fwd(
        x.contiguous(), dt.to(dtype).contiguous(), A.float().contiguous(), B.to(dtype).contiguous(),
        C.to(dtype).contiguous(), chunk_size,
        None if D is None else D.float().contiguous(),
        None if z is None else z.to(dtype).contiguous(),
        None if dt_bias is None else dt_bias.float().contiguous(),
        None if initial_states is None else initial_states.float().contiguous(),
        None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
        bool(dt_softplus), lo, hi,
    )
    return (out, final_states) if return_final_states else out


def _per_head(s: Shapes, name: str, t, tied_dims: tuple[int, ...]):
    """Slice a head-tied expansion (stride 0, or size 1, over ``tied_dims``) to its per-head form."""
    for d in tied_dims:
        s.require(t.stride(d) == 0 or t.shape[d] == 1, name,
                  f"expected a value per head (stride 0 over dim {d}, as a head-tied expand() gives), got a "
                  f"per-channel tensor of shape {tuple(t.shape)} and strides {t.stride()}; "
                  "per-channel dt / A are not supported by the Mamba2 kernels")
    idx = tuple(0 if d in tied_dims else slice(None) for d in range(t.dim()))
    return t[idx]


_STATE_UPDATE_OP = _registry.op_overload("selective_state_update")


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None,
):
    """One Mamba2 decode step, ``state`` updated in place (mamba_ssm ``selective_state_update``).

    state_{new} = exp(dt' A) state + dt' x B^T; out = (state_{new} C + D x) * silu(z),
    dt' = softplus?(dt + dt_bias).

    Args:
        state: (S, h, p, n), S >= b (rows picked by ``state_batch_indices`` (b,) int, negative = padding,
            else the first b rows).
        x: (b, h, p). B, C: (b, g, n). z: (b, h, p).
        dt: (b, h), or mamba_ssm's (b, h, p) when head-tied (stride 0 over p).
        A: (h,), or (h, p, n) head-tied. D: (h, p) or (h,). dt_bias: (h,), or (h, p) head-tied.

    Returns:
        out (b, h, p) in x's dtype.
    """
    # Fast path (eager, CPU, the per-head Mamba2 form): the CPU glue checks every argument itself and does
    # this function's normalizations (dtypes, contiguity, D (h,), int64 indices), so a well-formed call
    # goes straight to it without the Python checks and their copies. Whatever it rejects is re-run
    # through the checked path below, which raises this API's own error for it; mamba_ssm's head-tied
    # forms (dt (b, h, p), A (h, p, n), dt_bias (h, p)) go there directly.
    if _STATE_UPDATE_OP is not None and not torch.compiler.is_compiling():
        try:
            if x.is_cpu and dt.dim() == 2 and A.dim() == 1 and (dt_bias is None or dt_bias.dim() == 1):
                return _STATE_UPDATE_OP(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus),
                                        state_batch_indices)
        except Exception:
            pass
    return _selective_state_update_checked(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def _selective_state_update_checked(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    """selective_state_update with every argument validated and normalized in Python (any device, the
    head-tied forms, and under torch.compile, where the checks run once at trace time)."""
    s = Shapes("selective_state_update")
    s.check("state", state, ("S", "h", "p", "n"))
    s.check("x", x, ("b", "h", "p"))
    if dt is not None and dt.dim() == 3:
        s.check("dt", dt, ("b", "h", "p"))
        dt = _per_head(s, "dt", dt, (2,))
    s.check("dt", dt, ("b", "h"))
    if A is not None and A.dim() == 3:
        s.check("A", A, ("h", "p", "n"))
        A = _per_head(s, "A", A, (1, 2))
    s.check("A", A, ("h",))
    s.check("B", B, ("b", "g", "n"))
    s.check("C", C, ("b", "g", "n"))
    s.require(s["h"] % s["g"] == 0, "B", f"the number of groups g = {s['g']} must divide nheads h = {s['h']}")
    if D is not None:
        s.check("D", D, ("h", "p") if D.dim() == 2 else ("h",))
    s.check("z", z, ("b", "h", "p"), optional=True)
    if dt_bias is not None and dt_bias.dim() == 2:
        s.check("dt_bias", dt_bias, ("h", "p"))
        dt_bias = _per_head(s, "dt_bias", dt_bias, (1,))
    s.check("dt_bias", dt_bias, ("h",), optional=True)
    s.check("state_batch_indices", state_batch_indices, ("b",), dtypes=INDEX_DTYPES, optional=True)
    s.require(state.is_contiguous(), "state", f"expected a contiguous tensor (updated in place), got strides {state.stride()}")
    if state_batch_indices is None:
        s.require(s["S"] >= s["b"], "state", f"expected at least b = {s['b']} rows, got {s['S']}")
    _registry.require_kernel("selective_state_update", x.device)

    dtype = x.dtype
    h, p = s["h"], s["p"]
    if D is not None and D.dim() == 1:
        D = D[:, None].expand(h, p)
    return torch.ops.h1r.selective_state_update(
        state, x.contiguous(), dt.to(dtype).contiguous(), A.float().contiguous(), B.to(dtype).contiguous(),
        C.to(dtype).contiguous(),
        None if D is None else D.float().contiguous(),
        None if z is None else z.to(dtype).contiguous(),
        None if dt_bias is None else dt_bias.float().contiguous(),
        bool(dt_softplus),
        None if state_batch_indices is None else state_batch_indices.to(torch.int32).contiguous(),
    )


# ---- fake implementations (shapes only) for torch.compile / meta tensors ------------------------------
@torch.library.register_fake("h1r::selective_scan_fwd")
def _scan_fwd_fake(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max):
    b, _, h, p = x.shape
    n = B.shape[3]
    return torch.empty_like(x), x.new_empty((b, h, p, n), dtype=torch.float32)


def _grad_like(t):
    return torch.empty_like(t) if t is not None else None


@torch.library.register_fake("h1r::selective_scan_bwd")
def _scan_bwd_fake(dout, dfinal_states, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                   dt_softplus, dt_min, dt_max):
    def g(t):
        return torch.empty_like(t) if t is not None else x.new_empty((0,))

    return (g(x), g(dt), g(A), g(B), g(C), g(D), g(z), g(dt_bias), g(initial_states))


@torch.library.register_fake("h1r::selective_state_update")
def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return torch.empty_like(x)


# ---- autograd -------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max) = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    ctx.args = (chunk_size, dt_softplus, dt_min, dt_max)


def _backward(ctx, dout, dfinal_states):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.args
    if dout is None:
        dout = torch.zeros_like(x)
    grads = torch.ops.h1r.selective_scan_bwd(
        dout.contiguous(), None if dfinal_states is None else dfinal_states.contiguous(), x, dt, A, B, C,
        chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max,
    )
    # Gradients of absent inputs come back empty: map them to None.
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = (
        None if t is None else g for g, t in zip(grads, (x, dt, A, B, C, D, z, dt_bias, initial_states))
    )
    return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, dinit, None, None, None, None


torch.library.register_autograd("h1r::selective_scan_fwd", _backward, setup_context=_setup_context)
