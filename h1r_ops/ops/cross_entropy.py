"""The lm head fused with cross entropy, and with per-token log-probs and entropy (for RL).

Both ops compute ``logits = (hidden @ weight^T + bias) * logit_scale`` a chunk of tokens at a time, so
the full ``(tokens, vocab)`` logits never exist: at Falcon-H1-7B sizes (vocab 130048) the logits of
4096 tokens alone would take 2 GB in fp32, and their gradient as much again.

* :func:`fused_linear_cross_entropy` (Liger's fused linear cross entropy): when a gradient is needed,
  the gradients w.r.t. hidden, weight and bias are computed in the forward pass, chunk by chunk, and
  the backward only scales them by the (scalar) upstream gradient. With ``reduction='none'`` the
  upstream gradient is a different number per token, so the forward keeps only the per-token
  logsumexp and the backward recomputes each chunk's logits (one more matmul per chunk).
* :func:`fused_linear_logprobs`: ``log p(target)`` and the entropy of ``softmax(logits / temperature)``
  per token, as GRPO / PPO need; the backward recomputes the chunk's logits from the saved logsumexp.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._checks import INDEX_DTYPES, Shapes, check_choice

__all__ = ["fused_linear_cross_entropy", "fused_linear_logprobs", "FusedLinearCrossEntropyLoss"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _normalize(op: str, hidden, weight, target, bias):
    """Validate and flatten: hidden (..., d) -> (T, d), target (...) -> (T,) int64, all contiguous."""
    s = Shapes(op)
    s.check("weight", weight, ("V", "d"))
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise s.error("hidden", f"expected a tensor of shape (..., d), got {getattr(hidden, 'shape', type(hidden))}")
    s.check("hidden", hidden, ("*",) * (hidden.dim() - 1) + ("d",))
    s.check("target", target, tuple(f"t{i}" for i in range(hidden.dim() - 1)), dtypes=INDEX_DTYPES)
    s.require(tuple(target.shape) == tuple(hidden.shape[:-1]), "target",
              f"expected shape {tuple(hidden.shape[:-1])} (hidden's without d), got {tuple(target.shape)}")
    s.check("bias", bias, ("V",), optional=True)
    s.require(hidden.dtype == weight.dtype, "hidden", f"expected dtype {weight.dtype} (that of 'weight'), got {hidden.dtype}")
    s.require(bias is None or bias.dtype == weight.dtype, "bias",
              f"expected dtype {weight.dtype} (that of 'weight'), got {None if bias is None else bias.dtype}")
    s.require(s["V"] > 0, "weight", "expected at least one vocabulary row")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t1 = target.reshape(-1).to(torch.int64).contiguous()
    return h2, weight.contiguous(), t1, None if bias is None else bias.contiguous()


def _check_float(op: str, name: str, value, lo=None, hi=None, positive=False):
    if not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{op}: argument '{name}': expected a number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{op}: argument '{name}': expected a positive number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{op}: argument '{name}': expected a value in [{lo}, {hi}], got {value!r}")
    return float(value)


def _prepare(op: str, hidden, weight, target, bias, logit_scale, ignore_index):
    """The checks and normalization both public ops share: returns (target's shape, logit_scale as a float,
    the normalized (hidden, weight, target, bias)), having checked that ``<op>_fwd`` has a kernel on the device."""
    logit_scale = _check_float(op, "logit_scale", logit_scale)
    if not isinstance(ignore_index, int):
        raise ValueError(f"{op}: argument 'ignore_index': expected an int, got {ignore_index!r}")
    shape = target.shape if isinstance(target, torch.Tensor) else None
    h, w, t, b = _normalize(op, hidden, weight, target, bias)
    _registry.require_kernel(f"{op}_fwd", h.device)
    return shape, logit_scale, (h, w, t, b)


# ------------------------------------------------------------------------------------- cross entropy
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    return_z_loss: bool = False,
):
    """Cross entropy of ``logits = (hidden @ weight^T + bias) * logit_scale`` without materializing them.

    Args:
        hidden: (..., d) fp32 / bf16 / fp16, the final hidden states.
        weight: (V, d), the lm head (same dtype as hidden).
        target: (...) int32 / int64 class indices in [0, V), or ``ignore_index``.
        bias: optional (V,).
        ignore_index: tokens with this target contribute no loss and no gradient.
        reduction: 'mean' (over the non-ignored tokens; 0 when all are ignored), 'sum' or 'none'.
        label_smoothing: eps of ``(1 - eps) nll + eps * mean_j(-log p_j)`` (as F.cross_entropy).
        z_loss: weight of the ``logsumexp(logits)^2`` term added to each token's loss (PaLM z-loss).
        logit_scale: multiplies the logits (Falcon-H1's ``lm_head_multiplier``).
        return_z_loss: also return the z-loss part of the loss (detached, for logging).

    Returns:
        the loss, fp32: a scalar, or shape (...) for 'none'; with ``return_z_loss`` a pair (loss, z_loss).

    Softmax statistics are fp32; the chunk's logits and their gradient are held in the input dtype
    before the matmuls, as Liger does. For 'mean' / 'sum' the gradients are computed during the forward
    (when any input requires grad) and backward scales them in place, so backward may run only once.
    """
    op = "fused_linear_cross_entropy"
    check_choice(op, "reduction", reduction, tuple(_REDUCTIONS))
    label_smoothing = _check_float(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_float(op, "z_loss", z_loss, 0.0)
    shape, logit_scale, (h, w, t, b) = _prepare(op, hidden, weight, target, bias, logit_scale, ignore_index)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    compute_grad = needs_grad and reduction != "none"
    loss, zl, *_ = torch.ops.h1r.fused_linear_cross_entropy_fwd(
        h, w, t, b, ignore_index, label_smoothing, z_loss, logit_scale, _REDUCTIONS[reduction], compute_grad)
    if reduction == "none":
        loss, zl = loss.view(shape), zl.view(shape)
    return (loss, zl.detach()) if return_z_loss else loss


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """nn.Module form of :func:`fused_linear_cross_entropy`: ``forward(hidden, weight, target, bias=None)``.

    (Liger's LigerFusedLinearCrossEntropyLoss takes the weight first; here the order is that of the
    functional form and of ``F.linear``.)"""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, logit_scale: float = 1.0, return_z_loss: bool = False):
        super().__init__()
        check_choice("FusedLinearCrossEntropyLoss", "reduction", reduction, tuple(_REDUCTIONS))
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.logit_scale = label_smoothing, z_loss, logit_scale
        self.return_z_loss = return_z_loss

    def forward(self, hidden, weight, target, bias=None):
        return fused_linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                          self.label_smoothing, self.z_loss, self.logit_scale, self.return_z_loss)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing="
                f"{self.label_smoothing}, z_loss={self.z_loss}, logit_scale={self.logit_scale}")


def _ce_fwd_fake(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss_scale, logit_scale,
                 reduction, compute_grad):
    T = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = hidden.new_empty((T,) if reduction == 0 else (), **f32)
    z = hidden.new_empty(loss.shape, **f32)
    lse = hidden.new_empty((T,), **f32)
    none = hidden.new_empty((0,))
    if not compute_grad:
        return loss, z, lse, none, none.clone(), none.clone()
    gb = torch.empty_like(bias) if bias is not None else none
    return loss, z, lse, torch.empty_like(hidden), torch.empty_like(weight), gb


def _grads_fake(hidden, weight, bias):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _ce_bwd_fake(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing, z_loss_scale,
                 logit_scale):
    return _grads_fake(hidden, weight, bias)


def _ce_setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, label_smoothing, z_loss_scale, logit_scale, reduction, compute_grad = inputs
    _, _, lse, gh, gw, gb = output
    # Leave the gradients of the other outputs None: materialized, the one for grad_weight alone would
    # be a (V, d) tensor of zeros.
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, label_smoothing, z_loss_scale, logit_scale)
    ctx.reduction, ctx.has_bias = reduction, bias is not None
    ctx.precomputed = bool(compute_grad) and reduction != 0
    if ctx.precomputed:  # backward only scales the gradients computed in the forward
        ctx.save_for_backward(gh, gw, gb)
    else:  # backward recomputes the chunks' logits
        ctx.save_for_backward(hidden, weight, target, bias, lse)


def _ce_backward(ctx, grad_loss, grad_z_loss, grad_lse, *unused):
    if grad_loss is None:  # only the (non-differentiable) side outputs were used
        return (None,) * 10
    if ctx.precomputed:
        gh, gw, gb = ctx.saved_tensors
        # Eager: scaled in place, so no second copy of a (V, d) gradient exists (a second backward
        # through the same graph then fails autograd's saved-tensor version check rather than returning
        # wrong values). Traced (fake / functional tensors, torch.compile): out of place, as tracing
        # forbids mutating saved forward outputs; the compiler can reuse the buffer.
        eager = type(gw) is torch.Tensor
        if eager and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            pass  # loss.backward(): nothing to scale (on CPU reading the scalar costs no device sync)
        else:
            gh, gw, gb = (g.mul_(grad_loss.to(g.dtype)) if eager else g * grad_loss.to(g.dtype)
                          for g in (gh, gw, gb))
    else:
        hidden, weight, target, bias, lse = ctx.saved_tensors
        ignore_index = ctx.args[0]
        g = grad_loss.float()
        if ctx.reduction != 0:  # a scalar loss: the same weight for every token
            g = g.expand(hidden.shape[0])
            if ctx.reduction == 1:
                g = g / (target != ignore_index).sum().clamp(min=1)
        gh, gw, gb = torch.ops.h1r.fused_linear_cross_entropy_bwd(
            g.contiguous(), hidden, weight, target, bias, lse, *ctx.args)
    return (gh, gw, None, gb if ctx.has_bias else None) + (None,) * 6


# ------------------------------------------------------------------------------ log-probs and entropy
def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
):
    """Per-token ``log p(target)`` and entropy of ``p = softmax((hidden @ weight^T + bias) * logit_scale / temperature)``.

    Args:
        hidden: (..., d) fp32 / bf16 / fp16; weight: (V, d); target: (...) int; bias: optional (V,).
        temperature: the sampling temperature (the rollout engine's), > 0.
        logit_scale: multiplies the logits (Falcon-H1's ``lm_head_multiplier``).
        ignore_index: tokens with this target get log-prob 0 and entropy 0, and no gradient.

    Returns:
        (logprobs, entropy), both fp32 of target's shape; both are differentiable (the backward
        recomputes each chunk's logits from the saved per-token logsumexp).
    """
    op = "fused_linear_logprobs"
    temperature = _check_float(op, "temperature", temperature, positive=True)
    shape, logit_scale, (h, w, t, b) = _prepare(op, hidden, weight, target, bias, logit_scale, ignore_index)
    lp, ent, _ = torch.ops.h1r.fused_linear_logprobs_fwd(h, w, t, b, temperature, logit_scale, ignore_index)
    return lp.view(shape), ent.view(shape)


def _lp_fwd_fake(hidden, weight, target, bias, temperature, logit_scale, ignore_index):
    T = hidden.shape[0]
    return tuple(hidden.new_empty((T,), dtype=torch.float32) for _ in range(3))


def _lp_bwd_fake(dlogprobs, dentropy, hidden, weight, target, bias, temperature, logit_scale, ignore_index, lse):
    return _grads_fake(hidden, weight, bias)


def _lp_setup_context(ctx, inputs, output):
    hidden, weight, target, bias, temperature, logit_scale, ignore_index = inputs
    ctx.args = (temperature, logit_scale, ignore_index)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, target, bias, output[2])


def _lp_backward(ctx, dlogprobs, dentropy, dlse):
    if dlogprobs is None and dentropy is None:
        return (None,) * 7
    hidden, weight, target, bias, lse = ctx.saved_tensors
    as_f32 = lambda g: None if g is None else g.float().contiguous()  # noqa: E731
    gh, gw, gb = torch.ops.h1r.fused_linear_logprobs_bwd(
        as_f32(dlogprobs), as_f32(dentropy), hidden, weight, target, bias, *ctx.args, lse)
    return gh, gw, None, gb if ctx.has_bias else None, None, None, None


def _register() -> None:
    """Fake (meta) implementations and autograd formulas of the family's ops; for CUDA tensors, the
    Triton row kernels (h1r_ops/triton_kernels/cross_entropy.py) when Triton is there."""
    torch.library.register_fake("h1r::fused_linear_cross_entropy_fwd")(_ce_fwd_fake)
    torch.library.register_fake("h1r::fused_linear_cross_entropy_bwd")(_ce_bwd_fake)
    torch.library.register_fake("h1r::fused_linear_logprobs_fwd")(_lp_fwd_fake)
    torch.library.register_fake("h1r::fused_linear_logprobs_bwd")(_lp_bwd_fake)
    torch.library.register_autograd("h1r::fused_linear_cross_entropy_fwd", _ce_backward,
                                    setup_context=_ce_setup_context)
    torch.library.register_autograd("h1r::fused_linear_logprobs_fwd", _lp_backward, setup_context=_lp_setup_context)
    if torch.version.cuda is not None:
        try:
            from ..triton_kernels.cross_entropy import register_cuda_kernels
        except ImportError:  # pragma: no cover - Triton is optional
            return
        register_cuda_kernels()


if _registry._LOAD_ERROR is None:  # else the public functions raise the registry's ImportError
    _register()
