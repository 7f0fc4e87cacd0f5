"""Sampling parameters and the per-trace sampler: temperature, top-k, top-p, min-p, a seeded
torch.Generator per trace, and the top-k log-probs kept for DeepConf's token confidence.

Log-probs (and so the confidences) are those of the model's raw distribution, log_softmax(logits),
before temperature and filtering (vLLM's default ``raw_logprobs``, and what DeepConf's online
processor computes from the raw logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How each trace of a request is decoded.

    n: traces per prompt (they share the prompt's prefill). temperature 0 = greedy. top_k <= 0 and
    top_p = 1 and min_p = 0 disable the filters. seed: trace i of the request uses ``seed + i`` (None:
    drawn from torch's global generator). max_tokens: new tokens per trace. stop: strings that end a
    trace (needs a tokenizer; the text is cut before the stop string). stop_token_ids: extra ids that
    end a trace (kept in the output), besides ``eos_token_id`` unless ``ignore_eos``. logprobs: how many
    top log-probs per token to keep for the confidence (DeepConf's k = 20). conf_threshold /
    conf_window: online DeepConf early stop: once ``conf_window`` confidences exist, the trace stops as
    soon as the mean of the last ``conf_window`` drops below the threshold (finish reason "pruned")."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 20
    keep_logprobs: bool = False
    conf_threshold: float | None = None
    conf_window: int = 2048

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise ValueError(f"SamplingParams: argument 'n': expected >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: argument 'temperature': expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: argument 'top_p': expected in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams: argument 'min_p': expected in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams: argument 'max_tokens': expected >= 1, got {self.max_tokens}")
        if self.logprobs < 0:
            raise ValueError(f"SamplingParams: argument 'logprobs': expected >= 0, got {self.logprobs}")
        if self.conf_window < 1:
            raise ValueError(f"SamplingParams: argument 'conf_window': expected >= 1, got {self.conf_window}")


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g.manual_seed(seed)
    return g


NUCLEUS_CANDIDATES = 1024


def _nucleus(p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero what lies past the nucleus of descending probabilities p (b, K): the smallest prefix whose mass
    reaches top_p (the token crossing it included)."""
    drop = (p.cumsum(-1) - p) >= top_p[:, None]
    drop[:, 0] = False
    return p.masked_fill(drop, 0.0)


def _filtered_probs(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Row-wise top-k, top-p (nucleus) and min-p on temperature-scaled fp32 logits x (b, V) -> unnormalized
    filtered probabilities (b, V), 0 where filtered.

    No full sort where it can be avoided: the candidates are the top max(top_k, 1024) logits; a row with
    top-k needs nothing else, a row with only top-p uses them when their mass (under the full softmax)
    reaches top_p, which puts its whole nucleus among them. Other rows are sorted in full. The path of a
    row depends only on that row, so results do not depend on the batch composition."""
    b, V = x.shape
    has_k = top_k > 0
    plain = ~has_k & (top_p >= 1)
    if bool(plain.all()):
        p = x.softmax(-1)
    else:
        p = torch.zeros_like(x)
        K = min(V, max(NUCLEUS_CANDIDATES, int(top_k.max())))
        vals, order = x.topk(K, dim=-1)
        kk = torch.where(has_k, top_k.clamp(max=K), torch.full_like(top_k, K))
        vals = vals.masked_fill(torch.arange(K, device=x.device)[None, :] >= kk[:, None], float("-inf"))
        pc = torch.where(has_k[:, None], vals.softmax(-1), (vals - torch.logsumexp(x, -1, keepdim=True)).exp())
        fast = has_k | (~plain & (pc.sum(-1) >= top_p))
        p.scatter_(-1, order, _nucleus(pc, top_p).masked_fill(~fast[:, None], 0.0))
        if bool(plain.any()):
            p[plain] = x[plain].softmax(-1)
        slow = ~fast & ~plain
        if bool(slow.any()):
            xs, idx = x[slow].sort(dim=-1, descending=True)
            p[slow] = torch.zeros_like(xs).scatter(-1, idx, _nucleus(xs.softmax(-1), top_p[slow]))
    if bool((min_p > 0).any()):
        p = p.masked_fill(p < min_p[:, None] * p.max(-1, keepdim=True).values, 0.0)
    return p


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Temperature + top-k + top-p + min-p on fp32 logits (b, V): filtered entries become -inf.
    temperature (b,) > 0; top_k (b,) int (<= 0: off); top_p (b,); min_p (b,)."""
    x = logits / temperature[:, None]
    return x.masked_fill(_filtered_probs(x, top_k, top_p, min_p) == 0, float("-inf"))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of fp32 logits (b, V): argmax for temperature 0, else a draw from the filtered
    distribution by inverse CDF with one uniform from the row's own generator (so a trace's draws do not
    depend on which other traces share the batch)."""
    b, V = logits.shape
    dev = logits.device
    greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
    out = logits.argmax(-1)
    if bool(greedy.all()):
        return out
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32)
    cdf = _filtered_probs(logits / temp[:, None], top_k, top_p, min_p).cumsum(-1)
    # u in (0, 1]: the first index with cdf >= u * total has a nonzero probability
    u = torch.stack([1.0 - torch.rand((), generator=g, device=dev) if p.temperature > 0 else torch.ones((), device=dev)
                     for p, g in zip(params, generators)])
    j = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=V - 1)
    return torch.where(greedy, out, j)


def topk_logprobs(logits: torch.Tensor, k: int):
    """log_softmax of the raw logits: (top-k values (b, k), their ids (b, k), the full log-probs (b, V))."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if k <= 0:
        return lp[:, :0], torch.empty(lp.shape[0], 0, dtype=torch.long, device=lp.device), lp
    v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return v, i, lp


def token_confidence(top_logprobs: torch.Tensor) -> torch.Tensor:
    """DeepConf token confidence C_i = -(1/k) sum_j log P_i(j) over the top-k log-probs (b, k) -> (b,)
    (higher = more peaked). The sampled token is not added when outside the top k (the online
    processor's and TensorRT-LLM's convention; vLLM's offline dict may hold k + 1 entries)."""
    if top_logprobs.shape[-1] == 0:
        return torch.zeros(top_logprobs.shape[0], device=top_logprobs.device)
    return -top_logprobs.mean(-1)
