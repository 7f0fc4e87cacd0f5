"""Linear layer with a fused epilogue, for the few rows of a decode step.

``linear(x, weight, bias, scale, alpha, residual, swiglu)`` = ``alpha * act(x @ weight^T * scale + bias) +
residual`` with act the SwiGLU ``silu(y[:, :n/2]) * y[:, n/2:]`` when ``swiglu`` (weight = [gate | up]
rows), in fp32 with one rounding to x's dtype. The CPU kernel (csrc/cpu/linear*.cpp) reads the weights
once for all rows of x, which is what decoding needs (a GEMV / skinny GEMM is bound by the weight read);
bf16 inputs of 5+ rows run on AMX tiles where the CPU has them (the weight used in its plain layout,
``torch.ops.h1r.linear_amx()`` says whether); with its fused epilogue the native model uses it up to
1024 rows and a BLAS GEMM (AMX for bf16 too, the weight reordered per call) beyond (see
``h1r_ops.model.falcon_h1.row_kernel``). Gradients flow to x, weight, bias, scale and residual (computed
in torch: the op serves inference, its backward is not a kernel).

``swiglu(x, gate_scale)`` is the same activation on its own, for a [gate | up] product the BLAS computed
(many rows: one pass over it instead of torch's scale, silu and product passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _registry
from .._checks import Shapes

__all__ = ["linear", "swiglu"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, alpha: float = 1.0, residual: torch.Tensor | None = None,
           swiglu: bool = False) -> torch.Tensor:
    """``alpha * act(x @ weight^T * scale + bias) + residual``.

    Args:
        x: (..., k) fp32 / bf16 / fp16.
        weight: (n, k) in x's dtype (with ``swiglu``: the gate rows then the up rows, n even).
        bias: optional (n,), any float dtype (added in fp32).
        scale: optional (n,), any float dtype: a per-output-row multiplier of the product (muP).
        alpha: a multiplier of the (activated) output.
        residual: optional (..., n_out) in x's dtype, added last.
        swiglu: ``act(y) = silu(y[..., :n/2]) * y[..., n/2:]`` (n_out = n/2); else the identity (n_out = n).

    Returns:
        (..., n_out) in x's dtype (fp32 accumulation and epilogue, one rounding).
    """
    s = Shapes("linear")
    s.check("x", x, ("*",) * (x.dim() - 1) + ("k",) if isinstance(x, torch.Tensor) and x.dim() >= 1 else ("k",))
    s.check("weight", weight, ("n", "k"))
    s.require(weight.dtype == x.dtype, "weight", f"expected dtype {x.dtype} (that of 'x'), got {weight.dtype}")
    n = weight.shape[0]
    s.require(not swiglu or n % 2 == 0, "weight", f"with swiglu, expected an even number of rows [gate | up], got {n}")
    n_out = n // 2 if swiglu else n
    s.check("bias", bias, ("n",), optional=True)
    s.check("scale", scale, ("n",), optional=True)
    lead = tuple(x.shape[:-1])
    s.check("residual", residual, lead + (n_out,), optional=True)
    if residual is not None:
        s.require(residual.dtype == x.dtype, "residual", f"expected dtype {x.dtype} (that of 'x'), got {residual.dtype}")
        residual = residual.reshape(-1, n_out)
    s.require(isinstance(alpha, (int, float)), "alpha", f"expected a number, got {type(alpha).__name__}")
    _registry.require_kernel("linear", x.device)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.ops.h1r.linear(x2, w, bias, scale, float(alpha), residual, bool(swiglu))
    return out.view(*lead, n_out)


def swiglu(x: torch.Tensor, gate_scale: float = 1.0) -> torch.Tensor:
    """``silu(gate * gate_scale) * up`` for ``x = [gate | up]`` along the last dimension.

    Args:
        x: (..., 2 * width) fp32 / bf16 / fp16 (the last dimension dense; rows may be strided).
        gate_scale: multiplier of the gate before the silu (Falcon-H1's ``mlp_multipliers[0]``).

    Returns:
        (..., width) in x's dtype (fp32 arithmetic, one rounding).
    """
    s = Shapes("swiglu")
    s.check("x", x, ("*",) * (x.dim() - 1) + ("d",) if isinstance(x, torch.Tensor) and x.dim() >= 1 else ("d",))
    s.require(x.shape[-1] % 2 == 0, "x", f"expected an even last dimension [gate | up], got {tuple(x.shape)}")
    s.require(isinstance(gate_scale, (int, float)), "gate_scale", f"expected a number, got {type(gate_scale).__name__}")
    _registry.require_kernel("swiglu", x.device)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return torch.ops.h1r.swiglu(x2, float(gate_scale)).view(*lead, x.shape[-1] // 2)


# ---- fake (meta) implementation and autograd (in torch) ---------------------------------------------


@torch.library.register_fake("h1r::linear")
def _linear_fake(x, weight, bias=None, scale=None, alpha=1.0, residual=None, swiglu=False):
    n = weight.shape[0]
    return x.new_empty((x.shape[0], n // 2 if swiglu else n))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, scale, alpha, residual, swiglu = inputs
    ctx.alpha, ctx.swiglu, ctx.has_residual = alpha, swiglu, residual is not None
    ctx.save_for_backward(x, weight, bias, scale)


def _linear_backward(ctx, dout):
    """d/d(x, weight, bias, scale, residual) of alpha * act(y * scale + bias) + residual, y = x @ weight^T,
    in fp32 (y recomputed)."""
    x, weight, bias, scale = ctx.saved_tensors
    xf, wf = x.float(), weight.float()
    y = xf @ wf.t()
    v = y * scale.float() if scale is not None else y
    if bias is not None:
        v = v + bias.float()
    da = dout.float() * ctx.alpha
    if ctx.swiglu:
        gate, up = v.chunk(2, dim=-1)
        sg = torch.sigmoid(gate)
        dv = torch.cat([da * up * sg * (1 + gate * (1 - sg)), da * F.silu(gate)], dim=-1)
    else:
        dv = da
    dy = dv * scale.float() if scale is not None else dv
    need = ctx.needs_input_grad
    dx = (dy @ wf).to(x.dtype) if need[0] else None
    dw = (dy.t() @ xf).to(weight.dtype) if need[1] else None
    dbias = dv.sum(0).to(bias.dtype) if bias is not None and need[2] else None
    dscale = (dv * y).sum(0).to(scale.dtype) if scale is not None and need[3] else None
    dres = dout if ctx.has_residual and need[5] else None
    return dx, dw, dbias, dscale, None, dres, None


torch.library.register_autograd("h1r::linear", _linear_backward, setup_context=_linear_setup)


@torch.library.register_fake("h1r::swiglu")
def _swiglu_fake(x, gate_scale=1.0):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


def _swiglu_setup(ctx, inputs, output):
    ctx.gate_scale = inputs[1]
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    gate, up = x.float().chunk(2, dim=-1)
    g = gate * ctx.gate_scale
    sg = torch.sigmoid(g)
    d = dout.float()
    dgate = d * up * sg * (1 + g * (1 - sg)) * ctx.gate_scale
    return torch.cat([dgate, d * F.silu(g)], dim=-1).to(x.dtype), None


torch.library.register_autograd("h1r::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
