#!/usr/bin/env bash
# Creates ./.venv (if missing), installs the pinned requirements and builds h1r_ops._C in place.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to re-run (incremental build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# The stamp makes a re-run skip pip when requirements.txt has not changed.
stamp=.venv/.h1r-requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # (the local package mirrors print one "is ignored" warning per package: hide those)
  pip install --quiet -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The build log goes to build.log; on failure its compiler errors and tail are printed.
if ! pip install --no-build-isolation --no-deps -e . > build.log 2>&1; then
  echo "h1r_ops: the build failed; compiler errors and the end of build.log:" >&2
  grep -E "error|Error" build.log | grep -v "is ignored" | head -n 40 >&2 || true
  grep -v "is ignored: it is neither" build.log | tail -n 60 >&2
  exit 1
fi
python -c "import h1r_ops, json; print('h1r_ops backends:', json.dumps(h1r_ops.backends()))"
