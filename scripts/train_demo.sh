#!/usr/bin/env bash
# Set up (venv, install, build) and run the training demo: SFT -> GRPO (engine rollouts) -> held-out eval ->
# DeepConf vs majority voting, on 1 CPU thread (--threads). Writes docs/train_demo/demo_results.{json,md},
# demo_metrics.jsonl and demo_curves.png (options: python -m h1r_ops.cli train demo --help; --quick: smoke run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
python -m h1r_ops.cli train demo "$@"
