"""Plain-torch linear layer with the epilogue of ``torch.ops.h1r.linear`` (muP scale, bias, SwiGLU, alpha,
residual), everything in fp32 and one rounding to x's dtype at the end."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, alpha: float = 1.0, residual: torch.Tensor | None = None,
               swiglu: bool = False) -> torch.Tensor:
    """x (..., k), weight (n, k), bias / scale (n,), residual (..., n_out).

    y = x @ weight^T * scale + bias; a = silu(y[..., :n/2]) * y[..., n/2:] with ``swiglu`` (n_out = n/2),
    else y (n_out = n); returns alpha * a + residual in x's dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(ct) @ weight.to(ct).t()
    if scale is not None:
        y = y * scale.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    y = alpha * y
    if residual is not None:
        y = y + residual.to(ct)
    return y.to(x.dtype)


def swiglu_ref(x: torch.Tensor, gate_scale: float = 1.0) -> torch.Tensor:
    """x (..., 2 * width) = [gate | up] -> silu(gate * gate_scale) * up (..., width), in fp32 (fp64 for fp64
    inputs) with one rounding to x's dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    gate, up = x.to(ct).chunk(2, dim=-1)
    return (F.silu(gate * gate_scale) * up).to(x.dtype)
