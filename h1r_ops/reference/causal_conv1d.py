"""Depthwise causal conv1d (the Mamba / Mamba2 short convolution), written from the math.

For every channel c the output is a causal FIR filter of width w (2..4) over time:

    pre[b, c, t] = bias[c] + sum_{k=0}^{w-1} weight[c, k] * xpad[b, c, t + k]
    out = silu(pre) if activation in ("silu", "swish") else pre

where ``xpad`` is x with w-1 steps of history prepended: ``initial_states`` (b, d, w-1) when given, zeros
otherwise (so tap k of output t reads time t - (w-1) + k). With ``seq_idx`` (b, l) (packed documents),
a tap only reads a time step of the same document as t: ``seq_idx[t - (w-1) + k] == seq_idx[t]``; the
history steps before t = 0 count as part of the first document (``seq_idx[:, 0]``), so initial_states
carry into the first document only. The final state is the last w-1 steps of xpad, the conv state a
decode step continues from; with seq_idx the steps that do not belong to the last document read zero.

``causal_conv1d_update`` is one decode step (or a few): conv_state (S, d, state_len >= w-1) holds the
latest inputs; the new inputs are appended, the output uses the last w-1 state steps + the new ones, and
the state is shifted in place. Both functions compute in fp32 (fp64 for fp64 inputs) and return the
input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_2d_weight(weight: torch.Tensor) -> torch.Tensor:
    # nn.Conv1d stores a depthwise weight as (d, 1, w).
    return weight.squeeze(1) if weight.dim() == 3 else weight


def _use_silu(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d_ref: activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Depthwise causal conv1d, plain torch (differentiable).

    x (b, d, l); weight (d, w) or (d, 1, w); bias (d,); seq_idx (b, l) int; initial_states (b, d, w-1).
    Returns out (b, d, l) in x's dtype, and final_states (b, d, w-1) when ``return_final_states``.
    """
    silu = _use_silu(activation)
    weight = _as_2d_weight(weight)
    dtype_in, ct = x.dtype, _compute_dtype(x)
    b, d, l = x.shape
    w = weight.shape[-1]
    h = w - 1  # steps of history

    xf = x.to(ct)
    hist = initial_states.to(ct) if initial_states is not None else xf.new_zeros(b, d, h)
    xpad = torch.cat([hist, xf], dim=-1)  # (b, d, h + l); xpad[..., h + p] = x[..., p]
    wf = weight.to(ct)

    if seq_idx is not None:
        # Document id of every xpad step; history steps belong to the first document.
        doc = torch.cat([seq_idx[:, :1].expand(b, h), seq_idx], dim=-1).long()  # (b, h + l)

    pre = torch.zeros(b, d, l, dtype=ct, device=x.device)
    for k in range(w):
        tap = xpad[..., k : k + l]  # time t - h + k for output t
        if seq_idx is not None:
            same_doc = doc[:, k : k + l] == doc[:, h:]
            tap = tap * same_doc[:, None, :].to(ct)
        pre = pre + wf[:, k, None] * tap
    if bias is not None:
        pre = pre + bias.to(ct)[:, None]
    out = (F.silu(pre) if silu else pre).to(dtype_in)
    if not return_final_states:
        return out

    final = xpad[..., l:]  # the last h steps of xpad
    if seq_idx is not None:
        final = final * (doc[:, l:] == doc[:, -1:])[:, None, :].to(ct)
    return out, final.to(dtype_in)


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode step(s) of the causal conv1d; updates ``conv_state`` in place.

    x (b, d) or (b, d, l); conv_state (S, d, state_len), state_len >= w-1 (S == b unless
    conv_state_indices (b,) int picks the rows; a negative index marks a padded row: its output is zero
    and no state is touched). Returns out shaped like x, in x's dtype.
    """
    silu = _use_silu(activation)
    weight = _as_2d_weight(weight)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    dtype_in, ct = x.dtype, _compute_dtype(x)
    b, d, l = x.shape
    w = weight.shape[-1]
    state_len = conv_state.shape[-1]

    if conv_state_indices is None:
        rows = torch.arange(b, device=x.device)
    else:
        rows = conv_state_indices.long()
    valid = rows >= 0
    safe_rows = rows.clamp(min=0)

    state = conv_state[safe_rows].to(ct)  # (b, d, state_len)
    seq = torch.cat([state, x.to(ct)], dim=-1)  # (b, d, state_len + l)
    pre = torch.zeros(b, d, l, dtype=ct, device=x.device)
    for k in range(w):
        start = state_len - (w - 1) + k
        pre = pre + weight.to(ct)[:, k, None] * seq[..., start : start + l]
    if bias is not None:
        pre = pre + bias.to(ct)[:, None]
    out = F.silu(pre) if silu else pre
    out = out * valid[:, None, None].to(ct)

    new_state = seq[..., -state_len:].to(conv_state.dtype)
    with torch.no_grad():
        conv_state[rows[valid]] = new_state[valid]
    out = out.to(dtype_in)
    return out.squeeze(-1) if squeeze else out
