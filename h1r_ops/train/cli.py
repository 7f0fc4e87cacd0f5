"""``h1r train sft`` / ``h1r train grpo`` / ``h1r train demo``: the two-stage recipe on a tiny Falcon-H1 and
the demo math task.

    h1r train sft  --out runs/sft  --steps 300           # then
    h1r train grpo --out runs/grpo --init runs/sft/model --steps 60
    torchrun --nproc-per-node 2 -m h1r_ops.cli train sft ...          # data parallel (gloo on CPU)
    torchrun --nproc-per-node 2 -m h1r_ops.cli train sft --fsdp ...   # FSDP2 sharding
    h1r train demo                                       # SFT -> GRPO -> eval -> DeepConf, evidence files

Each run writes ``metrics.jsonl`` (one JSON object per step / evaluation), ``curves.png`` (matplotlib if
installed), checkpoints under ``ckpt/`` (``--resume`` continues bit-identically) and ``model/`` (HF format).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from . import dist
from .tasks import CharTokenizer, PackedBatcher, ProblemStream, heldout_problems, make_problem

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, mamba_d_ssm=256, mamba_n_heads=8, mamba_d_head=32,
            mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=64, mamba_rms_norm=True,
            max_position_embeddings=1024, tie_word_embeddings=False)


def tiny_model(vocab_size: int, seed: int = 0, **overrides):
    """A small Falcon-H1 (about 1.5M parameters with the defaults) with GPT-style init (N(0, 0.02), output
    projections scaled by 1/sqrt(2 layers)) and Mamba2's dt init (dt in [1e-3, 0.1], log-uniform)."""
    from h1r_ops.model import FalconH1Config, FalconH1ForCausalLM

    cfg = FalconH1Config(vocab_size=vocab_size, **{**TINY, **overrides})
    torch.manual_seed(seed)
    m = FalconH1ForCausalLM(cfg)
    out_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                p.normal_(0, out_std)
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand_like(p) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith(("A_log", ".D")) or "norm" in name:
                continue
            elif name.endswith("bias"):
                p.zero_()
            elif p.dim() >= 2:
                p.normal_(0, 0.02)
    return m


class Logger:
    """JSONL metrics (rank 0 only) and the final plot."""

    def __init__(self, out: str, resume: bool):
        self.path = os.path.join(out, "metrics.jsonl")
        self.on = dist.rank() == 0
        if self.on:
            os.makedirs(out, exist_ok=True)
            if not resume and os.path.exists(self.path):
                os.remove(self.path)

    def log(self, rec: dict) -> None:
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def plot(self, keys: list[str]) -> None:
        if not self.on:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: skipping the plot (metrics are in", self.path + ")")
            return
        recs = [json.loads(line) for line in open(self.path)]
        keys = [k for k in keys if any(k in r for r in recs)]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in recs if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.tight_layout()
        out = os.path.join(os.path.dirname(self.path), "curves.png")
        fig.savefig(out, dpi=100)
        print("wrote", out)


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, disable=dist.rank() != 0, dynamic_ncols=True)


def _common(ap):
    ap.add_argument("--out", required=True, help="run folder (metrics.jsonl, curves.png, ckpt/, model/)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=200, help="held-out problems per evaluation (0: none)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--fsdp", action="store_true", help="shard parameters, grads and optimizer state with FSDP2 "
                    "(torch.distributed.fsdp.fully_shard) instead of replicating them (needs torchrun)")


def _after_step(args, tr, model, tok, stream, ckpt, logger, pbar, rec, **postfix):
    """Per-step bookkeeping shared by SFT and GRPO: log, progress bar, checkpoint, held-out eval."""
    logger.log(rec)
    if pbar is not None:
        pbar.update(1)
        pbar.set_postfix(**postfix)
    if tr.step % args.save_every == 0 or tr.step == args.steps:
        tr.save(ckpt, {"pos": stream.pos})
    if tr.step % args.eval_every == 0 or tr.step == args.steps:
        _evaluate(model, tok, args.eval_n, logger, tr.step, pbar)


def _finish(args, model, logger, pbar, curves):
    """End of a run: close the bar, save the HF-format model (rank 0), plot the curves, leave the group."""
    if pbar is not None:
        pbar.close()
    full = dist.unsharded_copy(model)  # a collective under FSDP
    if dist.rank() == 0:
        full.save_pretrained(os.path.join(args.out, "model"))
    logger.plot(curves)
    dist.shutdown()


def _setup(args, model):
    """Threads, process group and (``--fsdp``) FSDP2 sharding of ``model``."""
    if args.fsdp:
        if not dist.is_dist():
            raise SystemExit("--fsdp needs several processes: launch with torchrun --nproc-per-node N")
        dist.shard_model(model)
    return model


def _evaluate(model, tok, n, logger, step, pbar=None):
    """Greedy held-out accuracy on rank 0 (the same ``n`` problems at every evaluation of every run)."""
    from .sft import evaluate_greedy

    if n <= 0:
        return None
    model = dist.unsharded_copy(model)  # a collective under FSDP
    if dist.rank() != 0:
        return None
    r = evaluate_greedy(model, tok, heldout_problems(n), max_new_tokens=64)
    logger.log({"step": step, "eval_accuracy": r["accuracy"], "eval_response_len": r["response_len"]})
    msg = f"step {step}: held-out accuracy {r['accuracy']:.3f} ({n} problems), response length {r['response_len']:.1f}"
    (pbar.write if pbar is not None else print)(msg)
    return r


def run_sft(argv) -> int:
    from .sft import OptimConfig, SFTTrainer

    ap = argparse.ArgumentParser(prog="h1r train sft", description="SFT of a tiny Falcon-H1 on the demo math task")
    _common(ap)
    ap.add_argument("--rows", type=int, default=8, help="packed rows per micro-batch (per rank)")
    ap.add_argument("--row-len", type=int, default=256)
    ap.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches per step")
    ap.add_argument("--eval-first", action="store_true", help="also evaluate the untrained model (step 0)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_from_env()
    tok = CharTokenizer()
    model = _setup(args, tiny_model(tok.vocab_size, seed=args.seed))
    cfg = OptimConfig(lr=args.lr or 3e-3, warmup_steps=args.warmup if args.warmup is not None else 20,
                      total_steps=args.steps, bf16=args.bf16)
    tr = SFTTrainer(model, cfg)
    stream = ProblemStream(args.seed, dist.rank(), dist.world_size())
    batcher = PackedBatcher(tok, stream, args.row_len, args.rows)
    ckpt = os.path.join(args.out, "ckpt")
    if args.resume and os.path.exists(os.path.join(ckpt, "trainer.pt")):
        stream.pos = tr.load(ckpt)["pos"]
    logger = Logger(args.out, args.resume)
    nparams = sum(p.numel() for p in model.parameters())
    if dist.rank() == 0:
        print(f"tiny Falcon-H1: {nparams / 1e6:.2f}M parameters, {dist.world_size()} rank(s)")
    if args.eval_first and tr.step == 0:
        _evaluate(model, tok, args.eval_n, logger, 0)
    pbar = _progress(args.steps, tr.step, "sft")
    while tr.step < args.steps:
        t0 = time.perf_counter()
        m = tr.train_step([batcher.next() for _ in range(args.accum)])
        dt = time.perf_counter() - t0
        rec = {"step": tr.step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens": m["tokens"], "tokens_per_s": m["tokens"] / dt}
        _after_step(args, tr, model, tok, stream, ckpt, logger, pbar, rec,
                    loss=f"{m['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    _finish(args, model, logger, pbar, ["loss", "eval_accuracy", "tokens_per_s", "eval_response_len"])
    return 0


def run_grpo(argv) -> int:
    from h1r_ops.model import FalconH1ForCausalLM

    from .grpo import EngineRolloutBackend, GRPOConfig, GRPOTrainer, ModelRolloutBackend
    from .verifier import boxed_reward

    ap = argparse.ArgumentParser(prog="h1r train grpo", description="GRPO with \\boxed{} rewards on the demo task")
    _common(ap)
    ap.add_argument("--init", default=None, help="HF-format model folder (e.g. the SFT run's model/); "
                    "default: a fresh tiny model")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (per rank)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eps-low", type=float, default=0.2)
    ap.add_argument("--eps-high", type=float, default=0.2, help="upper clip (DAPO clip-higher: 0.28)")
    ap.add_argument("--tis-cap", type=float, default=2.0, help="truncated-IS cap C (<= 0 disables)")
    ap.add_argument("--no-std", action="store_true", help="advantages r - mean (no division by the std)")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--entropy-coef", type=float, default=0.0)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--rollout", choices=["engine", "model"], default="engine",
                    help="rollouts from the paged inference engine (its own weights, pushed after every step) or "
                    "from the trainer's module with a plain sampler")
    ap.add_argument("--rollout-dtype", choices=["fp32", "bf16"], default="fp32", help="the engine's weight dtype")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_from_env()
    tok = CharTokenizer()
    model = FalconH1ForCausalLM.from_pretrained(args.init) if args.init else tiny_model(tok.vocab_size, args.seed)
    ref = None
    if args.kl_coef:  # the frozen reference policy (a full copy on every rank)
        import copy

        ref = copy.deepcopy(model).eval().requires_grad_(False)
    model = _setup(args, model)
    cfg = GRPOConfig(lr=args.lr or 2e-4, warmup_steps=args.warmup if args.warmup is not None else 5,
                     total_steps=args.steps, bf16=args.bf16, group_size=args.group_size,
                     prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     scale_adv_by_std=not args.no_std, eps_low=args.eps_low, eps_high=args.eps_high,
                     tis_cap=args.tis_cap if args.tis_cap > 0 else None, kl_coef=args.kl_coef,
                     entropy_coef=args.entropy_coef, ppo_epochs=args.ppo_epochs, minibatches=args.minibatches,
                     seed=args.seed)
    if args.rollout == "engine":
        # the demo's prompts are < 128 characters (= tokens)
        backend = EngineRolloutBackend(model, tok.eos_token_id, max_num_seqs=args.prompts * args.group_size,
                                       max_model_len=128 + args.max_new_tokens,
                                       dtype=torch.bfloat16 if args.rollout_dtype == "bf16" else None)
    else:
        backend = ModelRolloutBackend(model, tok.eos_token_id)
    tr = GRPOTrainer(model, cfg, backend, lambda toks, gold: boxed_reward(tok.decode(toks), gold), ref_model=ref)
    stream = ProblemStream(args.seed + 1, dist.rank(), dist.world_size())
    ckpt = os.path.join(args.out, "ckpt")
    if args.resume and os.path.exists(os.path.join(ckpt, "trainer.pt")):
        stream.pos = tr.load(ckpt)["pos"]
    logger = Logger(args.out, args.resume)
    if tr.step == 0:
        _evaluate(model, tok, args.eval_n, logger, 0)
    pbar = _progress(args.steps, tr.step, "grpo")
    while tr.step < args.steps:
        probs = [next(stream) for _ in range(args.prompts)]
        m = tr.train_step([tok.encode(p.prompt, bos=True) for p in probs], [p.answer for p in probs])
        rec = {"step": tr.step, **{k: m[k] for k in ("loss", "reward", "accuracy", "response_len", "clip_frac",
                                                       "tis_weight", "entropy", "grad_norm", "gen_tokens_per_s")},
               "tokens_per_s": m["tokens"] / m["step_s"]}
        _after_step(args, tr, model, tok, stream, ckpt, logger, pbar, rec,
                    reward=f"{m['reward']:.3f}", len=f"{m['response_len']:.0f}")
    _finish(args, model, logger, pbar, ["reward", "eval_accuracy", "response_len", "loss", "entropy"])
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .demo import main as run_demo

    cmds = {"sft": run_sft, "grpo": run_grpo, "demo": run_demo}
    if not argv or argv[0] not in cmds:
        print("usage: h1r train {sft,grpo,demo} [options]   (h1r train sft --help)")
        return 2
    return cmds[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
