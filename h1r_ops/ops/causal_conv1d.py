"""Depthwise causal conv1d (the short convolution of Mamba / Mamba2 / Falcon-H1), as drop-in torch ops.

``causal_conv1d`` and ``causal_conv1d_update`` take the arguments of Dao-AILab causal-conv1d's
``causal_conv1d_fn`` / ``causal_conv1d_update`` and run ``torch.ops.h1r.causal_conv1d_*``: eager, under
autograd (gradients for x, weight, bias and initial_states) and in ``torch.compile(fullgraph=True)``.
Differences from upstream: ``seq_idx`` may be combined with ``initial_states`` (they feed the first
document) and with ``return_final_states`` (the state of the last document); a negative
``conv_state_indices`` entry marks a padded batch row; ``cache_seqlens`` (circular state) is not
supported. The math is in :mod:`h1r_ops.reference.causal_conv1d`.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._checks import INDEX_DTYPES, Shapes, check_choice

__all__ = ["causal_conv1d", "causal_conv1d_fn", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _check_weight(s: Shapes, weight) -> torch.Tensor:
    """weight (d, w), or (d, 1, w) as nn.Conv1d stores it; returns the (d, w) view."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 3:
        s.check("weight", weight, ("d", 1, "w"))
        weight = weight[:, 0, :]
    else:
        s.check("weight", weight, ("d", "w"))
    s.require(2 <= s["w"] <= 4, "weight", f"expected width (last dim) 2, 3 or 4, got {s['w']}")
    return weight


def _channel_last(x: torch.Tensor) -> bool:
    # The kernels' layout rule: channel-first when time has unit stride, channel-last when channels do,
    # anything else is copied to channel-first.
    return x.stride(2) != 1 and x.stride(1) == 1


def _in_supported_layout(x: torch.Tensor) -> torch.Tensor:
    return x if (x.stride(2) == 1 or x.stride(1) == 1) else x.contiguous()


def _empty_in_layout(x: torch.Tensor) -> torch.Tensor:
    b, d, l = x.shape
    if _channel_last(x):
        return x.new_empty((b, l, d)).transpose(1, 2)
    return x.new_empty((b, d, l))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    *,
    final_states_out: torch.Tensor | None = None,
):
    """Depthwise causal conv1d: ``out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (w-1) + k])``.

    Args:
        x: (batch, dim, seqlen), fp32 / bf16 / fp16, channel-first (``x.stride(2) == 1``) or
            channel-last (``x.stride(1) == 1``, e.g. ``xBC.transpose(1, 2)`` of a (b, l, d) tensor;
            the fast layout for Mamba2 / Falcon-H1). Other strides are copied.
        weight: (dim, width) or (dim, 1, width) (nn.Conv1d's layout), width 2..4.
        bias: (dim,) or None.
        seq_idx: (batch, seqlen) int32/int64 document ids of packed sequences; a tap never reads a time
            step of another document.
        initial_states: (batch, dim, width - 1), the steps before t = 0 (part of the first document).
        return_final_states: also return the last width - 1 steps (batch, dim, width - 1), the state a
            decode step continues from (with seq_idx: those of the last document, zeros elsewhere).
        activation: None, "silu" or "swish".
        final_states_out: optional (batch, dim, width - 1) tensor the final states are copied into.

    Returns:
        out (batch, dim, seqlen) in x's dtype and layout, and final_states when requested.
    """
    op = "causal_conv1d"
    silu = check_choice(op, "activation", activation, _ACTIVATIONS) is not None
    s = Shapes(op)
    s.check("x", x, ("b", "d", "l"))
    weight = _check_weight(s, weight)
    s.require(s["l"] >= 1, "x", f"expected seqlen >= 1, got shape {tuple(x.shape)}")
    s.check("bias", bias, ("d",), optional=True)
    s.check("seq_idx", seq_idx, ("b", "l"), dtypes=INDEX_DTYPES, optional=True)
    s.check("initial_states", initial_states, ("b", "d", s["w"] - 1), optional=True)
    if final_states_out is not None:
        s.require(return_final_states, "final_states_out", "given, but return_final_states is False")
        s.check("final_states_out", final_states_out, ("b", "d", s["w"] - 1))
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    if initial_states is not None:
        initial_states = initial_states.contiguous()
    x = _in_supported_layout(x)
    _registry.require_kernel("causal_conv1d_fwd", x.device)
    out, final_states = torch.ops.h1r.causal_conv1d_fwd(
        x, weight, bias, seq_idx, initial_states, bool(return_final_states), silu
    )
    if not return_final_states:
        return out
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final_states)
    return out, final_states


causal_conv1d_fn = causal_conv1d  # causal-conv1d's name


_UPDATE_OP = _registry.op_overload("causal_conv1d_update")


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state_indices: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode step(s) of the causal conv1d; ``conv_state`` is shifted in place.

    Args:
        x: (batch, dim) or (batch, dim, seqlen): the new inputs.
        conv_state: (num_states, dim, state_len), state_len >= width - 1, x's dtype, any strides: the
            latest inputs, oldest first. The output uses its last width - 1 steps; afterwards it holds
            the last state_len steps of [conv_state, x].
        weight: (dim, width) or (dim, 1, width), width 2..4.
        bias: (dim,) or None.
        activation: None, "silu" or "swish".
        conv_state_indices: (batch,) int32/int64: the state row of each batch row (continuous batching
            over a pool of states); a negative index marks a padded row (zero output, no state touched).
            Without it, batch row i uses state row i.

    Returns:
        out shaped like x, in x's dtype.
    """
    # Fast path (eager, CPU). A decode step moves little data, so the call's fixed cost matters: the CPU
    # glue checks every argument itself and reads (d, 1, w) weights, bf16 parameters, int64 or strided
    # indices and any strides as they come, so a well-formed call goes straight to it, with no Python
    # checks, copies or registry query. Whatever it rejects is re-run through the checked path below,
    # which raises this API's own ValueError (or NotImplementedError) for it.
    if (_UPDATE_OP is not None and cache_seqlens is None and activation in _ACTIVATIONS
            and not torch.compiler.is_compiling()):
        try:
            if x.is_cpu:
                return _UPDATE_OP(x, conv_state, weight, bias, activation is not None, conv_state_indices)
        except Exception:
            pass
    return _causal_conv1d_update_checked(x, conv_state, weight, bias, activation, conv_state_indices,
                                         cache_seqlens)


def _causal_conv1d_update_checked(x, conv_state, weight, bias, activation, conv_state_indices, cache_seqlens):
    """causal_conv1d_update with every argument validated in Python (any device, and under torch.compile,
    where the checks run once at trace time)."""
    op = "causal_conv1d_update"
    silu = check_choice(op, "activation", activation, _ACTIVATIONS) is not None
    if cache_seqlens is not None:
        raise ValueError(f"{op}: argument 'cache_seqlens': the circular-buffer state is not supported")
    s = Shapes(op)
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        s.check("x", x, ("b", "d"))
    else:
        s.check("x", x, ("b", "d", "l"))
    s.check("conv_state", conv_state, ("S", "d", "state_len"))
    s.require(conv_state.dtype == x.dtype, "conv_state", f"expected dtype {x.dtype} (that of 'x'), got {conv_state.dtype}")
    weight = _check_weight(s, weight)
    s.require(s["state_len"] >= s["w"] - 1, "conv_state",
              f"expected state_len >= width - 1 = {s['w'] - 1}, got {s['state_len']}")
    s.check("bias", bias, ("d",), optional=True)
    s.check("conv_state_indices", conv_state_indices, ("b",), dtypes=INDEX_DTYPES, optional=True)
    if conv_state_indices is None:
        s.require(s["S"] >= s["b"], "conv_state", f"expected at least batch = {s['b']} rows, got {s['S']}")
    else:
        conv_state_indices = conv_state_indices.to(torch.int32).contiguous()
    _registry.require_kernel(op, x.device)
    return torch.ops.h1r.causal_conv1d_update(x, conv_state, weight, bias, silu, conv_state_indices)


# ---- fake (meta) implementations: shapes, dtypes and layouts of the kernels' outputs ------------------


@torch.library.register_fake("h1r::causal_conv1d_fwd")
def _causal_conv1d_fwd_fake(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    b, d, _ = x.shape
    final = x.new_empty((b, d, weight.shape[-1] - 1)) if return_final_states else x.new_empty((0,))
    return _empty_in_layout(_in_supported_layout(x)), final


@torch.library.register_fake("h1r::causal_conv1d_bwd")
def _causal_conv1d_bwd_fake(dout, dfinal_states, x, weight, bias, seq_idx, initial_states, silu):
    dbias = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))
    dinit = initial_states.new_empty(initial_states.shape) if initial_states is not None else x.new_empty((0,))
    return _empty_in_layout(_in_supported_layout(x)), weight.new_empty(weight.shape), dbias, dinit


@torch.library.register_fake("h1r::causal_conv1d_update")
def _causal_conv1d_update_fake(x, conv_state, weight, bias, silu, conv_state_indices):
    return x.new_empty(x.shape)


# ---- autograd -----------------------------------------------------------------------------------------


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, _return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu


def _fwd_backward(ctx, dout, dfinal_states):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    dx, dweight, dbias, dinit = torch.ops.h1r.causal_conv1d_bwd(
        dout, dfinal_states, x, weight, bias, seq_idx, initial_states, ctx.silu
    )
    return (
        dx,
        dweight,
        dbias if bias is not None else None,
        None,
        dinit if initial_states is not None else None,
        None,
        None,
    )


torch.library.register_autograd("h1r::causal_conv1d_fwd", _fwd_backward, setup_context=_fwd_setup_context)
