"""h1r_ops: kernels for hybrid attention + Mamba2 (Falcon-H1 / Falcon-H1R) models.

The ops are registered as ``torch.ops.h1r.*`` (eager, autograd, torch.compile; CPU and CUDA) and exposed
here as drop-in functions with the same arguments as their peers (mamba_ssm, causal-conv1d, Liger, vLLM).
``h1r_ops.reference`` holds the plain-torch ground truth of every op.
"""

from ._registry import ALL_OPS, OP_FAMILIES, backends, has_kernel
from .ops.causal_conv1d import causal_conv1d, causal_conv1d_fn, causal_conv1d_update
from .ops.linear import linear, swiglu
from .ops.cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy, fused_linear_logprobs
from .ops.paged_attention import paged_attention_decode, paged_attention_prefill, reshape_and_cache
from .ops.rms_norm import RMSNorm, RMSNormGated, gated_rms_norm, rms_norm
from .ops.rotary import RotaryEmbedding, rotary, rotary_, rotary_cos_sin
from .ops.sampling import sample_top_p
from .ops.selective_scan import selective_scan, selective_state_update

__version__ = "0.1.0"

__all__ = [
    "backends", "has_kernel", "ALL_OPS", "OP_FAMILIES",
    "selective_scan", "selective_state_update",
    "causal_conv1d", "causal_conv1d_fn", "causal_conv1d_update",
    "rms_norm", "gated_rms_norm", "RMSNorm", "RMSNormGated",
    "rotary", "rotary_", "rotary_cos_sin", "RotaryEmbedding",
    "fused_linear_cross_entropy", "fused_linear_logprobs", "FusedLinearCrossEntropyLoss",
    "reshape_and_cache", "paged_attention_decode", "paged_attention_prefill",
    "sample_top_p",
    "linear", "swiglu",
]
