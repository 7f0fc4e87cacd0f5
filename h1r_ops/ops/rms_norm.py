"""RMSNorm (optionally fused with the residual add) and Mamba2's gated RMSNorm: drop-in functions and modules.

* :func:`rms_norm` / :class:`RMSNorm`: transformers' ``FalconH1RMSNorm`` (Llama-style) numerics, with the
  vLLM / Liger fused residual add: ``h = x + residual`` is normalized and returned as the new residual.
* :func:`gated_rms_norm` / :class:`RMSNormGated`: ``mamba_ssm``'s ``RMSNorm(hidden_size, eps, group_size,
  norm_before_gate)`` from ``layernorm_gated.py`` (transformers' ``FalconH1RMSNormGated`` numerics).

CPU tensors run the C++ kernels (csrc/cpu/rms_norm*.cpp), CUDA tensors the Triton kernels
(h1r_ops/triton_kernels/rms_norm.py). Gradients flow to x, residual, z and weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _registry


from .._checks import Shapes, check_positive

__all__ = ["rms_norm", "gated_rms_norm", "RMSNorm", "RMSNormGated"]


def _row_shape(x) -> tuple:
    """Symbolic shape (*, ..., d) of a (..., d) argument."""
    n = x.dim() if isinstance(x, torch.Tensor) else 1
    return ("*",) * max(n - 1, 0) + ("d",)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension, optionally fused with the residual add.

    Args:
        x: (..., d) fp32 / bf16 / fp16.
        weight: (d,) any float dtype.
        eps: added to the mean of squares.
        residual: optional, like x. When given, ``h = x + residual`` (rounded to x's dtype) is normalized.

    Returns:
        ``out`` (like x) = ``weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)`` with the statistics in fp32,
        or ``(out, h)`` when ``residual`` is given (``h`` is the new residual stream).
    """
    s = Shapes("rms_norm")
    s.check("x", x, _row_shape(x))
    s.require(x.dim() >= 1 and x.shape[-1] >= 1, "x", f"expected shape (..., d) with d >= 1, got {tuple(x.shape)}")
    s.check("weight", weight, ("d",))
    if residual is not None:
        s.check("residual", residual, tuple(x.shape))
        s.require(residual.dtype == x.dtype, "residual", f"expected dtype {x.dtype} (that of 'x'), got {residual.dtype}")
        residual = residual.contiguous()
    check_positive("rms_norm", "eps", eps, strict=False)
    _registry.require_kernel("rms_norm_fwd", x.device)
    out, residual_out, _ = torch.ops.h1r.rms_norm_fwd(x.contiguous(), weight.contiguous(), float(eps), residual)
    return out if residual is None else (out, residual_out)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """Mamba2's gated RMSNorm with per-group statistics.

    Args:
        x: (..., d) fp32 / bf16 / fp16.
        z: optional gate, like x.
        weight: (d,).
        eps: added to the mean of squares of each group.
        group_size: channels per group, dividing d (None: d, one group).
        norm_before_gate: True: ``rmsnorm(x) * weight * silu(z)``; False: ``rmsnorm(x * silu(z)) * weight``.

    Returns:
        out like x, computed in fp32 with one cast at the end (transformers' ``FalconH1RMSNormGated``).
    """
    s = Shapes("gated_rms_norm")
    s.check("x", x, _row_shape(x))
    s.require(x.dim() >= 1 and x.shape[-1] >= 1, "x", f"expected shape (..., d) with d >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    if z is not None:
        s.check("z", z, tuple(x.shape))
        s.require(z.dtype == x.dtype, "z", f"expected dtype {x.dtype} (that of 'x'), got {z.dtype}")
        z = z.contiguous()
    s.check("weight", weight, ("d",))
    group_size = d if group_size is None else group_size
    s.require(
        isinstance(group_size, int) and group_size >= 1 and d % group_size == 0,
        "group_size",
        f"expected a positive divisor of d = {d}, got {group_size!r}",
    )
    check_positive("gated_rms_norm", "eps", eps, strict=False)
    _registry.require_kernel("gated_rms_norm_fwd", x.device)
    out, _ = torch.ops.h1r.gated_rms_norm_fwd(
        x.contiguous(), z, weight.contiguous(), float(eps), group_size, bool(norm_before_gate)
    )
    return out


class RMSNorm(nn.Module):
    """Drop-in for ``FalconH1RMSNorm`` / ``LlamaRMSNorm`` / ``LigerRMSNorm``; ``forward(x, residual=None)``
    also fuses the residual add (returns ``(out, new_residual)`` then)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.variance_epsilon, residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class RMSNormGated(nn.Module):
    """Drop-in for ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (``RMSNormGated`` in Mamba2):
    ``forward(x, z=None)`` = ``norm(x) * silu(z)`` if ``norm_before_gate`` else ``norm(x * silu(z))``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


# ---- fake (meta) implementations, autograd, CUDA (Triton) kernels --------------------------------------------


def _rms_norm_fwd_fake(x, weight, eps, residual):
    rows = x.numel() // x.shape[-1]
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), residual_out, x.new_empty((rows,), dtype=torch.float32)


def _rms_norm_bwd_fake(dout, dresidual_out, h, weight, rstd):
    return torch.empty_like(h), h.new_empty((h.shape[-1],), dtype=torch.float32)


def _gated_rms_norm_fwd_fake(x, z, weight, eps, group_size, norm_before_gate):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty((rows, x.shape[-1] // group_size), dtype=torch.float32)


def _gated_rms_norm_bwd_fake(dout, x, z, weight, rstd, eps, group_size, norm_before_gate):
    dz = torch.empty_like(x) if z is not None else x.new_empty((0,))
    return torch.empty_like(x), dz, x.new_empty((x.shape[-1],), dtype=torch.float32)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, residual = inputs
    _, residual_out, rstd = output
    ctx.fused = residual is not None
    ctx.save_for_backward(residual_out if ctx.fused else x, weight, rstd)


def _rms_norm_backward(ctx, dout, dresidual_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dout = torch.zeros_like(h) if dout is None else dout.contiguous()
    dres = dresidual_out.contiguous() if ctx.fused and dresidual_out is not None else None
    dh, dweight = torch.ops.h1r.rms_norm_bwd(dout, dres, h, weight, rstd)
    # h = x + residual: both receive dh.
    return dh, dweight.to(weight.dtype), None, (dh if ctx.fused else None)


def _gated_setup(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.args = (eps, group_size, norm_before_gate)
    ctx.has_z = z is not None
    ctx.save_for_backward(x, z, weight, output[1])


def _gated_backward(ctx, dout, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dout = torch.zeros_like(x) if dout is None else dout.contiguous()
    dx, dz, dweight = torch.ops.h1r.gated_rms_norm_bwd(dout, x, z, weight, rstd, *ctx.args)
    return dx, (dz if ctx.has_z else None), dweight.to(weight.dtype), None, None, None


def _triton():
    # Imported on first CUDA call: the Triton kernels are JIT-compiled (or interpreted) only when used.
    from ..triton_kernels import rms_norm as kernels

    return kernels


def _rms_norm_fwd_cuda(x, weight, eps, residual):
    return _triton().rms_norm_fwd(x, weight, eps, residual)


def _rms_norm_bwd_cuda(dout, dresidual_out, h, weight, rstd):
    return _triton().rms_norm_bwd(dout, dresidual_out, h, weight, rstd)


def _gated_rms_norm_fwd_cuda(x, z, weight, eps, group_size, norm_before_gate):
    return _triton().gated_rms_norm_fwd(x, z, weight, eps, group_size, norm_before_gate)


def _gated_rms_norm_bwd_cuda(dout, x, z, weight, rstd, eps, group_size, norm_before_gate):
    return _triton().gated_rms_norm_bwd(dout, x, z, weight, rstd, eps, group_size, norm_before_gate)


if _registry._LOAD_ERROR is None:  # the schemas live in h1r_ops._C
    for _op, _fake, _cuda in (
        ("rms_norm_fwd", _rms_norm_fwd_fake, _rms_norm_fwd_cuda),
        ("rms_norm_bwd", _rms_norm_bwd_fake, _rms_norm_bwd_cuda),
        ("gated_rms_norm_fwd", _gated_rms_norm_fwd_fake, _gated_rms_norm_fwd_cuda),
        ("gated_rms_norm_bwd", _gated_rms_norm_bwd_fake, _gated_rms_norm_bwd_cuda),
    ):
        torch.library.register_fake(f"h1r::{_op}")(_fake)
        torch.library.register_kernel(f"h1r::{_op}", "cuda")(_cuda)
    torch.library.register_autograd("h1r::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)
    torch.library.register_autograd("h1r::gated_rms_norm_fwd", _gated_backward, setup_context=_gated_setup)
