#!/usr/bin/env bash
# Set up (venv, install, build) and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
python -m pytest -q "$@"
