"""``h1r train demo``: the whole recipe at toy scale, end to end, with its evidence written to files.

    h1r train demo                    # SFT -> GRPO -> held-out eval -> DeepConf vs majority voting
    h1r train demo --quick            # the same pipeline with tiny step counts (a smoke run)
    h1r train demo --model runs/train_demo/grpo/model --dc-offset 0   # the DeepConf stage alone (no training)

Stages (each a normal ``h1r train`` run under ``--work``, so it can also be resumed or inspected):
  1. SFT of a fresh tiny Falcon-H1 on packed step-by-step solutions (held-out greedy accuracy before,
     during and after);
  2. GRPO from the SFT model with ``\\boxed{}`` rewards, rollouts from the paged inference engine
     (held-out greedy accuracy on the SAME problems at GRPO step 0, i.e. the SFT model, and at the end);
  3. DeepConf on the GRPO model, on 400 held-out problems (400..799) disjoint from the ones its settings
     were chosen on (0..399, ``scripts/deepconf_tuning.py``): ``budget`` sampled traces per problem voted
     by plain majority and by DeepConf offline (top-eta% by bottom-10% window confidence + weighted vote,
     the same traces), and DeepConf online (warm-up traces set the threshold, later traces stop early
     below it, generation stops at consensus tau), for DeepConf-high (eta 90) and DeepConf-low (eta 10):
     accuracy, tokens generated, per-problem paired counts against majority, the paired accuracy difference
     with its 95% interval, and the verdict (beats / matches within DC_MATCH_MARGIN / below).

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


# How the default DeepConf settings were chosen; written into the results file. They were picked on held-out
# problems DC_TUNE (on the GRPO model of the default demo, with ``--model``) by the rule in DC_RULE; the
# demo reports on the next slice, disjoint from it. docs/train_demo/deepconf_tuning.md has the sweep.
DC_TUNE = dict(first=0, problems=400)
DC_RULE = ("grid warm-up {4, 8} x tau {0.9, 0.95}, window 16, budget 16, T = 1; rule fixed before the sweep: the "
           "DeepConf-high (eta 90) online setting with the fewest tokens among those whose accuracy is >= majority's "
           "on the tuning slice, else the most accurate one")
DC_DEFAULTS = dict(dc_budget=16, dc_warmup=8, dc_eta=[90.0, 10.0], dc_tau=0.9, dc_window=16, dc_temperature=1.0)


def _settings_note(args) -> str:
    """Where the DeepConf settings of this run come from (and a warning when the reported slice overlaps
    the tuning slice)."""
    mine = {k: getattr(args, k) for k in DC_DEFAULTS}
    mine["dc_eta"] = [float(e) for e in mine["dc_eta"]]
    if mine != DC_DEFAULTS:
        return "not the demo's tuned defaults (set on the command line or by --quick)"
    a, b = DC_TUNE["first"], DC_TUNE["first"] + DC_TUNE["problems"] - 1
    note = f"the demo's defaults, chosen on held-out problems {a}..{b} ({DC_RULE})"
    if args.dc_offset <= b and args.dc_offset + args.dc_problems - 1 >= a:
        note += "; WARNING: the reported problems overlap that tuning slice"
    return note

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
    ap.add_argument("--dc-problems", type=int, default=400, help="held-out problems for DeepConf vs majority")
    ap.add_argument("--dc-offset", type=int, default=DC_TUNE["first"] + DC_TUNE["problems"],
                    help="first held-out problem of the DeepConf set (the default settings were chosen on problems "
                    f"{DC_TUNE['first']}..{DC_TUNE['first'] + DC_TUNE['problems'] - 1}: report on another slice)")
    ap.add_argument("--dc-budget", type=int, default=DC_DEFAULTS["dc_budget"],
                    help="traces per problem (majority votes all of them)")
    ap.add_argument("--dc-warmup", type=int, default=DC_DEFAULTS["dc_warmup"], help="DeepConf online warm-up traces")
    ap.add_argument("--dc-eta", type=float, nargs="+", default=DC_DEFAULTS["dc_eta"],
                    help="keep top eta%%, one DeepConf run (offline and online) per value; 90: DeepConf-high, "
                    "10: DeepConf-low; the first is the headline")
    ap.add_argument("--dc-tau", type=float, default=DC_DEFAULTS["dc_tau"], help="online consensus that stops a problem")
    ap.add_argument("--dc-window", type=int, default=DC_DEFAULTS["dc_window"],
                    help="confidence window (tokens; traces are ~20-40)")
    ap.add_argument("--dc-temperature", type=float, default=DC_DEFAULTS["dc_temperature"])
    ap.add_argument("--model", help="skip SFT and GRPO: run only the DeepConf stage on this model folder (e.g. "
                    "WORK/grpo/model of an earlier run) and write OUT/deepconf_results.json (demo_results.* untouched)")
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


def _variant_name(eta: float) -> str:
    return {90.0: "DeepConf-high", 10.0: "DeepConf-low"}.get(float(eta), "DeepConf")


# "Matches majority" as the results file judges it: a non-inferiority test on the paired per-problem accuracy
# difference (DeepConf - majority, same problems): the lower end of its 95% confidence interval must lie above
# -DC_MATCH_MARGIN. At 400 problems a 2-point margin is what the interval's half-width (about 1 to 1.5 points for
# the discordant counts seen here) leaves room for; "beats" needs the whole interval above 0.
DC_MATCH_MARGIN = 0.02


def _paired(rows, key) -> dict:
    """Per-problem comparison of ``key`` with majority on the same problems: discordant counts, the exact
    two-sided sign test over them (binomial, p = 1/2), and the accuracy difference with its 95% interval
    (Wald interval of a paired difference of proportions: var = (a + b - (a - b)^2 / n) / n^2) and the verdict
    against majority (``beats`` / ``matches`` within DC_MATCH_MARGIN / ``below``)."""
    from math import comb, sqrt

    a = sum(r[key] and not r["majority"] for r in rows)   # DeepConf right, majority wrong
    b = sum(r["majority"] and not r[key] for r in rows)   # majority right, DeepConf wrong
    n, k = a + b, min(a, b)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    m = max(1, len(rows))
    diff = (a - b) / m
    half = 1.96 * sqrt(max(0.0, a + b - (a - b) ** 2 / m)) / m
    lo, hi = diff - half, diff + half
    verdict = "beats" if lo > 0 else "matches" if lo > -DC_MATCH_MARGIN else "below"
    return {"deepconf_right_majority_wrong": a, "majority_right_deepconf_wrong": b,
            "both_right": sum(r[key] and r["majority"] for r in rows),
            "both_wrong": sum(not r[key] and not r["majority"] for r in rows), "sign_test_p": p,
            "difference": diff, "difference_ci95": [lo, hi], "match_margin": DC_MATCH_MARGIN, "verdict": verdict}


def _verdict_line(d) -> str:
    """One sentence on the headline variant's online run against majority (the issue's claim, judged)."""
    v = _variants(d)[0]
    x, pr = v["online"], v["online"].get("paired")
    if not pr or "verdict" not in pr:
        return ""
    lo, hi = pr["difference_ci95"]
    what = {"beats": "beats majority voting", "matches": "matches majority voting",
            "below": "falls below majority voting"}[pr["verdict"]]
    return (f"**Verdict: {v['name']} online {what}** with {100 * x['tokens_saved_vs_majority']:.0f}% fewer tokens: "
            f"accuracy difference {100 * pr['difference']:+.1f} points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"(matches: the interval's lower end above -{100 * pr['match_margin']:g} points; beats: above 0).")


def _repaired(dc, rows):
    """The results dict ``dc`` with every ``paired`` entry recomputed from its per-problem ``rows`` (for --replot
    of a run written before the interval was reported)."""
    tags = {float(v["eta"]): f"{float(v['eta']):g}".replace(".", "_") for v in _variants(dc)}
    for v in dc.get("variants", []):
        for mode in ("offline", "online"):
            key = f"{mode}_{tags[float(v['eta'])]}"
            if rows and key in rows[0]:
                v[mode]["paired"] = _paired(rows, key)
    if dc.get("variants"):
        dc["deepconf_offline"], dc["deepconf_online"] = dc["variants"][0]["offline"], dc["variants"][0]["online"]
    return dc


def _deepconf_stage(args, model_dir):
    """Majority vs DeepConf offline vs DeepConf online, for each ``--dc-eta``, on held-out problems
    ``dc_offset .. dc_offset + dc_problems - 1``.

    Per problem: ``budget`` traces (seed of problem i: seed * 7919 + 1000 i, trace j: + j) voted by plain
    majority and, for each eta, by DeepConf offline (top-eta% by bottom-10% window confidence, weighted vote:
    the same traces); then, for each eta, DeepConf online from the same seeds (its warm-up traces are the
    first ``warmup`` of those)."""
    from h1r_ops.infer import Engine, SamplingParams, compute_all_voting_results, deepconf
    from h1r_ops.model import FalconH1ForCausalLM

    from .cli import _progress
    from .tasks import CharTokenizer, heldout_problems
    from .verifier import answers_match

    tok = CharTokenizer()
    model = FalconH1ForCausalLM.from_pretrained(model_dir)
    eng = Engine(model, tok, max_num_seqs=args.dc_budget, max_model_len=128 + 64)
    etas = [float(e) for e in args.dc_eta]
    tags = [f"{e:g}".replace(".", "_") for e in etas]
    rows, secs = [], {"offline": 0.0, **{t: 0.0 for t in tags}}
    bar = _progress(args.dc_problems, 0, "deepconf")
    probs = heldout_problems(args.dc_offset + args.dc_problems)[args.dc_offset:]
    for k, p in enumerate(probs):
        ids = tok.encode(p.prompt, bos=True)
        sp = SamplingParams(temperature=args.dc_temperature, max_tokens=64, logprobs=20,
                            seed=args.seed * 7919 + 1000 * (args.dc_offset + k))
        t0 = time.perf_counter()
        off = deepconf(eng, ids, mode="offline", budget=args.dc_budget, eta=etas[0], window=args.dc_window, params=sp)
        secs["offline"] += time.perf_counter() - t0
        traces = [{"answer": t.answer, "confs": t.confs} for t in off.traces]
        row = {"problem": args.dc_offset + k, "gold": p.answer, "tokens_all": off.tokens_generated,
               "majority": answers_match(off.voting["majority"]["answer"], p.answer),
               "trace_accuracy": sum(answers_match(t.answer, p.answer) for t in off.traces) / len(off.traces)}
        for eta, tag in zip(etas, tags):
            voting = off.voting if eta == etas[0] else compute_all_voting_results(
                traces, args.dc_window, args.dc_window, 0.1, eta)
            row[f"offline_{tag}"] = answers_match(voting[f"top{tag}_bottom_window_filtered"]["answer"], p.answer)
            t0 = time.perf_counter()
            on = deepconf(eng, ids, mode="online", budget=args.dc_budget, warmup=args.dc_warmup, eta=eta,
                          window=args.dc_window, tau=args.dc_tau, params=sp)
            secs[tag] += time.perf_counter() - t0
            row[f"online_{tag}"] = answers_match(on.answer, p.answer)
            row[f"tokens_online_{tag}"] = on.tokens_generated
            row[f"traces_online_{tag}"] = len(on.traces)
            row[f"pruned_online_{tag}"] = sum(t.finish_reason == "pruned" for t in on.traces)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    n = max(1, len(rows))

    def acc(key):
        return sum(r[key] for r in rows) / n

    tok_all = sum(r["tokens_all"] for r in rows)
    variants = []
    for eta, tag in zip(etas, tags):
        tok_on = sum(r[f"tokens_online_{tag}"] for r in rows)
        variants.append({
            "name": _variant_name(eta), "eta": eta,
            "offline": {"accuracy": acc(f"offline_{tag}"), "tokens": tok_all,
                        "method": f"top{tag}_bottom_window_filtered", "paired": _paired(rows, f"offline_{tag}")},
            "online": {"accuracy": acc(f"online_{tag}"), "tokens": tok_on,
                       "tokens_saved_vs_majority": 1 - tok_on / max(1, tok_all),
                       "mean_traces": sum(r[f"traces_online_{tag}"] for r in rows) / n,
                       "pruned_traces": sum(r[f"pruned_online_{tag}"] for r in rows),
                       "paired": _paired(rows, f"online_{tag}"), "seconds": secs[tag]},
        })
    return {
        "problems": len(rows), "first_problem": args.dc_offset, "budget": args.dc_budget, "warmup": args.dc_warmup,
        "tau": args.dc_tau, "window": args.dc_window, "temperature": args.dc_temperature,
        "settings_chosen_on": _settings_note(args),
        "single_trace_accuracy": acc("trace_accuracy"),
        "majority": {"accuracy": acc("majority"), "tokens": tok_all, "seconds": secs["offline"]},
        "variants": variants,
        # the headline variant (the first --dc-eta) under the keys of earlier results files
        "eta": etas[0], "deepconf_offline": variants[0]["offline"], "deepconf_online": variants[0]["online"],
        "per_problem": rows,
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
        maj = dc["majority"]
        names, accs, toks, colors = ["majority"], [100 * maj["accuracy"]], [maj["tokens"]], ["tab:gray"]
        for v, c in zip(_variants(dc), ("tab:green", "tab:purple", "tab:olive")):
            short = v["name"].replace("DeepConf-", "") if v["name"] != "DeepConf" else f"eta {v['eta']:g}"
            for mode in ("offline", "online"):
                names.append(f"{short}\n{mode}")
                accs.append(100 * v[mode]["accuracy"])
                toks.append(v[mode]["tokens"])
                colors.append(c)
        a2 = ax[1, 2]
        bars = a2.bar(names, accs, color=colors, alpha=0.85)
        for b, acc, t in zip(bars, accs, toks):
            a2.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{acc:.1f}%\n{t / 1000:.0f}k tok",
                    ha="center", fontsize=7)
        a2.set(title=f"voting {dc['budget']} traces x {dc['problems']} held-out problems: accuracy (%)",
               ylim=(0, 115))
        a2.title.set_fontsize(9)
        a2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _variants(dc) -> list:
    """The DeepConf variants of a results dict (results files before variants: the one eta they ran)."""
    if "variants" in dc:
        return dc["variants"]
    return [{"name": _variant_name(dc["eta"]), "eta": dc["eta"], "offline": dc["deepconf_offline"],
             "online": dc["deepconf_online"]}]


def _deepconf_markdown(d) -> list:
    """The DeepConf rows and notes of the results markdown."""
    maj, first = d["majority"], d.get("first_problem", 0)
    lines = [
        f"DeepConf on held-out problems {first}..{first + d['problems'] - 1} ({d['problems']} problems, GRPO model), "
        f"{d['budget']} sampled traces each (T = {d['temperature']:g}); online: warm-up {d['warmup']}, tau {d['tau']}, "
        f"window {d['window']}. Paired = problems DeepConf gets right and majority wrong / the reverse "
        "(exact two-sided sign test p over those).",
        "",
        "| method | accuracy | tokens generated | paired vs majority (DC right only / majority right only, p; "
        "difference [95% interval], points) |",
        "|---|---|---|---|",
        f"| one trace alone (mean over the traces) | {100 * d['single_trace_accuracy']:.1f}% | - | - |",
        f"| majority vote over {d['budget']} traces | **{100 * maj['accuracy']:.1f}%** | {maj['tokens']:,} | - |",
    ]
    for v in _variants(d):
        for mode in ("offline", "online"):
            x = v[mode]
            what = (f"{v['name']} offline (top {v['eta']:g}% by bottom-10% window confidence, weighted vote, "
                    "same traces)" if mode == "offline" else f"{v['name']} online (eta {v['eta']:g})")
            tokens = f"{x['tokens']:,}"
            if mode == "online":
                tokens += (f" (**{100 * x['tokens_saved_vs_majority']:.0f}% fewer**; {x['mean_traces']:.1f} traces per "
                           f"problem, {x['pruned_traces']} stopped early)")
            pr = x.get("paired")
            paired = (f"{pr['deepconf_right_majority_wrong']} / {pr['majority_right_deepconf_wrong']}, "
                      f"p = {pr['sign_test_p']:.2f}" if pr else "-")
            if pr and "difference_ci95" in pr:
                lo, hi = pr["difference_ci95"]
                paired += f"; {100 * pr['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            lines.append(f"| {what} | **{100 * x['accuracy']:.1f}%** | {tokens} | {paired} |")
    lines += [
        "",
        f"DeepConf settings: {d.get('settings_chosen_on', 'see the command')}. Majority and DeepConf offline vote "
        "over the same traces; online DeepConf generates its own from the same seeds (its warm-up traces are the "
        "first ones of those), stopping traces whose windowed confidence falls below the warm-up threshold and "
        "stopping a problem once the confidence-weighted consensus reaches tau.",
    ]
    verdict = _verdict_line(d)
    return lines + (["", verdict] if verdict else [])


def _markdown(r) -> str:
    s, g, d = r["sft"], r["grpo"], r["deepconf"]
    return "\n".join([
        "# h1r train demo: results",
        "",
        f"Written by `h1r train demo` on {r['machine']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}), {r['seconds']['total'] / 60:.1f} min "
        f"in all. Tiny Falcon-H1 ({r['params_m']:.2f}M parameters), char tokenizer, the demo math task.",
        "",
        "| stage | held-out greedy accuracy |",
        "|---|---|",
        f"| untrained model ({s['eval_n']} problems) | {100 * s['accuracy_before']:.1f}% |",
        f"| SFT, {s['steps']} steps | **{100 * s['accuracy']:.1f}%** |",
        f"| GRPO step 0 (= the SFT model), same {g['eval_n']} problems | {100 * g['accuracy_before']:.1f}% |",
        f"| GRPO, {g['steps']} steps ({g['prompts']} prompts x {g['group_size']} engine rollouts) "
        f"| **{100 * g['accuracy_after']:.1f}%** ({100 * g['delta']:+.1f} points) |",
        "",
        *_deepconf_markdown(d),
        "",
        f"Stage times: SFT {'(reused from an earlier run) ' if s['reused_earlier_run'] else ''}{r['seconds']['sft']:.0f} s, GRPO {r['seconds']['grpo']:.0f} s, DeepConf "
        f"{r['seconds']['deepconf']:.0f} s. Curves: `demo_curves.png`; every step: `demo_metrics.jsonl`.",
        "",
    ])


def _deepconf_only(args) -> int:
    """``--model``: the DeepConf stage alone on a trained model, to OUT/deepconf_results.json."""
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    dc = _deepconf_stage(args, args.model)
    res = {"command": "h1r train demo " + " ".join(args.argv), "model": args.model, "threads": args.threads,
           "seconds": time.perf_counter() - t0, "deepconf": dc}
    with open(os.path.join(args.out, "deepconf_results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(_deepconf_markdown(dc)))
    print(f"DeepConf stage: {res['seconds']:.0f} s")
    return 0


def main(argv=None) -> int:
    from .cli import run_grpo, run_sft, tiny_model
    from .tasks import CharTokenizer

    args = _args(argv)
    args.argv = list(argv or [])
    if args.model:
        return _deepconf_only(args)
    if args.replot:
        res = json.load(open(os.path.join(args.out, "demo_results.json")))
        rows = [r for r in _read(os.path.join(args.out, "demo_metrics.jsonl")) if r.get("stage") == "deepconf"]
        if rows and rows[0].get("per_problem"):
            res["deepconf"] = _repaired(res["deepconf"], rows[0]["per_problem"])
            with open(os.path.join(args.out, "demo_results.json"), "w") as f:
                json.dump(res, f, indent=2)
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
        f.write(json.dumps({"stage": "deepconf", **dc}) + "\n")
    res["deepconf"] = {k: v for k, v in dc.items() if k != "per_problem"}   # per problem: demo_metrics.jsonl
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
