"""Supervised fine-tuning on packed sequences, and the optimizer / schedule / checkpoint machinery that
GRPO shares.

``Trainer.train_step(micro_batches)`` does one optimizer step over this rank's gradient-accumulation
micro-batches: the global response-token count N is all-reduced first, each micro-batch's loss is
``sum of its token losses / N`` (the fused chunked lm-head cross-entropy, reduction='sum'), the grads are
summed over ranks (h1r_ops.train.dist), clipped, and AdamW steps with a linear warm-up + cosine schedule.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import asdict, dataclass

import torch

import h1r_ops

from . import dist


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    total_steps: int = 300
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    bf16: bool = False  # torch.autocast to bf16 (CPU: where the CPU has bf16 support)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: decay on matrices (linears, embeddings, conv), none on vectors (norms, biases, A_log,
    D, dt_bias), as is usual for Mamba2/transformer LMs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``
    at ``total`` (held there after)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def autocast_ctx(enabled: bool, device: torch.device):
    """bf16 autocast on ``device`` when asked for and supported, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cpu" and not torch.backends.mkldnn.is_available():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Trainer:
    """Owns the model, AdamW and the schedule; saves and resumes bit-identically (model, optimizer,
    scheduler, step, RNG states and whatever ``data_state`` the caller passes)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig):
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.sharded = dist.is_sharded(model)
        if not self.sharded:  # (shard_model broadcasts before sharding)
            dist.broadcast_params(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio))
        self.step = 0

    def autocast(self):
        return autocast_ctx(self.cfg.bf16, self.device)

    def _apply_grads(self) -> float:
        """All-reduce (FSDP has already reduce-scattered), clip, step, schedule; returns the (pre-clip)
        global grad norm."""
        if not self.sharded:
            dist.all_reduce_grads(self.params)
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        if hasattr(gn, "full_tensor"):  # a DTensor under FSDP
            gn = gn.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return float(gn)

    # -- checkpoints --------------------------------------------------------------------------------------
    def _states(self):
        """(model, optimizer) state dicts; under FSDP gathered into full tensors (a collective)."""
        if not self.sharded:
            return self.model.state_dict(), self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self, path: str, data_state: dict | None = None) -> None:
        """Rank 0 writes ``path/trainer.pt`` (model, optimizer, scheduler, step, config; full tensors also
        under FSDP); every rank writes ``path/rank{r}.pt`` (its RNG states and ``data_state``)."""
        os.makedirs(path, exist_ok=True)
        model_sd, opt_sd = self._states()
        if dist.rank() == 0:
            torch.save({"model": model_sd, "opt": opt_sd,
                        "sched": self.sched.state_dict(), "step": self.step, "cfg": asdict(self.cfg)},
                       os.path.join(path, "trainer.pt"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"rng": rng, "data": data_state, "world": dist.world_size()},
                   os.path.join(path, f"rank{dist.rank()}.pt"))
        if dist.is_dist():
            torch.distributed.barrier()

    def load(self, path: str) -> dict | None:
        """Restore a :meth:`save` and return this rank's ``data_state``."""
        st = torch.load(os.path.join(path, "trainer.pt"), map_location=self.device, weights_only=False)
        if self.sharded:  # every rank reads the full tensors and keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.opt, model_state_dict=st["model"], optim_state_dict=st["opt"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step = st["step"]
        rk = torch.load(os.path.join(path, f"rank{dist.rank()}.pt"), weights_only=False)
        if rk["world"] != dist.world_size():
            raise ValueError(f"load: checkpoint '{path}' was written by {rk['world']} ranks, this run has "
                             f"{dist.world_size()}")
        torch.set_rng_state(rk["rng"]["torch"])
        random.setstate(rk["rng"]["python"])
        if "cuda" in rk["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rk["rng"]["cuda"])
        return rk["data"]


def response_token_count(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Tokens that carry a loss: labels[:, 1:] != ignore_index (the model predicts labels[:, t] at t-1)."""
    return int((labels[:, 1:] != ignore_index).sum())


def sft_token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum over the batch of -log p(label) on its response tokens, via the fused chunked lm-head CE."""
    h = model.hidden_states(batch["input_ids"], seq_idx=batch.get("seq_idx"))
    hs = h[:, :-1].reshape(-1, h.shape[-1])
    tgt = batch["labels"][:, 1:].reshape(-1)
    return h1r_ops.fused_linear_cross_entropy(hs, model.lm_head_weight, tgt, reduction="sum",
                                              logit_scale=model.config.lm_head_multiplier)


class SFTTrainer(Trainer):
    def accumulate(self, micro_batches: list[dict]) -> dict:
        """Backward over this rank's accumulation micro-batches (dicts of input_ids, labels, seq_idx) with
        each token weighted 1 / (global response-token count); grads are left in ``.grad`` (not reduced).
        Returns the local loss sum and the global token count."""
        self.model.train()
        local = sum(response_token_count(mb["labels"]) for mb in micro_batches)
        n = dist.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64)).item()
        total = torch.zeros((), dtype=torch.float64)
        for i, mb in enumerate(micro_batches):
            if self.sharded:  # FSDP: reduce-scatter once, in the last micro-batch's backward
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            mb = {k: v.to(self.device) for k, v in mb.items()}
            with self.autocast():
                s = sft_token_loss_sum(self.model, mb)
            (s / max(n, 1.0)).backward()
            total += s.detach().double().cpu()
        return {"loss_sum": total, "tokens": n}

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step. Returns loss (the global per-token mean), tokens (global), grad_norm, lr."""
        lr = self.sched.get_last_lr()[0]
        r = self.accumulate(micro_batches)
        gn = self._apply_grads()
        loss = dist.all_reduce_sum(r["loss_sum"]).item() / max(r["tokens"], 1.0)
        return {"loss": loss, "tokens": int(r["tokens"]), "grad_norm": gn, "lr": lr}


@torch.no_grad()
def evaluate_greedy(model, tok, problems, max_new_tokens: int = 64, batch: int = 64, engine: bool = True) -> dict:
    """Greedy-decode each problem's prompt and score the last \\boxed{} against the answer. Returns accuracy
    and mean response length (tokens, EOS included).

    ``engine=True``: all prompts go through the paged continuous-batching engine (h1r_ops.infer.Engine,
    temperature 0, ``batch`` traces at a time, each stops at EOS); else the model's own equal-length batched
    decode (prompts grouped by length, always ``max_new_tokens`` steps). Both take the argmax."""
    from .verifier import boxed_reward

    was_training = model.training
    model.eval()
    prompts = [tok.encode(p.prompt, bos=True) for p in problems]
    outs: list[list[int]] = [None] * len(problems)
    if engine:
        from h1r_ops.infer import Engine, SamplingParams

        eng = Engine(model, None, max_num_seqs=batch, max_model_len=max(map(len, prompts), default=1) + max_new_tokens)
        eng.eos_ids = {tok.eos_token_id}
        res = eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=0))
        outs = [list(r[0].token_ids) for r in res]
    else:
        dev = next(model.parameters()).device
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        for L, idx in by_len.items():
            for s in range(0, len(idx), batch):
                chunk = idx[s:s + batch]
                ids = torch.tensor([prompts[i] for i in chunk], device=dev)
                for i, o in zip(chunk, model.generate_greedy(ids, max_new_tokens)[:, L:].tolist()):
                    outs[i] = o[:o.index(tok.eos_token_id) + 1] if tok.eos_token_id in o else o
    model.train(was_training)
    correct = sum(boxed_reward(tok.decode(o), p.answer) for o, p in zip(outs, problems))
    n = max(1, len(problems))
    return {"accuracy": correct / n, "response_len": sum(map(len, outs)) / n}
