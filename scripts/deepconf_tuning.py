"""Choose the demo's DeepConf settings on held-out problems disjoint from the ones the demo reports.

    python scripts/deepconf_tuning.py --model runs/train_demo/grpo/model --runs runs/dc_tuning

Runs the DeepConf stage of ``h1r train demo`` (``--model``: no training) on the tuning slice
(``h1r_ops.train.demo.DC_TUNE``, held-out problems 0..399) for every setting of the grid (a run whose
``deepconf_results.json`` already exists under ``--runs`` is reused), applies the rule written in
``DC_RULE`` and writes the table to ``docs/train_demo/deepconf_tuning.md``. The demo itself reports on
the next slice (400..799), which no run here touches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from h1r_ops.train.demo import DC_DEFAULTS, DC_RULE, DC_TUNE  # noqa: E402

GRID = [dict(warmup=w, window=16, tau=t) for w in (8, 4) for t in (0.95, 0.9)]


def choose(rows):
    """The rule of ``DC_RULE`` over ``rows`` = [(setting, the DeepConf stage's results dict)]: DeepConf-high
    online, the fewest tokens among the settings at least as accurate as majority on the tuning slice, else
    the most accurate (ties: fewer tokens)."""
    def high(dc):
        return next(v for v in dc["variants"] if v["eta"] == 90)["online"]

    ok = [r for r in rows if high(r[1])["accuracy"] >= r[1]["majority"]["accuracy"]]
    if ok:
        return min(ok, key=lambda r: high(r[1])["tokens"])
    return max(rows, key=lambda r: (high(r[1])["accuracy"], -high(r[1])["tokens"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/train_demo/grpo/model")
    ap.add_argument("--runs", default="runs/dc_tuning", help="one folder per setting")
    ap.add_argument("--out", default="docs/train_demo/deepconf_tuning.md")
    args = ap.parse_args()
    rows = []
    for g in GRID:
        d = os.path.join(args.runs, f"w{g['warmup']}_win{g['window']}_tau{g['tau']}")
        f = os.path.join(d, "deepconf_results.json")
        if not os.path.exists(f):
            subprocess.run([sys.executable, "-m", "h1r_ops.cli", "train", "demo", "--model", args.model, "--out", d,
                            "--dc-offset", str(DC_TUNE["first"]), "--dc-problems", str(DC_TUNE["problems"]),
                            "--dc-warmup", str(g["warmup"]), "--dc-window", str(g["window"]), "--dc-tau",
                            str(g["tau"]), "--dc-budget", str(DC_DEFAULTS["dc_budget"]), "--dc-eta",
                            *[f"{e:g}" for e in DC_DEFAULTS["dc_eta"]]], check=True)
        dc = json.load(open(f))["deepconf"]
        rows.append((g, dc))
    best = choose(rows)
    first = DC_TUNE["first"]
    with open(os.path.join(args.model, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    lines = [
        "# DeepConf settings of `h1r train demo`: the tuning sweep",
        "",
        f"Written by `scripts/deepconf_tuning.py` on the GRPO model of a run of the default demo (`{args.model}`, "
        f"model.safetensors sha256 {sha}...), held-out "
        f"problems {first}..{first + DC_TUNE['problems'] - 1} ({DC_TUNE['problems']} problems); the demo reports on "
        f"problems {first + DC_TUNE['problems']}.. (disjoint). Rule: {DC_RULE}.",
        "",
        "| warm-up | window | tau | majority | high offline | high online (tokens) | low offline | low online (tokens) "
        "| high online paired vs majority |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g, dc in rows:
        v = {x["eta"]: x for x in dc["variants"]}
        hi, lo = v[90], v[10]
        p = hi["online"]["paired"]
        mark = " **(chosen)**" if (g, dc) == best else ""
        lines.append(
            f"| {g['warmup']}{mark} | {g['window']} | {g['tau']} | {100 * dc['majority']['accuracy']:.1f}% "
            f"({dc['majority']['tokens']:,}) | {100 * hi['offline']['accuracy']:.1f}% | "
            f"{100 * hi['online']['accuracy']:.1f}% ({hi['online']['tokens']:,}) | "
            f"{100 * lo['offline']['accuracy']:.1f}% | "
            f"{100 * lo['online']['accuracy']:.1f}% ({lo['online']['tokens']:,}) | "
            f"{p['deepconf_right_majority_wrong']} / {p['majority_right_deepconf_wrong']} |")
    g = best[0]
    lines += ["", f"Chosen: warm-up {g['warmup']}, window {g['window']}, tau {g['tau']} (the demo's defaults, "
              "`DC_DEFAULTS` in `h1r_ops/train/demo.py`).", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    want = dict(dc_warmup=g["warmup"], dc_window=g["window"], dc_tau=g["tau"])
    have = {k: DC_DEFAULTS[k] for k in want}
    if want != have:
        print(f"NOTE: the demo's DC_DEFAULTS {have} differ from the chosen {want}: update h1r_ops/train/demo.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
