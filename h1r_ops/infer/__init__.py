"""h1r_ops.infer: a paged, continuous-batching decoder for the native Falcon-H1 model, with DeepConf."""

from .engine import Engine, TraceOutput
from .sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "TraceOutput"]
