"""Loads the compiled operator library and answers which backends serve which op.

Importing :mod:`h1r_ops._C` runs the C++ static registrations: the ``torch.ops.h1r.*`` schemas
(csrc/registration.cpp) and the CPU / CUDA kernels next to their code. Triton kernels register
themselves for the CUDA dispatch key from Python (h1r_ops/triton_kernels/), autograd formulas and fake
implementations from the per-family modules in h1r_ops/ops/.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.h1r.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as e:  # not built yet, or built against another torch
    _LOAD_ERROR = e

# Every op of the library, by family (the schemas in csrc/registration.cpp).
OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "selective_scan": ("selective_scan_fwd", "selective_scan_bwd", "selective_state_update"),
    "causal_conv1d": ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"),
    "rms_norm": ("rms_norm_fwd", "rms_norm_bwd", "gated_rms_norm_fwd", "gated_rms_norm_bwd"),
    "rotary": ("rotary", "rotary_"),
    "cross_entropy": (
        "fused_linear_cross_entropy_fwd",
        "fused_linear_cross_entropy_bwd",
        "fused_linear_logprobs_fwd",
        "fused_linear_logprobs_bwd",
    ),
    "paged_attention": ("reshape_and_cache", "paged_attention_decode", "paged_attention_prefill"),
    "sampling": ("sample_top_p",),
    "linear": ("linear", "swiglu"),
}
ALL_OPS: tuple[str, ...] = tuple(op for ops in OP_FAMILIES.values() for op in ops)

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def ensure_loaded() -> None:
    """Raise a clear ImportError when the compiled extension is missing."""
    if _LOAD_ERROR is not None:
        raise ImportError(
            "h1r_ops._C, the compiled kernel library, could not be loaded "
            f"({_LOAD_ERROR}). Build it with `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace`) against torch " + torch.__version__
        ) from _LOAD_ERROR


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.h1r.<op>`` has a kernel for ``device_type`` ('cpu' or 'cuda')."""
    if _LOAD_ERROR is not None:
        return False
    key = _DISPATCH_KEY.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"h1r::{op}", key) or (
        torch._C._dispatch_has_kernel_for_dispatch_key(f"h1r::{op}", "CompositeExplicitAutograd")
    )


def op_overload(op: str):
    """``torch.ops.h1r.<op>.default`` (skips the overload-packet lookup in hot decode paths), or None when
    the compiled library is not loaded, so that the caller's checked path raises the clear error."""
    if _LOAD_ERROR is not None:
        return None
    try:
        return getattr(torch.ops.h1r, op).default
    except (AttributeError, RuntimeError):
        return None


def require_kernel(op: str, device: torch.device) -> None:
    """Raise ``NotImplementedError`` naming the op and device when no kernel serves it.

    The dispatcher query cannot be traced by dynamo, so under torch.compile this check is skipped and a
    missing kernel fails at the op itself, with the dispatcher's message."""
    if torch.compiler.is_compiling():
        return
    ensure_loaded()
    if not has_kernel(op, device.type):
        have = [d for d in _DISPATCH_KEY if has_kernel(op, d)]
        raise NotImplementedError(
            f"h1r::{op} has no kernel for device '{device.type}' in this build "
            f"(kernels for: {', '.join(have) if have else 'none yet'}). "
            "Move the inputs to a supported device, or use h1r_ops.reference for a plain-torch version."
        )


def cuda_compiled() -> bool:
    """Whether the CUDA kernels of csrc/cuda/ were compiled into h1r_ops._C (Triton kernels aside)."""
    return _LOAD_ERROR is None and bool(torch.ops.h1r.built_with_cuda())


def backends() -> dict:
    """Which backends this build has, and which ops each serves.

    Returns a dict with ``cpu`` (SIMD level and the ops with CPU kernels), ``cuda`` (whether CUDA kernels
    were compiled, whether a GPU is visible, and the ops with CUDA kernels) and ``triton``."""
    ensure_loaded()
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is optional on some platforms
        triton_version = None
    return {
        "cpu": {
            "isa": torch.ops.h1r.cpu_isa(),
            "ops": [op for op in ALL_OPS if has_kernel(op, "cpu")],
        },
        "cuda": {
            "compiled": cuda_compiled(),
            "torch_cuda": torch.version.cuda,
            "gpu_available": torch.cuda.is_available(),
            "ops": [op for op in ALL_OPS if has_kernel(op, "cuda")],
        },
        "triton": {"version": triton_version},
    }
