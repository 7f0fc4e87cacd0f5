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


def assert_same_bits_without_hw_bf16(module: str, fn: str, tmp_path):
    """``tests.<module>.<fn>()`` (a tuple of tensors) gives the same bits here as in a subprocess with
    H1R_CPU_NO_AVX512_BF16=1, i.e. AVX512-BF16's vcvtneps2bf16 (used where the CPU has it) rounds exactly as
    ATen's software path. Skipped unless the avx512 kernels are in use."""
    from _isa import run_script

    if isa_in_use() != "avx512":
        pytest.skip("no avx512 kernels on this CPU")
    torch.save(getattr(importlib.import_module(module), fn)(), tmp_path / "hw.pt")
    code = (
        f"import torch, {module} as t\n"
        f"want = torch.load({str(tmp_path / 'hw.pt')!r})\n"
        f"got = t.{fn}()\n"
        "assert len(got) == len(want)\n"
        "bits = {2: torch.int16, 4: torch.int32}\n"
        "for i, (a, b) in enumerate(zip(got, want)):\n"
        "    assert a.dtype == b.dtype and a.shape == b.shape, i\n"
        "    assert torch.equal(a.view(bits[a.element_size()]), b.view(bits[b.element_size()])), i\n"
        "print('ok')\n"
    )
    run_script(code, {"H1R_CPU_NO_AVX512_BF16": "1"}, timeout=300)
