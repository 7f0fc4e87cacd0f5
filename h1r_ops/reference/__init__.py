"""Plain-torch ground truth for every h1r op, written from the math.

Every backend (CPU, CUDA, Triton) is tested against these functions. They favour clarity over speed,
compute in fp32 (or fp64 when given fp64), and return results in the input dtype like the kernels do.
"""
from .cross_entropy import fused_linear_cross_entropy, fused_linear_logprobs  # noqa: F401
from .paged_attention import gather_kv_ref, paged_attention_decode_ref, paged_attention_prefill_ref, reshape_and_cache_ref  # noqa: F401,E501
from .selective_scan import selective_scan_ref, selective_scan_sequential_ref, selective_state_update_ref  # noqa: F401
from .causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: F401
from .rms_norm import gated_rms_norm, rms_norm  # noqa: F401
from .rotary import rotary, rotary_cos_sin  # noqa: F401
from .sampling import sample_top_p_ref  # noqa: F401
from .linear import linear_ref, swiglu_ref  # noqa: F401
