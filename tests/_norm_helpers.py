"""Shared helpers for the rms_norm and rotary tests: per-dtype tolerances, and running a subset of a
test file under another CPU ISA in a subprocess."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from _isa import run_pytest_subset

from _triton_interp import run_interpreted, triton_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Max abs error allowed, relative to max(1, max |expected|): about 2-4 ulps of the output dtype
# (kernels round once from fp32; the reference may round at a different point).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ["f32", "bf16", "f16"]


def assert_close(actual, expected, dtype, what="", factor=1.0):
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * factor * scale, f"{what}: max abs error {err:.3g} > {TOL[dtype] * factor:.3g} * {scale:.3g}"


class KernelOps:
    """The kernels of a family under test, by op name: with no ``triton_module``, the C++ ops
    (``torch.ops.h1r.<name>``, for CPU tensors); else that module's Triton launchers, called directly
    (imported on first use: on CPU tensors only in the TRITON_INTERPRET=1 subprocess)."""

    def __init__(self, device, triton_module: str | None = None):
        self.device, self.triton_module = device, triton_module

    def __getattr__(self, name):
        if self.triton_module is None:
            return getattr(torch.ops.h1r, name)
        return getattr(importlib.import_module(self.triton_module), name)


def run_triton_subset_interpreted(test_file: str, keyword: str):
    """The Triton tests `keyword` of test_file, in a TRITON_INTERPRET=1 subprocess (skipped when they
    already run in this process, on a GPU or under the interpreter)."""
    if triton_device() is not None:
        pytest.skip("the Triton tests run in this process")
    run_interpreted(test_file, keyword)


def run_subset_under_isa(test_file: str, keyword: str, isa: str):
    """Run `pytest test_file -k keyword` with H1R_CPU_ISA=isa (read when h1r_ops._C loads); skipped when the
    machine's best ISA is not avx512 (the lower ISA is then the one in use: the main run tests it)."""
    if isa_in_use() != "avx512":
        pytest.skip("the lower ISA is the one in use")
    run_pytest_subset(test_file, keyword, {"H1R_CPU_ISA": isa}, timeout=300)


def isa_in_use() -> str:
    return torch.ops.h1r.cpu_isa()
