"""Where this process runs the Triton kernels: on CUDA tensors when a GPU is present, on CPU tensors in
Triton's interpreter when TRITON_INTERPRET=1 was set at start-up, else nowhere (the tests then re-run
themselves in a subprocess with TRITON_INTERPRET=1).

The variable must be set before triton is first imported: triton.jit chooses between compiling and
interpreting when the decorator runs, and triton.language's own helpers (tl.sum, tl.sigmoid, ...) are
decorated when triton is imported, which torch.compile (inductor) does too."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_device() -> str | None:
    """'cuda', 'cpu' (interpreter) or None (run the Triton tests in a subprocess)."""
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return None
    except Exception:
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


def run_interpreted(test_file: str, keyword: str):
    """Run `pytest test_file -k keyword` in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", keyword],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]
