"""The loss math of SFT and GRPO, separate from the model so each term is testable by hand.

SFT (balanced data-parallel token normalization)
    loss = sum over response tokens of the whole global batch (all ranks, all accumulation micro-batches)
    of -log p(token) / N, N = the global response-token count (all-reduced before any backward). Each
    token weighs 1/N however the tokens are split across ranks and micro-batches.

GRPO (per group of G rollouts of one prompt, token-level PPO-clip, no KL / entropy by default)
    advantage    A_i = (r_i - mean_g r) / (std_g r + eps)    (std unbiased, as verl/TRL; or A_i = r_i - mean
                 with ``scale_by_std=False``, Dr.GRPO); every response token of rollout i gets A_i.
    ratio        rho_t = exp(logp_t - logp_old_t): the policy being trained vs the policy that sampled,
                 both as recomputed by the trainer (logp_old detached; rho = 1 at the first update).
    surrogate    pg_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
    TIS          w_t = min(exp(logp_old_t - logp_rollout_t), C), detached: truncated importance sampling
                 between the trainer's recompute of the sampling policy (logp_old) and the rollout
                 engine's own sampler log-probs (logp_rollout), which differ by kernels/precision (Yao et
                 al., "Your efficient RL framework secretly brings you off-policy RL training"; verl
                 ``tis_imp_ratio_cap``, C = 2 by default; C = None disables it). When the engine reports
                 log-probs at another temperature than the sampling one (h1r's engine reports raw,
                 temperature-1 log-probs), logp_old in w_t is the trainer's recompute at THAT temperature.
    token loss   L_t = w_t pg_t + kl_coef KL_t - entropy_coef H_t, with KL_t the k3 estimator
                 exp(ref_t - logp_t) - (ref_t - logp_t) - 1 against a frozen reference policy.
    aggregation  token-mean over the global batch: sum_t L_t / N, N = global response-token count.
"""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards (n_groups, G) -> advantages (n_groups, G): r - group mean, divided by (unbiased group std +
    eps) when ``scale_by_std``. A group of one rollout gets advantage 0."""
    if rewards.dim() != 2:
        raise ValueError(f"grpo_advantages: argument 'rewards': expected (n_groups, G), got {tuple(rewards.shape)}")
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std and r.shape[1] > 1:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float | None) -> torch.Tensor:
    """w = min(exp(old_logp - rollout_logp), cap), detached (ones when cap is None). The log-ratio is
    clamped to +-20 before exp (as verl) so a wild token cannot overflow."""
    if cap is None:
        return torch.ones_like(old_logp)
    return torch.exp((old_logp - rollout_logp).detach().clamp(-20.0, 20.0)).clamp(max=cap)


def ppo_clip_token_loss(logp, old_logp, adv, eps_low: float = 0.2, eps_high: float = 0.2):
    """pg_t = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), rho = exp(logp - old_logp); also
    returns the bool mask of tokens where the clipped branch is active (zero gradient)."""
    rho = torch.exp((logp - old_logp.detach()).clamp(-20.0, 20.0))
    un = -adv * rho
    cl = -adv * rho.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(un, cl), cl > un


def grpo_token_losses(logp, old_logp, rollout_logp, adv, mask, *, eps_low=0.2, eps_high=0.2, tis_cap=2.0,
                      kl_coef=0.0, ref_logp=None, entropy_coef=0.0, entropy=None, tis_old_logp=None):
    """Per-token GRPO losses L_t (zero outside ``mask``) and their statistics (sums over the mask).

    All tensors share one shape (e.g. (b, t)); adv is already broadcast over each rollout's tokens.
    ``tis_old_logp``: the trainer's log-probs of the sampling policy at the temperature of ``rollout_logp``
    when it differs from the training temperature (default: ``old_logp``).
    Divide ``L.sum()`` by the global token count for the token-mean (see the module docstring)."""
    m = mask.to(logp.dtype)
    pg, clipped = ppo_clip_token_loss(logp, old_logp, adv, eps_low, eps_high)
    w = truncated_is_weights(old_logp if tis_old_logp is None else tis_old_logp, rollout_logp, tis_cap)
    loss = w * pg
    stats = {"clip_frac": (clipped.float() * m).sum().detach(), "tis_weight": (w * m).sum().detach()}
    if kl_coef:
        if ref_logp is None:
            raise ValueError("grpo_token_losses: argument 'ref_logp': required when kl_coef != 0")
        d = (ref_logp.detach() - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_coef * kl
        stats["kl"] = (kl * m).sum().detach()
    if entropy_coef:
        if entropy is None:
            raise ValueError("grpo_token_losses: argument 'entropy': required when entropy_coef != 0")
        loss = loss - entropy_coef * entropy
    return loss * m, stats
