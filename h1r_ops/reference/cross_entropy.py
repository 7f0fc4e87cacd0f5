"""Plain-torch ground truth for the lm head fused with cross entropy, log-probs and entropy.

Both functions materialize the full ``(T, V)`` logits (that is exactly what the fused ops avoid) and
compute in fp32 (fp64 when given fp64), so they are the yardstick for every backend.

Notation: hidden ``h`` (T, d), lm-head weight ``W`` (V, d), bias ``b`` (V,), logit scale ``s``:

    z = (h W^T + b) * s                         the logits, (T, V)
    lse_t = log sum_j exp(z_tj)                 per-token logsumexp
    ce_t = (1 - eps) (lse_t - z_t,y_t) + eps (lse_t - mean_j z_tj)      label smoothing eps
    loss_t = ce_t + zl * lse_t^2                z-loss (PaLM), weight zl

Tokens whose target equals ``ignore_index`` contribute nothing; ``mean`` divides by the number of the
other tokens (and gives 0, not NaN, when there are none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_linear_cross_entropy", "fused_linear_logprobs", "lm_head_logits"]

_REDUCTIONS = ("none", "mean", "sum")


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   scale: float = 1.0) -> torch.Tensor:
    """``(hidden @ weight^T + bias) * scale`` in fp32 (fp64 for fp64 inputs), shape (..., V)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    return logits * scale


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
    """Cross entropy of the lm head's logits. hidden (..., d), weight (V, d), target (...) int, bias (V,).

    Returns the loss (fp32: a scalar for 'mean'/'sum', target's shape for 'none'), and with
    ``return_z_loss`` also the z-loss part of it (same shape, already included in the loss)."""
    assert reduction in _REDUCTIONS
    logits = lm_head_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, logit_scale)
    target = target.reshape(-1)
    valid = target != ignore_index
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    zl = z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    loss = ce + zl
    if reduction == "none":
        loss, zl = loss.view(hidden.shape[:-1]), zl.view(hidden.shape[:-1])
    else:
        denom = valid.sum().clamp(min=1) if reduction == "mean" else 1
        loss, zl = loss.sum() / denom, zl.sum() / denom
    return (loss, zl) if return_z_loss else loss


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
):
    """Per-token ``log p(target)`` and entropy of ``p = softmax(logits / temperature)``.

    hidden (..., d), weight (V, d), target (...) int. Returns (logprobs, entropy), both fp32 of target's
    shape, 0 where target == ignore_index."""
    u = lm_head_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, logit_scale / temperature)
    target = target.reshape(-1)
    valid = target != ignore_index
    logp = torch.log_softmax(u, dim=-1)
    lp = logp.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=u.dtype)
    shape = hidden.shape[:-1]
    return torch.where(valid, lp, zero).view(shape), torch.where(valid, entropy, zero).view(shape)
