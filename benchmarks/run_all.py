"""Run the whole benchmark suite in one go: every ``benchmarks/bench_*.py``, each in its own process.

Each script measures its own anchors (eager reference, torch.compile, the peer path) in the same run and
prints ratios and bandwidth against the machine's memory-copy bandwidth; this runner only sequences them.

    python benchmarks/run_all.py            # quick mode (--quick for the scripts that have it)
    python benchmarks/run_all.py --full     # the full shapes of the issues (long)
    python benchmarks/run_all.py scan conv  # only the scripts whose name contains one of these words
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="substrings of the script names to run")
    ap.add_argument("--full", action="store_true", help="full shapes instead of --quick")
    args = ap.parse_args(argv)
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if args.only:
        scripts = [s for s in scripts if any(w in os.path.basename(s) for w in args.only)]
    failed, summary = [], []
    for script in scripts:
        name = os.path.basename(script)
        cmd = [sys.executable, script]
        if not args.full and "--quick" in open(script).read():
            cmd.append("--quick")
        print(f"\n# {name} {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
        summary.append((name, rc, time.perf_counter() - t0))
        if rc:
            failed.append(name)
    print("\n# suite summary")
    for name, rc, t in summary:
        print(f"  {name:32s} {'ok' if rc == 0 else f'FAILED ({rc})':>12s} {t:8.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
