"""Plain-torch ground truth of the decoder's sampler (``h1r::sample_top_p``), written with a full sort of
the vocabulary (the kernel never sorts it; ``h1r_ops.infer.sampling`` holds the bucketing torch version)."""

from __future__ import annotations

import torch


def sample_top_p_ref(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
                     num_logprobs: int):
    """logits (b, V); temperature, top_p, uniform (b,). Returns (tokens (b,) int64, top_logprobs (b, k) fp32,
    top_ids (b, k) int64, token_logprob (b,) fp32), with k = num_logprobs.

    Row i: temperature 0 -> the first max. Else p = softmax(logits / T) in fp64; the tokens ranked by
    (logit descending, id ascending); a token is kept iff the mass ranked above it is below top_p (top_p = 1
    keeps all); the token is the first in vocabulary order whose cumulative kept mass reaches
    uniform * (kept mass). Log-probs: log_softmax(logits) in fp64; top-k ranked as above."""
    x = logits.double()
    b, V = x.shape
    ids = torch.arange(V)
    lp = torch.log_softmax(x, -1)
    tokens, top_lp, top_ids = [], [], []
    for i in range(b):
        # rank: value descending, ties lowest id first (a stable sort of the ids in order)
        order = torch.sort(x[i], descending=True, stable=True).indices
        top_ids.append(order[:num_logprobs])
        top_lp.append(lp[i, order[:num_logprobs]])
        t = float(temperature[i])
        if not t > 0:
            tokens.append(int(order[0]))
            continue
        p = torch.softmax(x[i] / t, -1)
        ps = p[order]
        above = ps.cumsum(0) - ps
        keep_sorted = above < float(top_p[i]) if float(top_p[i]) < 1 else torch.ones(V, dtype=torch.bool)
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        q = torch.where(keep, p, torch.zeros_like(p))
        cdf = q.cumsum(0)
        # the first index with cdf >= u * total: cdf steps up there, so it is a kept token
        j = int(torch.searchsorted(cdf, float(uniform[i]) * cdf[-1]))
        tokens.append(j if j < V and q[j] > 0 else int(ids[keep][-1]))
    toks = torch.tensor(tokens, dtype=torch.int64)
    token_lp = lp[torch.arange(b), toks].float()
    k = num_logprobs
    top_lp_t = torch.stack(top_lp).float() if b else torch.empty(0, k)
    top_ids_t = torch.stack(top_ids) if b else torch.empty(0, k, dtype=torch.int64)
    return toks, top_lp_t.reshape(b, k), top_ids_t.reshape(b, k), token_lp
