"""Plain-torch RMSNorm (optionally fused with the residual add) and Mamba2's gated RMSNorm.

Numerics follow transformers' Falcon-H1 modules exactly:

* ``rms_norm`` is ``FalconH1RMSNorm``: statistics in fp32, ``x * rsqrt(mean(x^2) + eps)`` cast back to the
  input dtype, *then* multiplied by the weight. With a residual, ``h = x + residual`` is first formed in
  the input dtype (one rounding), and ``h`` is what gets normalized and what is returned as the new
  residual (the vLLM / Liger fused-add convention).
* ``gated_rms_norm`` is ``FalconH1RMSNormGated`` (``mamba_ssm``'s ``RMSNorm`` with ``group_size``): everything
  in fp32 and a single cast at the end; the statistics are taken per group of ``group_size`` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """x (..., d), weight (d,), residual like x. Returns out (like x), or (out, h) when residual is given."""
    dtype = x.dtype
    h = x if residual is None else (x.float() + residual.float()).to(dtype)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight * (hf * rstd).to(dtype)).to(dtype)
    return out if residual is None else (out, h)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """x, z (..., d); weight (d,); group_size divides d (None: d).

    norm_before_gate: rmsnorm(x) * weight * silu(z); else rmsnorm(x * silu(z)) * weight. Without z: rmsnorm(x) * weight.
    Returns a tensor like x."""
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    u = x.float()
    if z is not None and not norm_before_gate:
        u = u * F.silu(z.float())
    ug = u.unflatten(-1, (d // group_size, group_size))
    rstd = torch.rsqrt(ug.pow(2).mean(-1, keepdim=True) + eps)
    out = (ug * rstd).flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(x.dtype)
