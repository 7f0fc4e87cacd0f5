"""Plain-torch ground truth for every h1r op, written from the math.

Every backend (CPU, CUDA, Triton) is tested against these functions. They favour clarity over speed,
compute in fp32 (or fp64 when given fp64), and return results in the input dtype like the kernels do.
"""
from .rms_norm import gated_rms_norm, rms_norm  # noqa: F401
from .rotary import rotary, rotary_cos_sin  # noqa: F401
