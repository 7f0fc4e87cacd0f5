"""The operator registry: schemas, backends, clear errors, shared argument checks."""

import os
import subprocess
import sys

import pytest
import torch

import h1r_ops
from h1r_ops import _registry
from h1r_ops._checks import Shapes, check_choice


def test_every_op_has_a_schema():
    for op in _registry.ALL_OPS:
        packet = getattr(torch.ops.h1r, op)
        schema = packet.default._schema
        assert schema.name == f"h1r::{op}"


def test_families_cover_design_ops():
    assert set(_registry.OP_FAMILIES) == {
        "selective_scan", "causal_conv1d", "rms_norm", "rotary", "cross_entropy", "paged_attention",
        "sampling",
        "linear",
    }
    assert len(set(_registry.ALL_OPS)) == len(_registry.ALL_OPS)


def test_backends_report():
    b = h1r_ops.backends()
    assert b["cpu"]["isa"] in ("avx512", "avx2", "scalar")
    assert set(b["cpu"]["ops"]) <= set(_registry.ALL_OPS)
    if b["cuda"]["compiled"]:  # the CUDA kernels of csrc/cuda register for the CUDA key
        assert {"selective_state_update", "causal_conv1d_update", "paged_attention_decode"} <= set(b["cuda"]["ops"])
    assert b["cuda"]["torch_cuda"] == torch.version.cuda


def test_every_kernel_op_has_a_fake_impl():
    from torch._library.simple_registry import singleton

    for op in _registry.ALL_OPS:
        if _registry.has_kernel(op, "cpu") or _registry.has_kernel(op, "cuda"):
            entry = singleton.find(f"h1r::{op}")
            assert entry.fake_impl.kernel is not None, f"h1r::{op} has a kernel but no fake impl"


def test_missing_device_kernel_is_a_clear_error():
    with pytest.raises(NotImplementedError, match=r"h1r::rms_norm_fwd has no kernel for device 'xpu'"):
        _registry.require_kernel("rms_norm_fwd", torch.device("xpu"))


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_isa_can_be_lowered_not_raised(isa):
    out = subprocess.run(
        [sys.executable, "-c", "import h1r_ops, torch; print(torch.ops.h1r.cpu_isa())"],
        env={**os.environ, "H1R_CPU_ISA": isa}, capture_output=True, text=True, check=True,
    ).stdout.strip()
    best = torch.ops.h1r.cpu_isa()
    order = ["scalar", "avx2", "avx512"]
    assert out == order[min(order.index(isa), order.index(best))]


def test_shapes_binds_and_reports():
    s = Shapes("op")
    x = torch.zeros(2, 7, 4, 8)
    s.check("x", x, ("b", "l", "h", "p"))
    assert (s["b"], s["l"], s["h"], s["p"]) == (2, 7, 4, 8)
    s.check("dt", torch.zeros(2, 7, 4), ("b", "l", "h"))
    with pytest.raises(ValueError, match=r"op: argument 'dt': expected shape \(b, l, h\) = \(2, 7, 4\), got \(2, 7, 5\)"):
        s.check("dt", torch.zeros(2, 7, 5), ("b", "l", "h"))
    with pytest.raises(ValueError, match=r"argument 'A': expected 1 dimensions \(h,\), got shape \(4, 1\)"):
        s.check("A", torch.zeros(4, 1), ("h",))
    with pytest.raises(ValueError, match=r"argument 'seq_idx': expected dtype in \(int32\), got float32"):
        s.check("seq_idx", torch.zeros(2, 7), ("b", "l"), dtypes=(torch.int32,))
    with pytest.raises(ValueError, match=r"argument 'z': expected a tensor, got None"):
        s.check("z", None, ("b",))
    assert s.check("z", None, ("b",), optional=True) is None
    with pytest.raises(ValueError, match=r"argument 'D': expected a torch.Tensor, got list"):
        s.check("D", [1.0], ("h",))
    with pytest.raises(ValueError, match="expected device cpu"):
        s.check("B", torch.zeros(2, 7, 1, 3, device="meta"), ("b", "l", "g", "n"))
    with pytest.raises(ValueError, match=r"argument 'activation': expected one of \[None, 'silu'\], got 'relu'"):
        check_choice("op", "activation", "relu", [None, "silu"])
