"""Running kernel tests under another CPU ISA level.

``H1R_CPU_ISA`` (and ``H1R_CPU_NO_AVX512_BF16``) are read once, when ``h1r_ops._C`` loads, so every lower
level needs its own process: either a short script that calls test functions and prints ``ok``, or a
``pytest -k`` subset of a test file. Both run from the repository root with it on ``PYTHONPATH``."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(env: dict[str, str]) -> dict[str, str]:
    # the root (``import tests.test_x``) and tests/ (the helpers a test module imports by their own name)
    path = [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)), **env)


def run_script(script: str, env: dict[str, str], timeout: int = 300) -> None:
    """Run ``python -c script`` with ``env`` added; it must exit 0 and print ``ok``."""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(env), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def run_pytest_subset(test_file: str, keyword: str, env: dict[str, str], timeout: int = 600) -> None:
    """Run ``pytest test_file -k keyword`` with ``env`` added; it must pass and run at least one test."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", keyword],
                       cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout, r.stdout[-2000:]
