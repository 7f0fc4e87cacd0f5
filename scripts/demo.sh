#!/usr/bin/env bash
# Set up (venv, install, build) and run the demo: every op against its reference, with a timing table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
python -m h1r_ops.demo "$@"
