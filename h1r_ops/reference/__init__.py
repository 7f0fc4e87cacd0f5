"""Plain-torch ground truth for every h1r op, written from the math.

Every backend (CPU, CUDA, Triton) is tested against these functions. They favour clarity over speed,
compute in fp32 (or fp64 when given fp64), and return results in the input dtype like the kernels do.
"""
from .causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: F401
