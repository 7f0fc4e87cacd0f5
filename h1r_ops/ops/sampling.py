"""Token sampling for the batched decoder: ``sample_top_p`` draws one token per row of logits (greedy,
temperature, exact top-p nucleus without sorting the vocabulary) and returns the raw top-k log-probs that
DeepConf's confidence and a trainer's importance weights need, in one fused pass per row.

An inference op: no autograd formula (the outputs are integers and log-probs of the raw logits; train
through ``fused_linear_logprobs`` instead)."""

from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, Shapes
from .._registry import require_kernel

__all__ = ["sample_top_p"]


def sample_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
                 num_logprobs: int = 20):
    """One token per row of logits.

    Args:
        logits: ``(b, vocab)`` fp32 / bf16 / fp16 (a unit column stride; rows may be strided).
        temperature: ``(b,)``; 0 = greedy (the first max), else the softmax temperature.
        top_p: ``(b,)`` in (0, 1]: the exact nucleus of softmax(logits / temperature) (a token is kept iff
            the mass of the tokens ranked above it, ties ranked lowest id first, is below top_p).
        uniform: ``(b,)`` in (0, 1]: each row's draw; the token is the first, in vocabulary order, whose
            cumulative kept probability reaches ``uniform`` times the kept mass (inverse CDF).
        num_logprobs: k, the top log-probs returned per row.

    Returns:
        tokens ``(b,)`` int64, top_logprobs ``(b, k)`` fp32 (descending), top_ids ``(b, k)`` int64,
        token_logprob ``(b,)`` fp32; log-probs of the raw distribution ``log_softmax(logits)``.
    """
    s = Shapes("sample_top_p")
    s.check("logits", logits, ("b", "vocab"))
    s.require(logits.shape[1] >= 1, "logits", "expected vocab >= 1")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    args = []
    for name, t in (("temperature", temperature), ("top_p", top_p), ("uniform", uniform)):
        s.check(name, t, ("b",), dtypes=FLOAT_DTYPES + (torch.float64,))
        args.append(t.to(torch.float32).contiguous())
    s.require(isinstance(num_logprobs, int) and 0 <= num_logprobs <= logits.shape[1], "num_logprobs",
              f"expected an int in [0, vocab = {logits.shape[1]}], got {num_logprobs!r}")
    require_kernel("sample_top_p", logits.device)
    return torch.ops.h1r.sample_top_p(logits, *args, num_logprobs)


@torch.library.register_fake("h1r::sample_top_p")
def _sample_top_p_fake(logits, temperature, top_p, uniform, num_logprobs):
    b = logits.shape[0]
    return (logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b, num_logprobs), dtype=torch.float32),
            logits.new_empty((b, num_logprobs), dtype=torch.int64), logits.new_empty((b,), dtype=torch.float32))
