"""h1r_ops: kernels for hybrid attention + Mamba2 (Falcon-H1 / Falcon-H1R) models.

The ops are registered as ``torch.ops.h1r.*`` (eager, autograd, torch.compile; CPU and CUDA) and exposed
here as drop-in functions with the same arguments as their peers (mamba_ssm, causal-conv1d, Liger, vLLM).
``h1r_ops.reference`` holds the plain-torch ground truth of every op.
"""

from ._registry import ALL_OPS, OP_FAMILIES, backends, has_kernel  # noqa: F401

from .ops.rms_norm import RMSNorm, RMSNormGated, gated_rms_norm, rms_norm  # noqa: F401
from .ops.rotary import RotaryEmbedding, rotary, rotary_, rotary_cos_sin  # noqa: F401

__version__ = "0.1.0"

__all__ = ["backends", "has_kernel", "ALL_OPS", "OP_FAMILIES"]
__all__ += ["rms_norm", "gated_rms_norm", "RMSNorm", "RMSNormGated"]
__all__ += ["rotary", "rotary_", "rotary_cos_sin", "RotaryEmbedding"]
