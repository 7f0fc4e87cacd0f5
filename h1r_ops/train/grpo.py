"""GRPO with verifiable rewards on the native model (see h1r_ops.train.losses for the exact loss).

Rollouts come from a :class:`RolloutBackend`: anything that, given prompts, returns G sampled
completions per prompt with the sampler's own per-token log-probs. :class:`EngineRolloutBackend` (the
default of ``h1r train grpo``) samples with the paged, continuous-batching inference engine
(h1r_ops.infer.Engine) on its own copy of the weights, which the trainer pushes after every optimizer
step; :class:`ModelRolloutBackend` is a plain reference sampler on the model's prefill/step decode (one
torch.Generator per sequence, so a sample depends only on its seed, not on batching).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

import h1r_ops

from . import dist
from .losses import grpo_advantages, grpo_token_losses
from .sft import OptimConfig, Trainer


# ----------------------------------------------------------------------------------------------------
# rollouts
# ----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One completion: response token ids (ending with EOS when it stopped) and the sampler's
    log p(token) at the sampling temperature, one per token."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool


class RolloutBackend(Protocol):
    #: temperature of the log-probs ``generate`` reports (None: the sampling temperature). The trainer
    #: recomputes its own log-probs at this temperature for the truncated-IS weights.
    logprobs_temperature: float | None

    def generate(self, prompts: Sequence[Sequence[int]], n: int, *, max_new_tokens: int, temperature: float,
                 seed: int) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids), a list of n Samples per prompt. Sample j of prompt i
        must depend only on (seed, i, j) and the weights."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Take the trainer's current weights (a no-op when the backend shares the module)."""
        ...


def sample_seed(seed: int, prompt: int, j: int) -> int:
    return (seed * 1_000_003 + prompt * 10_007 + j) & 0x7FFF_FFFF_FFFF


class EngineRolloutBackend:
    """Rollouts from the paged, continuous-batching inference engine (:class:`h1r_ops.infer.Engine`).

    The engine decodes its OWN copy of the model (``dtype``: e.g. bf16 rollouts for an fp32 trainer, as
    an RL system's inference server would), so the trainer pushes its weights into it after every
    optimizer step (:meth:`sync_weights`; under FSDP every rank gathers the full parameters first). Each
    prompt is one engine request with ``SamplingParams(n=G, temperature, seed)``; the engine seeds trace j
    with ``seed + j``, so sample j of prompt i uses ``sample_seed(seed, i, j)`` and depends only on
    (seed, i, j) and the weights, not on which traces shared a decode step.

    Log-probs: the engine reports log p(token) under the RAW distribution (log_softmax of the logits,
    temperature 1, vLLM's raw_logprobs), hence ``logprobs_temperature = 1.0``: the trainer compares them
    with its own temperature-1 recompute for truncated importance sampling."""

    logprobs_temperature = 1.0

    def __init__(self, model, eos_token_id: int, max_num_seqs: int = 64, max_model_len: int = 512,
                 block_size: int = 16, dtype: torch.dtype | None = None):
        from h1r_ops.infer import Engine

        full = dist.full_state_dict(model)   # a collective under FSDP
        self.model = type(model)(model.config)
        self.model.load_state_dict(full)
        self.model.requires_grad_(False).eval()
        if dtype is not None:
            self.model.to(dtype)
        self.model.to(next(iter(full.values())).device)
        self.eos = eos_token_id
        self.engine = Engine(self.model, None, max_num_seqs=max_num_seqs, block_size=block_size,
                             max_model_len=max_model_len)
        self.engine.eos_ids = {eos_token_id}
        self.version = 0   # weight pushes so far

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Copy the trainer's current weights into the engine's model (a collective under FSDP: every rank
        calls it). The engine holds no weight-derived cache, so the next step decodes with them."""
        own = self.model.state_dict()
        for k, v in dist.full_state_dict(model).items():
            own[k].copy_(v)
        self.version += 1

    def generate(self, prompts, n, *, max_new_tokens, temperature, seed):
        from h1r_ops.infer import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                 seed=sample_seed(seed, i, 0)) for i in range(len(prompts))]
        outs = self.engine.generate([list(p) for p in prompts], params)
        return [[Sample(list(o.token_ids), list(o.token_logprobs), o.finish_reason == "stop") for o in traces]
                for traces in outs]


class ModelRolloutBackend:
    """Temperature sampling on ``model.prefill`` / ``model.step`` (the trainer's own module).

    Prompts of equal length are decoded together (the model's cache holds equal-length rows); every row
    has its own torch.Generator seeded by :func:`sample_seed`, so results do not depend on the batching.
    A finished row keeps decoding padding that is dropped (simple, not fast: the reference for the engine's
    backend). Its log-probs are at the sampling temperature."""

    logprobs_temperature = None

    def __init__(self, model, eos_token_id: int, max_batch: int = 256):
        self.model, self.eos, self.max_batch = model, eos_token_id, max_batch

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts, n, *, max_new_tokens, temperature, seed):
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        by_len: dict[int, list] = {}
        for i, j in rows:
            by_len.setdefault(len(prompts[i]), []).append((i, j))
        for L, rs in by_len.items():
            for s in range(0, len(rs), self.max_batch):
                chunk = rs[s:s + self.max_batch]
                ids = torch.tensor([list(prompts[i]) for i, _ in chunk], device=dev)
                gens = [torch.Generator(device=dev).manual_seed(sample_seed(seed, i, j)) for i, j in chunk]
                for (i, j), smp in zip(chunk, self._sample(ids, gens, max_new_tokens, temperature)):
                    out[i][j] = smp
        model.train(was_training)
        return out

    def _sample(self, ids, gens, max_new_tokens, temperature):
        model, b = self.model, ids.shape[0]
        cache = model.new_cache(b, ids.shape[1] + max_new_tokens)
        logits = model.prefill(ids, cache)
        toks = [[] for _ in range(b)]
        lps = [[] for _ in range(b)]
        done = [False] * b
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            nxt = torch.stack([torch.multinomial(logp[r].exp(), 1, generator=gens[r])[0] for r in range(b)])
            chosen = logp.gather(1, nxt[:, None])[:, 0]
            for r in range(b):
                if not done[r]:
                    toks[r].append(int(nxt[r]))
                    lps[r].append(float(chosen[r]))
                    done[r] = int(nxt[r]) == self.eos
            if all(done):
                break
            if t + 1 < max_new_tokens:
                logits = model.step(nxt, cache)
        return [Sample(toks[r], lps[r], done[r]) for r in range(b)]


# ----------------------------------------------------------------------------------------------------
# batches of scored rollouts
# ----------------------------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """Right-padded prompt+response rows with everything the loss needs, aligned to the targets
    (position t of the per-token tensors scores input_ids[:, t + 1]).

    input_ids (b, l); mask (b, l - 1) bool: response targets; rollout_logp, adv (b, l - 1) fp32;
    old_logp / tis_old_logp / ref_logp: filled by the trainer when it needs them."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    rollout_logp: torch.Tensor
    adv: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    tis_old_logp: torch.Tensor | None = None

    def __len__(self):
        return self.input_ids.shape[0]

    def slice(self, idx) -> "RolloutBatch":
        f = lambda t: None if t is None else t[idx]  # noqa: E731
        return RolloutBatch(f(self.input_ids), f(self.mask), f(self.rollout_logp), f(self.adv), f(self.old_logp),
                            f(self.ref_logp), f(self.tis_old_logp))


def build_rollout_batch(prompts, samples, advantages, pad_id: int = 0) -> RolloutBatch:
    """prompts: list of token lists; samples[i][j]: Sample; advantages (n_prompts, G)."""
    rows = []
    for i, p in enumerate(prompts):
        for j, s in enumerate(samples[i]):
            rows.append((list(p), s, float(advantages[i, j])))
    L = max(len(p) + len(s.tokens) for p, s, _ in rows)
    b = len(rows)
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L - 1), dtype=torch.bool)
    rl = torch.zeros((b, L - 1))
    adv = torch.zeros((b, L - 1))
    for r, (p, s, a) in enumerate(rows):
        n = len(s.tokens)
        ids[r, :len(p) + n] = torch.tensor(p + s.tokens)
        sl = slice(len(p) - 1, len(p) - 1 + n)  # target t+1 = response token -> position t
        mask[r, sl] = True
        rl[r, sl] = torch.tensor(s.logprobs, dtype=torch.float32)
        adv[r, sl] = a
    return RolloutBatch(ids, mask, rl, adv)


def token_logprobs(model, input_ids, mask, temperature: float, tis_temperature: float | None = None):
    """log p(input_ids[:, t+1] | ..t) and entropy at the sampling temperature, (b, l-1) fp32, through the
    fused chunked lm-head (h1r_ops.fused_linear_logprobs); 0 outside ``mask``. With ``tis_temperature``
    (!= temperature) also the detached log-probs at that temperature from the same hidden states (for the
    truncated-IS weights against an engine that reports log-probs at another temperature)."""
    h = model.hidden_states(input_ids)[:, :-1]
    tgt = torch.where(mask, input_ids[:, 1:], -100)
    lp, ent = h1r_ops.fused_linear_logprobs(h, model.lm_head_weight, tgt, temperature=temperature,
                                             logit_scale=model.config.lm_head_multiplier)
    if tis_temperature is None or tis_temperature == temperature:
        return lp, ent
    with torch.no_grad():
        lp_tis, _ = h1r_ops.fused_linear_logprobs(h.detach(), model.lm_head_weight.detach(), tgt,
                                                  temperature=tis_temperature,
                                                  logit_scale=model.config.lm_head_multiplier)
    return lp, ent, lp_tis


# ----------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------
@dataclass
class GRPOConfig(OptimConfig):
    lr: float = 2e-4
    warmup_steps: int = 5
    total_steps: int = 100
    min_lr_ratio: float = 1.0
    group_size: int = 8  # G rollouts per prompt
    prompts_per_step: int = 8  # per rank
    max_new_tokens: int = 64
    temperature: float = 1.0
    scale_adv_by_std: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.2
    tis_cap: float | None = 2.0
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    minibatches: int = 1  # optimizer steps per epoch over the rollout batch
    micro_batch: int = 32  # sequences per forward
    seed: int = 0


class GRPOTrainer(Trainer):
    """One GRPO iteration = sample G rollouts for each prompt, score them, then ``ppo_epochs`` x
    ``minibatches`` optimizer steps on the token-mean PPO-clip loss with TIS (losses.py)."""

    def __init__(self, model, cfg: GRPOConfig, backend: RolloutBackend, reward_fn: Callable[[list[int], object], float],
                 ref_model=None):
        super().__init__(model, cfg)
        self.backend, self.reward_fn, self.ref_model = backend, reward_fn, ref_model
        self.backend_version: int | None = None   # trainer step of the weights the backend holds
        if cfg.kl_coef and ref_model is None:
            raise ValueError("GRPOTrainer: argument 'ref_model': required when kl_coef != 0")
        self.iteration = 0
        t = getattr(backend, "logprobs_temperature", None)
        # the temperature at which TIS compares the trainer's and the engine's log-probs
        self.tis_temperature = None if t is None or t == cfg.temperature or cfg.tis_cap is None else t

    @torch.no_grad()
    def _score(self, model, batch: RolloutBatch, tis: bool = False):
        """The trainer's log-probs of ``batch`` (b, l-1) at the sampling temperature, and (``tis``) at the
        engine's log-prob temperature, no grad."""
        out, out_tis = [], []
        for s in range(0, len(batch), self.cfg.micro_batch):
            mb = batch.slice(slice(s, s + self.cfg.micro_batch))
            with self.autocast():
                r = token_logprobs(model, mb.input_ids.to(self.device), mb.mask.to(self.device),
                                   self.cfg.temperature, self.tis_temperature if tis else None)
            out.append(r[0].float().cpu())
            if len(r) == 3:
                out_tis.append(r[2].float().cpu())
        return torch.cat(out), (torch.cat(out_tis) if out_tis else None)

    def rollout(self, prompts: list[list[int]], golds: list) -> tuple[RolloutBatch, dict]:
        """G rollouts per prompt from the backend (which holds the weights of the last push), rewards,
        group advantages; returns the batch and rollout statistics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.backend_version is None:   # the first rollout: the backend may hold other weights
            self.push_weights()
        seed = cfg.seed * 1_000_003 + self.iteration * 101 + dist.rank()
        samples = self.backend.generate(prompts, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, seed=seed)
        rewards = torch.tensor([[self.reward_fn(s.tokens, g) for s in ss] for ss, g in zip(samples, golds)])
        adv = grpo_advantages(rewards, cfg.scale_adv_by_std)
        batch = build_rollout_batch(prompts, samples, adv)
        gen_tokens = sum(len(s.tokens) for ss in samples for s in ss)
        stats = {"reward": rewards.sum().item(), "n": rewards.numel(), "gen_tokens": gen_tokens,
                 "finished": sum(s.finished for ss in samples for s in ss), "gen_s": time.perf_counter() - t0}
        return batch, stats

    def update(self, batch: RolloutBatch) -> dict:
        """The optimizer steps on one rollout batch (this rank's share). Each step's token-mean divides by
        the global token count of its minibatch (all ranks)."""
        cfg = self.cfg
        self.model.train()
        on_policy = cfg.ppo_epochs * cfg.minibatches == 1
        if not on_policy:
            batch.old_logp, batch.tis_old_logp = self._score(self.model, batch, tis=True)
        if cfg.kl_coef:
            batch.ref_logp = self._score(self.ref_model, batch)[0]
        agg = {"loss": 0.0, "clip_frac": 0.0, "tis_weight": 0.0, "entropy": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        n_mb = len(batch)
        steps = 0
        for _ in range(cfg.ppo_epochs):
            bounds = torch.linspace(0, n_mb, cfg.minibatches + 1).round().long().tolist()
            for k in range(cfg.minibatches):
                mbatch = batch.slice(slice(bounds[k], bounds[k + 1]))
                n = dist.all_reduce_sum(torch.tensor(float(mbatch.mask.sum()), dtype=torch.float64)).item()
                sums = torch.zeros(5, dtype=torch.float64)
                for s in range(0, len(mbatch), cfg.micro_batch):
                    mb = mbatch.slice(slice(s, s + cfg.micro_batch))
                    loss, st = self.micro_loss(mb)
                    (loss / max(n, 1.0)).backward()
                    sums += torch.tensor([float(loss.detach()), float(st["clip_frac"]), float(st["tis_weight"]),
                                          float(st["entropy"]), 0.0], dtype=torch.float64)
                sums[4] = n
                gn = self._apply_grads()
                dist.all_reduce_sum(sums[:4])
                for i, key in enumerate(["loss", "clip_frac", "tis_weight", "entropy"]):
                    agg[key] += sums[i].item() / max(n, 1.0)
                agg["tokens"] += n
                agg["grad_norm"] += gn
                steps += 1
        return {k: (v / steps if k != "tokens" else v) for k, v in agg.items()}

    def micro_loss(self, mb: RolloutBatch):
        """Sum over this micro-batch of the GRPO token losses (autograd graph attached) and stats."""
        cfg, dev = self.cfg, self.device
        ids, mask = mb.input_ids.to(dev), mb.mask.to(dev)
        on_policy = mb.old_logp is None
        with self.autocast():
            r = token_logprobs(self.model, ids, mask, cfg.temperature, self.tis_temperature if on_policy else None)
        logp, ent = r[0].float(), r[1].float()
        old = logp.detach() if on_policy else mb.old_logp.to(dev)
        if self.tis_temperature is None:
            tis_old = None
        else:
            tis_old = r[2].float() if on_policy else mb.tis_old_logp.to(dev)
        L, st = grpo_token_losses(logp, old, mb.rollout_logp.to(dev), mb.adv.to(dev), mask, eps_low=cfg.eps_low,
                                  eps_high=cfg.eps_high, tis_cap=cfg.tis_cap, kl_coef=cfg.kl_coef,
                                  ref_logp=None if mb.ref_logp is None else mb.ref_logp.to(dev),
                                  entropy_coef=cfg.entropy_coef, entropy=ent, tis_old_logp=tis_old)
        st["entropy"] = (ent.detach() * mask).sum()
        return L.sum(), st

    def train_step(self, prompts, golds) -> dict:
        """Rollouts + update for this rank's prompts; returns global metrics."""
        t0 = time.perf_counter()
        batch, rs = self.rollout(prompts, golds)
        m = self.update(batch)
        self.push_weights()
        g = dist.all_reduce_sum(torch.tensor([rs["reward"], rs["n"], rs["gen_tokens"], rs["finished"]],
                                             dtype=torch.float64)).tolist()
        self.iteration += 1
        dt = time.perf_counter() - t0
        m.update({"reward": g[0] / g[1], "accuracy": g[0] / g[1], "response_len": g[2] / g[1],
                  "finished_frac": g[3] / g[1], "gen_tokens_per_s": g[2] / max(rs["gen_s"], 1e-9),
                  "step_s": dt})
        return m

    def push_weights(self) -> None:
        """Send the current weights to the rollout backend (after every optimizer step, and after a load)."""
        self.backend.sync_weights(self.model)
        self.backend_version = self.step

    def save(self, path, data_state=None):
        super().save(path, {"data": data_state, "iteration": self.iteration})

    def load(self, path):
        st = super().load(path)
        self.iteration = st["iteration"]
        self.push_weights()
        return st["data"]
