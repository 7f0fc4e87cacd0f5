"""Plain-torch ground truth for the Mamba2 selective scan (SSD) and its one-token decode step.

Notation (mamba_chunk_scan_combined): x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n) with g | h
(head hh reads group hh // (h / g)), D (h, p) or (h,), z (b, l, h, p), dt_bias (h,), initial_states
(b, h, p, n), seq_idx (b, l) non-decreasing.

    dt'_t    = clamp(softplus?(dt_t + dt_bias), dt_min, dt_max)
    state_t  = exp(dt'_t A) state_{t-1} + dt'_t x_t B_t^T            (state reset where seq_idx changes)
    y_t      = state_t C_t + D x_t ;   out_t = y_t * silu(z_t)

The initial state belongs to the first document of each row (the tokens whose seq_idx equals seq_idx[:, 0]).

Three formulations, checked against each other in tests/test_selective_scan.py:
* ``selective_scan_ref``: the chunked SSD of the Mamba2 paper (its minimal listing, generalized): within a
  chunk, a masked decay matrix times C B^T (quadratic form); across chunks, a recurrence on chunk states.
* ``selective_scan_sequential_ref``: the recurrence above, token by token.
* ``selective_state_update_ref``: one step of the recurrence on a state cache (decode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_scan_sequential_ref", "selective_state_update_ref"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt):
    """dt' = clamp(softplus?(dt + dt_bias), *dt_limit), in the compute dtype."""
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if (lo, hi) != (0.0, math.inf):  # the default limits mean no clamp (mamba_ssm)
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _per_head_D(D, h, p, cdt):
    if D is None:
        return None
    D = D.to(cdt)
    return D[:, None].expand(h, p) if D.dim() == 1 else D


def _expand_groups(t, h):
    """(b, l, g, n) -> (b, l, h, n): head hh reads group hh // (h / g)."""
    return t.repeat_interleave(h // t.shape[2], dim=2)


def selective_scan_ref(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
    dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
):
    """Chunked SSD (Mamba2 paper, minimal listing, generalized). Returns out (b, l, h, p) in x's dtype,
    and final_states (b, h, p, n) in fp32 when ``return_final_states``."""
    b, l, h, p = x.shape
    n = B.shape[3]
    cdt = _compute_dtype(x)
    Q = chunk_size
    nc = max(1, -(-l // Q))
    pad = nc * Q - l

    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, l, h)
    xs = x.to(cdt)
    Bh = _expand_groups(B.to(cdt), h)
    Ch = _expand_groups(C.to(cdt), h)
    if seq_idx is None:
        seq = torch.zeros(b, l, dtype=torch.long, device=x.device)
    else:
        seq = seq_idx.long()
    # Pad to whole chunks: dt = 0 (no decay), x = B = C = 0 (no contribution), seq repeats the last document.
    if pad:
        dtp = F.pad(dtp, (0, 0, 0, pad))
        xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
        seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)

    # Into chunks: X (b, c, Q, h, p), a = dt' A as (b, h, c, Q).
    X = xs.reshape(b, nc, Q, h, p)
    Xdt = X * dtp.reshape(b, nc, Q, h, 1)
    Bc = Bh.reshape(b, nc, Q, h, n)
    Cc = Ch.reshape(b, nc, Q, h, n)
    a = (dtp * A.to(cdt)).reshape(b, nc, Q, h).permute(0, 3, 1, 2)
    cs = torch.cumsum(a, dim=-1)  # chunk cumsum, (b, h, c, Q)
    sq = seq.reshape(b, nc, Q)

    # 1. Intra-chunk (diagonal blocks): Y_i = sum_{j <= i, same doc} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same = (sq[:, :, :, None] == sq[:, :, None, :]) & causal  # (b, c, Q, Q)
    diff = cs[..., :, None] - cs[..., None, :]  # (b, h, c, Q, Q)
    Lmat = torch.exp(torch.where(same[:, None], diff, torch.full_like(diff, -math.inf)))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, Lmat, Xdt)

    # 2. Chunk states: the state each chunk leaves from its own tokens (zero state at the chunk start).
    last = sq[:, :, -1:]  # document of each chunk's last token, (b, c, 1)
    w = torch.exp(cs[..., -1:] - cs) * (sq == last)[:, None].to(cdt)  # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, w, Xdt)

    # 3. State passing across chunks (reset when the chunk's last token is in a new document).
    if initial_states is not None:
        S = initial_states.to(cdt)
    else:
        S = torch.zeros(b, h, p, n, dtype=cdt, device=x.device)
    prev_states = []
    prev_doc = seq[:, :1]  # the initial state belongs to the first document
    prev_docs = []
    for c in range(nc):
        prev_states.append(S)
        prev_docs.append(prev_doc)
        keep = (last[:, c] == prev_doc).to(cdt)  # (b, 1)
        S = torch.exp(cs[:, :, c, -1])[..., None, None] * keep[:, :, None, None] * S + states[:, c]
        prev_doc = last[:, c]
    prev = torch.stack(prev_states, dim=1)  # (b, c, h, p, n)
    prev_doc = torch.stack(prev_docs, dim=1)  # (b, c, 1)

    # 4. Inter-chunk (off-diagonal): the previous state read by C, decayed to each position.
    e = torch.exp(cs) * (sq == prev_doc)[:, None].to(cdt)  # (b, h, c, Q)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev, e)

    Y = (Y_diag + Y_off).reshape(b, nc * Q, h, p)[:, :l]
    return _skip_gate_out(Y, xs[:, :l], x.dtype, D, z, S, return_final_states)


def _skip_gate_out(Y, xs, out_dtype, D, z, S, return_final_states):
    """The scan's epilogue, shared by both formulations: the D skip (y += D x), the z gate (y *= silu(z)),
    the cast to x's dtype, and the final state (fp32 when computed in fp32)."""
    b, l, h, p = Y.shape
    Dh = _per_head_D(D, h, p, Y.dtype)
    if Dh is not None:
        Y = Y + xs * Dh
    if z is not None:
        Y = Y * F.silu(z.to(Y.dtype))
    out = Y.to(out_dtype)
    if return_final_states:
        return out, S.float() if Y.dtype == torch.float32 else S
    return out


def selective_scan_sequential_ref(
    x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
    dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
):
    """The recurrence, token by token (chunk_size is ignored). Same arguments and returns as
    :func:`selective_scan_ref`."""
    b, l, h, p = x.shape
    n = B.shape[3]
    cdt = _compute_dtype(x)
    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Bh = _expand_groups(B.to(cdt), h)
    Ch = _expand_groups(C.to(cdt), h)
    xs = x.to(cdt)
    Af = A.to(cdt)
    S = initial_states.to(cdt) if initial_states is not None else torch.zeros(b, h, p, n, dtype=cdt, device=x.device)
    ys = []
    for t in range(l):
        decay = torch.exp(dtp[:, t] * Af)  # (b, h)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None]
        S = decay[..., None, None] * S + (dtp[:, t, :, None] * xs[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))
    Y = torch.stack(ys, dim=1)
    return _skip_gate_out(Y, xs, x.dtype, D, z, S, return_final_states)


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None,
):
    """One decode step on ``state`` (S, h, p, n), updated in place (rows ``state_batch_indices`` (b,), or
    the first b rows). Per-head forms: x (b, h, p), dt (b, h), A (h,), B, C (b, g, n), D (h, p) or (h,),
    z (b, h, p), dt_bias (h,). Returns out (b, h, p) in x's dtype."""
    b, h, p = x.shape
    cdt = _compute_dtype(state)
    idx = state_batch_indices.long() if state_batch_indices is not None else torch.arange(b, device=x.device)
    S = state[idx].to(cdt)
    dtp = _process_dt(dt, dt_bias, dt_softplus, (0.0, math.inf), cdt)  # (b, h)
    rep = h // B.shape[1]
    Bh = B.to(cdt).repeat_interleave(rep, dim=1)
    Ch = C.to(cdt).repeat_interleave(rep, dim=1)
    decay = torch.exp(dtp * A.to(cdt))
    S = decay[..., None, None] * S + (dtp[..., None] * x.to(cdt))[..., None] * Bh[:, :, None, :]
    state[idx] = S.to(state.dtype)
    y = torch.einsum("bhpn,bhn->bhp", S, Ch)
    Dh = _per_head_D(D, h, p, cdt)
    if Dh is not None:
        y = y + x.to(cdt) * Dh
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)
