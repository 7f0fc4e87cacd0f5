"""``h1r train demo``: the whole recipe at toy scale, end to end, with its evidence written to files.

    h1r train demo                    # SFT -> GRPO -> held-out eval -> DeepConf vs majority voting
    h1r train demo --quick            # the same pipeline with tiny step counts (a smoke run)

Stages (each a normal ``h1r train`` run under ``--work``, so it can also be resumed or inspected):
  1. SFT of a fresh tiny Falcon-H1 on packed step-by-step solutions (held-out greedy accuracy before,
     during and after);
  2. GRPO from the SFT model with ``\\boxed{}`` rewards, rollouts from the paged inference engine
     (held-out greedy accuracy on the SAME problems at GRPO step 0, i.e. the SFT model, and at the end);
  3. DeepConf on the GRPO model, on held-out problems: ``budget`` sampled traces per problem voted by
     plain majority, DeepConf offline (top-eta% lowest-window confidence filter + weighted vote, the same
     traces), and DeepConf online (warm-up traces set the threshold, later traces stop early below it,
     generation stops at consensus tau): accuracy and tokens generated of each.

Writes to ``--out``: ``demo_results.json`` and ``demo_results.md`` (the figures), ``demo_metrics.jsonl``
(every step and evaluation of every stage, with a ``stage`` field: loss, reward, accuracy, tokens/s,
response length) and ``demo_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

QUICK = dict(sft_steps=4, grpo_steps=2, eval_n=8, dc_problems=2, dc_budget=4, dc_warmup=2, prompts=2, group_size=4,
             rows=2, eval_every=2)


def _args(argv):
    ap = argparse.ArgumentParser(prog="h1r train demo", description="SFT -> GRPO -> eval -> DeepConf vs majority, "
                                 "with results, metrics and a plot written to --out")
    ap.add_argument("--out", default="docs/train_demo", help="where the results, metrics and plot go")
    ap.add_argument("--work", default="runs/train_demo", help="the stages' run folders (checkpoints, models)")
    ap.add_argument("--sft-steps", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=8, help="SFT packed rows of 256 tokens per step")
    ap.add_argument("--grpo-steps", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=16, help="GRPO prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="GRPO rollouts per prompt")
    ap.add_argument("--grpo-lr", type=float, default=7e-5)
    ap.add_argument("--eval-n", type=int, default=400, help="held-out problems of every greedy evaluation")
    ap.add_argument("--eval-every", type=int, default=250, help="SFT steps between evaluations (GRPO: a quarter)")
    ap.add_argument("--dc-problems", type=int, default=80, help="held-out problems for DeepConf vs majority")
    ap.add_argument("--dc-budget", type=int, default=16, help="traces per problem (majority votes all of them)")
    ap.add_argument("--dc-offset", type=int, default=0, help="first held-out problem of the DeepConf set (tune the "
                    "DeepConf settings on another slice than the one reported)")
    ap.add_argument("--dc-warmup", type=int, default=8, help="DeepConf online warm-up traces")
    ap.add_argument("--dc-eta", type=float, default=50, help="keep top eta%% (90: DeepConf-high, 10: -low)")
    ap.add_argument("--dc-tau", type=float, default=0.95, help="online consensus that stops a problem")
    ap.add_argument("--dc-window", type=int, default=16, help="confidence window (tokens; traces are ~20-40)")
    ap.add_argument("--dc-temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model gains little from more; "
                    "on a busy machine OpenMP barriers make 2 threads several times slower than 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny step counts (smoke run of the pipeline)")
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/demo_curves.png and rewrite "
                    "OUT/demo_results.md from the files of the last run (WORK's metrics, OUT/demo_results.json)")
    ap.add_argument("--reuse-sft", action="store_true", help="keep WORK/sft when it holds a finished SFT run of "
                    "--sft-steps steps (re-run only GRPO and DeepConf)")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def _read(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _deepconf_stage(args, model_dir):
    """Majority vs DeepConf offline vs DeepConf online on ``dc_problems`` held-out problems."""
    from h1r_ops.infer import Engine, SamplingParams, deepconf
    from h1r_ops.model import FalconH1ForCausalLM

    from .cli import _progress
    from .tasks import CharTokenizer, heldout_problems
    from .verifier import answers_match

    tok = CharTokenizer()
    model = FalconH1ForCausalLM.from_pretrained(model_dir)
    eng = Engine(model, tok, max_num_seqs=args.dc_budget, max_model_len=128 + 64)
    eta_tag = f"{args.dc_eta:g}".replace(".", "_")
    offline_key = f"top{eta_tag}_bottom_window_filtered"
    rows = []
    bar = _progress(args.dc_problems, 0, "deepconf")
    probs = heldout_problems(args.dc_offset + args.dc_problems)[args.dc_offset:]
    for k, p in enumerate(probs):
        ids = tok.encode(p.prompt, bos=True)
        sp = SamplingParams(temperature=args.dc_temperature, max_tokens=64, logprobs=20, seed=args.seed * 7919 + 1000 * k)
        off = deepconf(eng, ids, mode="offline", budget=args.dc_budget, eta=args.dc_eta, window=args.dc_window,
                       params=sp)
        on = deepconf(eng, ids, mode="online", budget=args.dc_budget, warmup=args.dc_warmup, eta=args.dc_eta,
                      window=args.dc_window, tau=args.dc_tau, params=sp)
        rows.append({
            "gold": p.answer,
            "majority": off.voting["majority"]["answer"], "offline": off.voting[offline_key]["answer"],
            "online": on.answer, "tokens_all": off.tokens_generated, "tokens_online": on.tokens_generated,
            "traces_online": len(on.traces), "pruned_online": sum(t.finish_reason == "pruned" for t in on.traces),
            "trace_accuracy": sum(answers_match(t.answer, p.answer) for t in off.traces) / len(off.traces),
        })
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    n = len(rows)

    def acc(key):
        return sum(answers_match(r[key], r["gold"]) for r in rows) / max(1, n)

    tok_all = sum(r["tokens_all"] for r in rows)
    tok_on = sum(r["tokens_online"] for r in rows)
    return {
        "problems": n, "first_problem": args.dc_offset, "budget": args.dc_budget, "warmup": args.dc_warmup, "eta": args.dc_eta, "tau": args.dc_tau,
        "window": args.dc_window, "temperature": args.dc_temperature,
        "single_trace_accuracy": sum(r["trace_accuracy"] for r in rows) / max(1, n),
        "majority": {"accuracy": acc("majority"), "tokens": tok_all},
        "deepconf_offline": {"accuracy": acc("offline"), "tokens": tok_all, "method": offline_key},
        "deepconf_online": {"accuracy": acc("online"), "tokens": tok_on,
                            "tokens_saved_vs_majority": 1 - tok_on / max(1, tok_all),
                            "mean_traces": sum(r["traces_online"] for r in rows) / max(1, n),
                            "pruned_traces": sum(r["pruned_online"] for r in rows)},
    }


def _plot(path, sft, grpo, dc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    s = [r for r in sft if "loss" in r]
    ax[0, 0].plot([r["step"] for r in s], [r["loss"] for r in s])
    ax[0, 0].set(title="SFT loss (per response token)", xlabel="SFT step", yscale="log")
    ev = [r for r in sft if "eval_accuracy" in r]
    ax[0, 1].plot([r["step"] for r in ev], [100 * r["eval_accuracy"] for r in ev], marker="o")
    ax[0, 1].set(title="SFT: held-out greedy accuracy (%)", xlabel="SFT step", ylim=(0, 100))
    g = [r for r in grpo if "reward" in r]
    gev = [r for r in grpo if "eval_accuracy" in r]
    ax[0, 2].plot([r["step"] for r in gev], [100 * r["eval_accuracy"] for r in gev], marker="o", color="tab:red",
                  label="held-out greedy accuracy")
    if g:
        steps, rew = [r["step"] for r in g], [100 * r["reward"] for r in g]
        k = max(1, len(rew) // 10)
        smooth = [sum(rew[max(0, i - k + 1):i + 1]) / len(rew[max(0, i - k + 1):i + 1]) for i in range(len(rew))]
        ax[0, 2].plot(steps, rew, alpha=0.25, color="tab:blue")
        ax[0, 2].plot(steps, smooth, color="tab:blue", label=f"train reward (T=1 rollouts, mean of {k})")
        ax[1, 0].plot(steps, [r["response_len"] for r in g])
    ax[0, 2].set(title="GRPO: accuracy and reward (%)", xlabel="GRPO step", ylim=(0, 100))
    ax[0, 2].legend(loc="lower right")
    ax[1, 0].set(title="GRPO response length (tokens)", xlabel="GRPO step")
    ax[1, 1].plot([r["step"] for r in s], [r["tokens_per_s"] for r in s], label="SFT train tokens/s")
    if g:
        ax[1, 1].plot([r["step"] for r in g], [r["gen_tokens_per_s"] for r in g], label="GRPO rollout tokens/s (engine)")
        ax[1, 1].plot([r["step"] for r in g], [r["tokens_per_s"] for r in g], label="GRPO update tokens/s")
    ax[1, 1].set(title="throughput (tokens/s)", xlabel="step of its stage", yscale="log")
    ax[1, 1].legend(fontsize=8)
    if dc:
        names = ["majority", "DeepConf\noffline", "DeepConf\nonline"]
        keys = ["majority", "deepconf_offline", "deepconf_online"]
        accs = [100 * dc[k]["accuracy"] for k in keys]
        toks = [dc[k]["tokens"] for k in keys]
        a2 = ax[1, 2]
        bars = a2.bar(names, accs, color=["tab:gray", "tab:blue", "tab:green"])
        for b, acc, t in zip(bars, accs, toks):
            a2.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{acc:.1f}%\n{t} tokens", ha="center",
                    fontsize=9)
        a2.set(title=f"voting, {dc['budget']} traces x {dc['problems']} held-out problems: accuracy (%)",
               ylim=(0, 115))
        a2.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(r) -> str:
    s, g, d = r["sft"], r["grpo"], r["deepconf"]
    on, off, maj = d["deepconf_online"], d["deepconf_offline"], d["majority"]
    return "\n".join([
        "# h1r train demo: results",
        "",
        f"Written by `h1r train demo` on {r['machine']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}), {r['seconds']['total'] / 60:.1f} min "
        f"in all. Tiny Falcon-H1 ({r['params_m']:.2f}M parameters), char tokenizer, the demo math task.",
        "",
        "| stage | figure |",
        "|---|---|",
        f"| untrained model, held-out greedy accuracy ({s['eval_n']} problems) | {100 * s['accuracy_before']:.1f}% |",
        f"| SFT, {s['steps']} steps: held-out greedy accuracy | **{100 * s['accuracy']:.1f}%** |",
        f"| GRPO step 0 (= the SFT model), same {g['eval_n']} problems | {100 * g['accuracy_before']:.1f}% |",
        f"| GRPO, {g['steps']} steps ({g['prompts']} prompts x {g['group_size']} engine rollouts): held-out greedy accuracy "
        f"| **{100 * g['accuracy_after']:.1f}%** ({100 * g['delta']:+.1f} points) |",
        f"| DeepConf, held-out problems {d.get('first_problem', 0)}..{d.get('first_problem', 0) + d['problems'] - 1}, "
        f"{d['budget']} traces each (T = {d['temperature']}): one trace alone | {100 * d['single_trace_accuracy']:.1f}% |",
        f"| majority vote over {d['budget']} traces | {100 * maj['accuracy']:.1f}%, {maj['tokens']} tokens generated |",
        f"| DeepConf offline ({off['method']}, same traces) | {100 * off['accuracy']:.1f}%, {off['tokens']} tokens |",
        f"| DeepConf online (warm-up {d['warmup']}, eta {d['eta']:g}, tau {d['tau']}, window {d['window']}) "
        f"| **{100 * on['accuracy']:.1f}%, {on['tokens']} tokens ({100 * on['tokens_saved_vs_majority']:.0f}% fewer "
        f"than majority)**, {on['mean_traces']:.1f} traces per problem, {on['pruned_traces']} stopped early |",
        "",
        "The DeepConf settings (warm-up, eta, window) were chosen on held-out problems 100..179, not on the "
        "problems reported here. Majority and DeepConf offline vote over the same traces; online DeepConf "
        "generates its own (same seeds), stopping traces whose windowed confidence falls below the warm-up "
        "threshold and stopping a problem once the confidence-weighted consensus reaches tau.",
        "",
        f"Stage times: SFT {'(reused from an earlier run) ' if s['reused_earlier_run'] else ''}{r['seconds']['sft']:.0f} s, GRPO {r['seconds']['grpo']:.0f} s, DeepConf "
        f"{r['seconds']['deepconf']:.0f} s. Curves: `demo_curves.png`; every step: `demo_metrics.jsonl`.",
        "",
    ])


def main(argv=None) -> int:
    from .cli import run_grpo, run_sft, tiny_model
    from .tasks import CharTokenizer

    args = _args(argv)
    if args.replot:
        res = json.load(open(os.path.join(args.out, "demo_results.json")))
        _plot(os.path.join(args.out, "demo_curves.png"), _read(os.path.join(args.work, "sft", "metrics.jsonl")),
              _read(os.path.join(args.work, "grpo", "metrics.jsonl")), res["deepconf"])
        with open(os.path.join(args.out, "demo_results.md"), "w") as f:
            f.write(_markdown(res))
        return 0
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    sft_dir, grpo_dir = os.path.join(args.work, "sft"), os.path.join(args.work, "grpo")
    common = ["--threads", str(args.threads), "--eval-n", str(args.eval_n), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    sft_done = [r for r in _read(os.path.join(sft_dir, "metrics.jsonl")) if r.get("step") == args.sft_steps]
    reused = bool(args.reuse_sft and sft_done and os.path.exists(os.path.join(sft_dir, "model", "config.json")))
    if reused:
        print(f"reusing the SFT run in {sft_dir}")
    else:
        run_sft(["--out", sft_dir, "--steps", str(args.sft_steps), "--rows", str(args.rows), "--eval-every",
                 str(args.eval_every), "--save-every", str(args.sft_steps), "--eval-first", *common])
    t1 = time.perf_counter()
    run_grpo(["--out", grpo_dir, "--init", os.path.join(sft_dir, "model"), "--steps", str(args.grpo_steps),
              "--prompts", str(args.prompts), "--group-size", str(args.group_size), "--lr", str(args.grpo_lr),
              "--eval-every", str(max(1, args.grpo_steps // 4)), "--save-every", str(args.grpo_steps), *common])
    t2 = time.perf_counter()
    dc = _deepconf_stage(args, os.path.join(grpo_dir, "model"))
    t3 = time.perf_counter()

    sft, grpo = _read(os.path.join(sft_dir, "metrics.jsonl")), _read(os.path.join(grpo_dir, "metrics.jsonl"))
    sft_ev = [r for r in sft if "eval_accuracy" in r]
    grpo_ev = [r for r in grpo if "eval_accuracy" in r]
    res = {
        "command": "h1r train demo " + " ".join(argv or []),
        "machine": f"{platform.machine()} CPU", "threads": args.threads,
        "params_m": sum(p.numel() for p in tiny_model(CharTokenizer().vocab_size).parameters()) / 1e6,
        "seconds": {"sft": t1 - t0, "grpo": t2 - t1, "deepconf": t3 - t2, "total": t3 - t0},
        "sft": {"steps": args.sft_steps, "eval_n": args.eval_n, "reused_earlier_run": reused, "accuracy_before": sft_ev[0]["eval_accuracy"],
                "accuracy": sft_ev[-1]["eval_accuracy"], "final_loss": [r for r in sft if "loss" in r][-1]["loss"],
                "eval_curve": [[r["step"], r["eval_accuracy"]] for r in sft_ev]},
        "grpo": {"steps": args.grpo_steps, "eval_n": args.eval_n, "prompts": args.prompts,
                 "group_size": args.group_size, "rollouts": "h1r_ops.infer.Engine (weights pushed every step)",
                 "accuracy_before": grpo_ev[0]["eval_accuracy"], "accuracy_after": grpo_ev[-1]["eval_accuracy"],
                 "delta": grpo_ev[-1]["eval_accuracy"] - grpo_ev[0]["eval_accuracy"],
                 "eval_curve": [[r["step"], r["eval_accuracy"]] for r in grpo_ev],
                 "train_reward_first_10": _mean([r["reward"] for r in grpo if "reward" in r][:10]),
                 "train_reward_last_10": _mean([r["reward"] for r in grpo if "reward" in r][-10:])},
        "deepconf": dc,
    }
    with open(os.path.join(args.out, "demo_metrics.jsonl"), "w") as f:
        for stage, recs in (("sft", sft), ("grpo", grpo)):
            for r in recs:
                f.write(json.dumps({"stage": stage, **r}) + "\n")
        f.write(json.dumps({"stage": "deepconf", **{k: v for k, v in dc.items()}}) + "\n")
    with open(os.path.join(args.out, "demo_results.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = _markdown(res)
    with open(os.path.join(args.out, "demo_results.md"), "w") as f:
        f.write(md)
    try:
        _plot(os.path.join(args.out, "demo_curves.png"), sft, grpo, dc)
    except ImportError:
        print("matplotlib is not installed: no demo_curves.png (pip install matplotlib)")
    print(md)
    return 0


def _mean(xs):
    return sum(xs) / len(xs) if xs else None
