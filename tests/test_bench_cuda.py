"""benchmarks/bench_cuda.py imports cleanly and, without CUDA, says why it times nothing (no timing here)."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("bench_cuda", os.path.join(ROOT, "benchmarks", "bench_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cuda_imports_and_skips_without_cuda(capsys):
    bench = _load()
    assert set(bench.OPS) == {"scan", "conv", "decode", "paged"}
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would time; run it by hand")
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "torch.cuda is not available" in out


def test_bench_cuda_rejects_unknown_ops():
    with pytest.raises(SystemExit):
        _load().main(["--only", "scan,nope"])


def test_bench_cuda_peer_guard():
    bench = _load()
    assert bench.peer("h1r_no_such_module", "f") == "h1r_no_such_module not installed"
    assert callable(bench.peer("math", "sqrt"))
