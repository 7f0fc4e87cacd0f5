"""DeepConf (Fu et al., arXiv 2508.15260) on the engine: confidence-weighted voting offline, and online
early stopping of low-confidence traces with adaptive sampling.

Conventions (see ../shared/reference/deepconf_grpo.md; all configurable):
- confidences as in ``confidence.py`` (token C_i over the top-20 raw log-probs, groups of 2048 tokens);
- "keep top eta%" means the online threshold s = percentile(warmup lowest-group confidences, 100 - eta):
  eta = 10 is DeepConf-low (s = 90th percentile), eta = 90 DeepConf-high (s = 10th percentile);
- online, a trace stops at the first token where its last-``window`` mean is < s (checked once the
  window is full, so shorter traces are never stopped online); it costs no extra token;
- online voting (the reference's ``_perform_basic_voting``): warm-up traces vote if their lowest-group
  confidence >= s, later traces if they were not stopped and their lowest-group confidence >= s; the
  vote weight is the lowest-group confidence; traces without a boxed answer do not vote;
- adaptive sampling: after each voting trace, the consensus beta = V(best) / sum_a V(a); generation stops
  when beta >= tau (None: never) or when the budget of traces is spent; traces still running, or finishing
  in the same decode step after the one that reached tau, are aborted (their tokens count, they do not vote);
- offline filtering keeps the traces whose confidence >= percentile(confs, 100 - eta) (the reference's
  ``filter_top_confidence``), then runs the confidence-weighted vote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from .answers import AnswerGroups, extract_answer
from .confidence import (WINDOW, bottom_percent_confidence, lowest_group_confidence, mean_confidence,
                         tail_confidence)
from .sampling import SamplingParams


# ---- voting ------------------------------------------------------------------------------------------
def weighted_vote(answers, weights=None, groups: AnswerGroups | None = None):
    """Confidence-weighted majority: V(a) = sum of the weights of the traces answering a (None answers
    skipped, equivalent answers pooled). Returns (answer or None, {answer: share of the total weight})."""
    groups = groups or AnswerGroups()
    weights = [1.0] * len(answers) if weights is None else weights
    V: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is None:
            continue
        k = groups.key(a)
        V[k] = V.get(k, 0.0) + float(w)
    if not V:
        return None, {}
    best = max(V, key=V.get)   # ties: the answer seen first
    tot = sum(V.values())
    return best, {k: (v / tot if tot > 0 else 0.0) for k, v in sorted(V.items(), key=lambda kv: -kv[1])}


def top_confidence_mask(confs, eta: float) -> np.ndarray:
    """Keep the top eta% by confidence: conf >= percentile(confs, 100 - eta) (linear interpolation)."""
    c = np.asarray(confs, dtype=np.float64)
    if c.size == 0:
        return np.zeros(0, dtype=bool)
    return c >= np.percentile(c, 100.0 - eta)


VOTING_METHODS = ("majority", "mean_confidence_weighted", "tail_confidence_weighted", "bottom_window_weighted",
                  "min_window_weighted", "top{eta}_tail_filtered", "top{eta}_bottom_window_filtered")


def compute_all_voting_results(traces, window: int = WINDOW, tail: int = WINDOW, bottom: float = 0.1,
                               eta: float = 10, groups: AnswerGroups | None = None) -> dict:
    """Every voting method of the reference's ``compute_all_voting_results`` over ``traces`` (objects or
    dicts with ``answer`` and ``confs``): majority; votes weighted by mean / tail / bottom-10% group /
    lowest-group confidence; top-eta% by tail / bottom-10% group confidence then weighted by it.
    Traces without an answer are dropped first. Returns {method: {answer, shares, num_votes}} (answer None
    when nothing votes)."""
    groups = groups or AnswerGroups()
    get = (lambda t, k: t[k]) if traces and isinstance(traces[0], dict) else (lambda t, k: getattr(t, k))
    valid = [t for t in traces if get(t, "answer")]
    answers = [get(t, "answer") for t in valid]
    confs = [get(t, "confs") for t in valid]
    tag = f"{eta:g}".replace(".", "_")
    names = [m.format(eta=tag) for m in VOTING_METHODS]
    if not valid:
        return {m: {"answer": None, "shares": {}, "num_votes": 0} for m in names}
    w = {
        "mean": [mean_confidence(c) for c in confs],
        "tail": [tail_confidence(c, tail) for c in confs],
        "bottom": [bottom_percent_confidence(c, window, bottom) for c in confs],
        "min": [lowest_group_confidence(c, window) for c in confs],
    }

    def vote(ans, wts):
        a, shares = weighted_vote(ans, wts, groups)
        return {"answer": a, "shares": shares, "num_votes": len(ans)}

    out = {names[0]: vote(answers, None), names[1]: vote(answers, w["mean"]), names[2]: vote(answers, w["tail"]),
           names[3]: vote(answers, w["bottom"]), names[4]: vote(answers, w["min"])}
    for name, key in ((names[5], "tail"), (names[6], "bottom")):
        keep = top_confidence_mask(w[key], eta)
        out[name] = vote([a for a, k in zip(answers, keep) if k], [c for c, k in zip(w[key], keep) if k])
    return out


# ---- the driver ----------------------------------------------------------------------------------------
@dataclass
class DeepConfTrace:
    index: int
    phase: str              # "warmup" | "final" | "offline"
    status: str             # "kept" | "dropped" (low confidence) | "pruned" (stopped online) | "aborted" | "no_answer"
    answer: str | None
    confs: list[float]
    num_tokens: int
    finish_reason: str
    min_conf: float
    text: str | None = None


@dataclass
class DeepConfResult:
    answer: str | None
    shares: dict
    mode: str
    threshold: float | None
    traces: list[DeepConfTrace]
    voting: dict = field(default_factory=dict)
    tokens_generated: int = 0
    tokens_without_pruning: float = 0.0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> dict:
        c: dict[str, int] = {}
        for t in self.traces:
            c[t.status] = c.get(t.status, 0) + 1
        return c

    def summary(self) -> str:
        sh = ", ".join(f"{k}: {v:.1%}" for k, v in list(self.shares.items())[:8])
        saved = 1 - self.tokens_generated / self.tokens_without_pruning if self.tokens_without_pruning else 0.0
        lines = [f"answer: {self.answer}", f"vote shares: {sh or '-'}",
                 f"traces: {len(self.traces)} ({', '.join(f'{k} {v}' for k, v in sorted(self.counts().items()))})"]
        if self.threshold is not None:
            lines.append(f"threshold s = {self.threshold:.4f}" + ("; adaptive stop reached" if self.stopped_early else ""))
        lines.append(f"tokens: {self.tokens_generated} generated vs ~{self.tokens_without_pruning:.0f} for the same budget "
                     f"without pruning ({saved:.1%} saved); {self.tokens_per_second:.1f} tokens/s")
        return "\n".join(lines)


def _text(engine, out):
    if out.text is not None:
        return out.text
    return None if engine.tokenizer is None else engine.tokenizer.decode(out.token_ids)


def _run(engine, rid, on_finish, bar=None):
    """Step the engine until request ``rid`` is done; ``on_finish(out)`` returning True aborts the rest."""
    outs, stop = [], False
    while engine.has_unfinished() and not stop:
        for o in engine.step():
            if o.request_id != rid:
                continue
            if bar is not None:
                bar.update(1)
            if stop:   # finished in the same step, after the stop decision: counted as aborted
                o.finish_reason = "aborted"
                outs.append(o)
                continue
            outs.append(o)
            stop = bool(on_finish(o))
    if stop:
        for a in engine.abort(rid):
            outs.append(a)
            if bar is not None:
                bar.update(1)
    return outs


def deepconf(engine, prompt, mode: str = "online", budget: int = 64, warmup: int = 16, eta: float = 10,
             window: int = WINDOW, tau: float | None = 0.95, params: SamplingParams | None = None,
             offline_method: str | None = None, answer_fn=extract_answer, groups: AnswerGroups | None = None,
             use_tqdm: bool = False) -> DeepConfResult:
    """Run DeepConf on one prompt with ``engine`` (an :class:`Engine` or any object with its
    add_request / step / abort / has_unfinished interface).

    mode "offline": ``budget`` traces, every voting method computed; the answer is ``offline_method``
    (default ``top{eta}_bottom_window_filtered``). mode "online": ``warmup`` traces set s (keep top eta%),
    then up to ``budget - warmup`` more with early stop at s and adaptive stop at consensus ``tau``.
    ``params``: sampling (default temperature 0.6, top-p 0.95, as the reference; ``n`` is ignored,
    ``seed`` is the base seed: trace i uses seed + i)."""
    if mode not in ("online", "offline"):
        raise ValueError(f"deepconf: argument 'mode': expected 'online' or 'offline', got {mode!r}")
    if budget < 1 or (mode == "online" and not 1 <= warmup <= budget):
        raise ValueError(f"deepconf: argument 'warmup': expected 1 <= warmup <= budget = {budget}, got {warmup}")
    if not 0 < eta <= 100:
        raise ValueError(f"deepconf: argument 'eta': expected a percentage in (0, 100], got {eta}")
    params = params or SamplingParams(temperature=0.6, top_p=0.95, max_tokens=1024)
    params = replace(params, conf_threshold=None, conf_window=window)
    groups = groups or AnswerGroups()
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget, desc=f"deepconf {mode}", unit="trace")
    t0 = time.perf_counter()
    traces: list[DeepConfTrace] = []

    def record(o, phase, base):
        ans = answer_fn(_text(engine, o))
        t = DeepConfTrace(base + o.index, phase, "kept", ans, list(o.token_confidences), o.num_tokens, o.finish_reason,
                          lowest_group_confidence(o.token_confidences, window), o.text)
        traces.append(t)
        return t

    seed = params.seed
    if mode == "offline":
        rid = engine.add_request(prompt, replace(params, n=budget))
        for o in _run(engine, rid, lambda o: False, bar):
            record(o, "offline", 0)
        traces.sort(key=lambda t: t.index)
        voting = compute_all_voting_results([{"answer": t.answer, "confs": t.confs} for t in traces], window, window,
                                            0.1, eta, groups)
        method = offline_method or f"top{eta:g}_bottom_window_filtered".replace(".", "_")
        if method not in voting:
            raise ValueError(f"deepconf: argument 'offline_method': expected one of {sorted(voting)}, got {method!r}")
        keep_conf = [bottom_percent_confidence(t.confs, window) for t in traces]
        mask = top_confidence_mask(keep_conf, eta)
        for t, k in zip(traces, mask):
            t.status = "no_answer" if t.answer is None else ("kept" if k else "dropped")
        res = DeepConfResult(voting[method]["answer"], voting[method]["shares"], mode, None, traces, voting)
        full = [t.num_tokens for t in traces]
    else:
        rid = engine.add_request(prompt, replace(params, n=warmup))
        for o in _run(engine, rid, lambda o: False, bar):
            record(o, "warmup", 0)
        s = float(np.percentile([t.min_conf for t in traces], 100.0 - eta))
        answers, weights = [], []

        def vote_in(t):
            if t.answer is None:
                t.status = "no_answer"
            elif t.finish_reason == "pruned":
                t.status = "pruned"
            elif t.finish_reason == "aborted":
                t.status = "aborted"
            elif t.min_conf < s:
                t.status = "dropped"
            else:
                answers.append(t.answer)
                weights.append(t.min_conf)
                return True
            return False

        for t in traces:
            vote_in(t)
        stopped = False
        if budget > warmup:
            def consensus():
                _, sh = weighted_vote(answers, weights, groups)
                return max(sh.values()) if sh else 0.0

            if tau is not None and answers and consensus() >= tau:
                stopped = True
            else:
                def on_finish(o):
                    nonlocal stopped
                    t = record(o, "final", warmup)
                    if vote_in(t) and tau is not None and consensus() >= tau:
                        stopped = True
                    return stopped

                final_params = replace(params, n=budget - warmup, conf_threshold=s,
                                       seed=None if seed is None else seed + warmup)
                rid = engine.add_request(prompt, final_params)
                for o in _run(engine, rid, on_finish, bar):
                    if o.finish_reason == "aborted":
                        vote_in(record(o, "final", warmup))
        traces.sort(key=lambda t: t.index)
        ans, shares = weighted_vote(answers, weights, groups)
        res = DeepConfResult(ans, shares, mode, s, traces, stopped_early=stopped)
        full = [t.num_tokens for t in traces if t.finish_reason in ("stop", "length")]
    if bar is not None:
        bar.close()
    res.seconds = time.perf_counter() - t0
    res.tokens_generated = sum(t.num_tokens for t in traces)
    # the same budget without pruning: traces that ran to the end count their length, every other trace of
    # the budget (stopped, aborted or never started) the mean length of those that ran to the end
    mean_full = float(np.mean(full)) if full else 0.0
    res.tokens_without_pruning = sum(full) + (budget - len(full)) * mean_full
    return res
