"""Sampling parameters and the per-trace sampler: temperature, top-k, top-p, min-p, a seeded
torch.Generator per trace, and the top-k log-probs kept for DeepConf's token confidence.

Nothing sorts the vocabulary: top-p alone (DeepConf's setting) finds its exact nucleus by bucketing the
logits (``_nucleus_buckets``: a weighted bincount, then a top-k over the one bucket the boundary falls
in), top-k works on the k best logits, and the draw is an inverse-CDF search (``searchsorted``) on the
filtered probabilities in vocabulary order with one uniform per trace from the trace's own generator.

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


NUCLEUS_BUCKETS = 1024


class Workspace:
    """Reusable scratch tensors for the per-step sampling of (b, vocab) rows. A fresh (b, vocab) fp32
    tensor per op per step costs a page fault per 4 KiB on CPU (glibc serves blocks this large with
    mmap and unmaps them on free), which costs more than the op itself; the engine keeps one workspace,
    so each step writes into memory already mapped. ``get`` returns a view of a buffer grown on demand."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        t = self._bufs.get(name)
        if t is None or t.numel() < n or t.dtype != dtype or t.device != torch.device(device):
            t = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return t[:n].view(tuple(shape))


def _scratch(ws: Workspace | None, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if ws is None:
        return torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)
    return ws.get(name, like.shape, dtype or like.dtype, like.device)


def _ordered(vals: torch.Tensor, ids: torch.Tensor):
    """Candidates (r, K) from a top-k, reordered by value descending then vocab id ascending: top-k leaves the
    order of tied values open (it may depend on K, so on the batch); tied tokens at a top-k or top-p
    boundary are then taken lowest id first, whatever the batch."""
    ids, o = ids.sort(dim=-1)
    vals = vals.gather(1, o)
    vals, o = vals.sort(dim=-1, descending=True, stable=True)
    return vals, ids.gather(1, o)


def _nucleus_topk(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Rows with a top-k: their k best logits (sorted, so the nucleus is a prefix), softmax over them, the
    nucleus of that renormalized distribution. -> (probabilities (r, K), 0 where filtered; vocab ids (r, K))."""
    K = min(x.shape[-1], int(top_k.max()))
    vals, ids = _ordered(*x.topk(K, dim=-1))
    vals = vals.masked_fill(torch.arange(K, device=x.device)[None, :] >= top_k[:, None], float("-inf"))
    p = vals.softmax(-1)
    drop = (p.cumsum(-1) - p) >= top_p[:, None]   # mass strictly above the token reaches top_p
    drop[:, 0] = False
    return p.masked_fill(drop, 0.0), ids


def _nucleus_buckets(x: torch.Tensor, top_p: torch.Tensor, ws: Workspace | None = None,
                     temperature: torch.Tensor | None = None, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """Exact nucleus of softmax(x / temperature) (x (r, V), temperature (r,) or None for 1) without sorting the
    vocab -> unnormalized probabilities (r, V), 0 where filtered (in workspace memory when ``ws`` is given).

    A token is kept iff the mass of the tokens above it is below top_p. The logits are cut into
    NUCLEUS_BUCKETS equal-width buckets below the row's max (down to its min, at most 40 nats below the
    max; lower logits share the last bucket); one weighted bincount gives each bucket's mass. Buckets
    before the one where the cumulative mass reaches top_p are kept whole, buckets after it dropped whole,
    and only the tokens of that crossing bucket are sorted (a top-k over them) to place the boundary: a few
    streaming passes over the row, on flat and peaked rows alike. Every row's result depends on that row
    alone. The bucket key is monotone in the logit, so rounding cannot reorder tokens across buckets."""
    r, V = x.shape
    nb, dev, ninf = NUCLEUS_BUCKETS, x.device, float("-inf")
    inv_t = 1.0 if temperature is None else (1.0 / temperature)[:, None]   # the temperature is folded in
    if row_max is None or V < 4096:
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
        span = (hi - lo) * inv_t       # at most 40 nats: lower logits share the last bucket
    else:
        # the max is known (the log-prob top-k found it); the range only sets the buckets' resolution, so
        # a strided sample's min serves, and the tokens below it join the last bucket
        hi = row_max.reshape(r, 1)
        span = (hi - x[:, ::16].amin(-1, keepdim=True)) * inv_t
    scale = nb * inv_t / span.clamp(1e-20, 40.0)
    p = torch.sub(hi, x, out=_scratch(ws, "nb_p", x))                   # max - x >= 0 (row_max is exact)
    key = _scratch(ws, "nb_key", x, torch.int32)
    key.copy_(torch.mul(p, scale, out=_scratch(ws, "nb_tmp", x)).clamp_(max=nb - 1))   # bucket 0 = largest
    p.mul_(-inv_t).exp_()                                                # exp((x - max) / T): unnormalized
    rows = torch.arange(r, device=dev, dtype=torch.int32)[:, None] * nb
    mass = torch.bincount(key.add_(rows).view(-1), weights=p.view(-1), minlength=r * nb).view(r, nb).double()
    cum = mass.cumsum(-1)
    target = top_p.double()[:, None] * cum[:, -1:]            # top_p of the row's total mass
    c = (cum < target).sum(-1, keepdim=True).clamp_(max=nb - 1)   # the crossing bucket
    before = (cum - mass).gather(1, c)                        # mass of the buckets above it
    # the crossing bucket's tokens, compacted into (r, K) rows (K: the largest such bucket), sorted by
    # logit; nonzero lists them by ascending id, so the stable sort leaves tied tokens lowest id first
    ckey = c.to(torch.int32) + rows
    rr, cc = torch.eq(key, ckey, out=_scratch(ws, "nb_mask", x, torch.bool)).nonzero(as_tuple=True)
    cnt = torch.bincount(rr, minlength=r)
    K = int(cnt.max())
    pos = torch.arange(rr.shape[0], device=dev) - (cnt.cumsum(0) - cnt)[rr]
    cv = torch.full((r, K), ninf, device=dev)
    cv[rr, pos] = x[rr, cc]
    ci = torch.zeros((r, K), dtype=torch.int64, device=dev)
    ci[rr, pos] = cc
    cv, o = cv.sort(dim=-1, descending=True, stable=True)
    ci = ci.gather(1, o)
    valid = cv > ninf
    cp = p.gather(1, ci)
    drop_c = ((before + (cp.cumsum(-1) - cp).double()) >= target) & valid
    p.masked_fill_(torch.gt(key, ckey, out=_scratch(ws, "nb_mask", x, torch.bool)), 0.0)   # buckets after it
    p.scatter_(1, ci, torch.where(valid, cp.masked_fill(drop_c, 0.0), p.gather(1, ci)))
    return p


def _filtered_probs(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                    ws: Workspace | None = None) -> torch.Tensor:
    """Row-wise top-k, top-p (nucleus) and min-p on temperature-scaled fp32 logits x (b, V) -> unnormalized
    filtered probabilities (b, V), 0 where filtered.

    No full sort of the vocab: rows with a top-k work on their k best logits (top-p applies to the
    renormalized top-k, as a full sort would give); rows with only top-p find their nucleus by bucketing
    (``_nucleus_buckets``); the others take the plain softmax. Each row's path and result depend only on
    that row, so results do not depend on the batch composition."""
    has_k = top_k > 0
    nucleus = ~has_k & (top_p < 1)
    any_k, any_p = bool(has_k.any()), bool(nucleus.any())
    if not any_k and not any_p:
        p = torch.softmax(x, -1)
    elif bool(nucleus.all()):
        p = _nucleus_buckets(x, top_p, ws)
    elif bool(has_k.all()):
        pk, ids = _nucleus_topk(x, top_k, top_p)
        p = _scratch(ws, "fp_p", x).zero_().scatter_(-1, ids, pk)
    else:
        plain = ~has_k & ~nucleus
        p = _scratch(ws, "fp_p", x).zero_()
        if any_k:
            pk, ids = _nucleus_topk(x[has_k], top_k[has_k], top_p[has_k])
            p[has_k] = torch.zeros_like(x[has_k]).scatter_(-1, ids, pk)
        if any_p:
            p[nucleus] = _nucleus_buckets(x[nucleus], top_p[nucleus])
        if bool(plain.any()):
            p[plain] = x[plain].softmax(-1)
    if bool((min_p > 0).any()):
        p.masked_fill_(p < min_p[:, None] * p.max(-1, keepdim=True).values, 0.0)
    return p


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Temperature + top-k + top-p + min-p on fp32 logits (b, V): filtered entries become -inf.
    temperature (b,) > 0; top_k (b,) int (<= 0: off); top_p (b,); min_p (b,)."""
    x = logits / temperature[:, None]
    return x.masked_fill(_filtered_probs(x, top_k, top_p, min_p) == 0, float("-inf"))


class BatchParams:
    """The sampling parameters of a batch of rows as tensors (built once per batch composition)."""

    def __init__(self, params: list[SamplingParams], device):
        self.greedy_all = all(p.temperature == 0 for p in params)
        self.any_greedy = any(p.temperature == 0 for p in params)
        self.greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
        self.temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        self.unit_temp = all(p.temperature in (0, 1) for p in params)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
        self.min_p = torch.tensor([p.min_p for p in params], device=device, dtype=torch.float32)
        self.nucleus_only = all(p.top_k <= 0 and p.top_p < 1 and p.min_p == 0 for p in params)


def draw_uniforms(params: list[SamplingParams], generators: list[torch.Generator], device) -> torch.Tensor:
    """One uniform in (0, 1] per row from the row's own generator (1 for greedy rows, which draw nothing):
    the inverse-CDF draw of ``sample_rows`` and of the fused ``h1r_ops.sample_top_p``."""
    # one rand(1) per sampled row and a single 1 - u over the batch (the values of 1 - rand((), generator=g),
    # with a third of the per-row ops); greedy rows take 1 - 0
    zero = None
    draws = []
    for p, g in zip(params, generators):
        if p.temperature > 0:
            draws.append(torch.rand(1, generator=g, device=device))
        else:
            zero = torch.zeros(1, device=device) if zero is None else zero
            draws.append(zero)
    return torch.rsub(torch.cat(draws), 1.0)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                ws: Workspace | None = None, batch: BatchParams | None = None,
                row_max: torch.Tensor | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of fp32 logits (b, V): argmax for temperature 0, else a draw from the filtered
    distribution by inverse CDF with one uniform from the row's own generator (so a trace's draws do not
    depend on which other traces share the batch). ``ws``: scratch memory reused across calls;
    ``batch``: the tensors of ``params`` if already built; ``row_max``: each row's max logit (b,) if known;
    ``uniform``: the rows' uniforms (b,) if already drawn (``draw_uniforms``)."""
    b, V = logits.shape
    dev = logits.device
    bp = batch or BatchParams(params, dev)
    if bp.greedy_all:
        return logits.argmax(-1)
    if bp.nucleus_only:   # the usual DeepConf case (temperature + top-p): temperature folded into the bucketing
        p = _nucleus_buckets(logits, bp.top_p, ws, None if bp.unit_temp else bp.temp, row_max)
    else:
        x = logits if bp.unit_temp else torch.div(logits, bp.temp[:, None], out=_scratch(ws, "x", logits))
        p = _filtered_probs(x, bp.top_k, bp.top_p, bp.min_p, ws)
    cdf = torch.cumsum(p, -1, out=_scratch(ws, "cdf", p))
    # u in (0, 1]: the first index with cdf >= u * total has a nonzero probability
    u = draw_uniforms(params, generators, dev) if uniform is None else uniform
    j = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).to(cdf.dtype))[:, 0].clamp_(max=V - 1)
    return torch.where(bp.greedy, logits.argmax(-1), j) if bp.any_greedy else j


def topk_logprobs(logits: torch.Tensor, k: int):
    """log_softmax of the raw logits: (top-k values (b, k), their ids (b, k), the full log-probs (b, V))."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if k <= 0:
        return lp[:, :0], torch.empty(lp.shape[0], 0, dtype=torch.long, device=lp.device), lp
    v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return v, i, lp


def raw_logprobs(logits: torch.Tensor, k: int, tokens: torch.Tensor, ws: Workspace | None = None, top=None):
    """Log-probs under log_softmax(logits) (fp32 (b, V)) without materializing them: (top-k values (b, k),
    their ids (b, k), the log-prob of ``tokens`` (b,)). One top-k (or ``top``, the logits' own
    ``topk(max(k, 1))`` if already computed), one exp-sum pass for the normalizer."""
    b, V = logits.shape
    kk = max(1, min(k, V))
    tv, ti = top if top is not None else logits.topk(kk, dim=-1)
    e = torch.sub(logits, tv[:, :1], out=_scratch(ws, "lp_tmp", logits)).exp_()
    lse = tv[:, :1] + e.sum(-1, keepdim=True).log_()
    chosen = (logits.gather(1, tokens[:, None]) - lse)[:, 0]
    if k <= 0:
        return tv[:, :0], ti[:, :0], chosen
    return tv - lse, ti, chosen
def token_confidence(top_logprobs: torch.Tensor) -> torch.Tensor:
    """DeepConf token confidence C_i = -(1/k) sum_j log P_i(j) over the top-k log-probs (b, k) -> (b,)
    (higher = more peaked). The sampled token is not added when outside the top k (the online
    processor's and TensorRT-LLM's convention; vLLM's offline dict may hold k + 1 entries)."""
    if top_logprobs.shape[-1] == 0:
        return torch.zeros(top_logprobs.shape[0], device=top_logprobs.device)
    return -top_logprobs.mean(-1)
