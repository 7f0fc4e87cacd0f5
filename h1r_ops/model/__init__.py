"""A native Falcon-H1 / Falcon-H1R causal LM built only on the h1r ops; loads HF-format checkpoints."""

from .config import FalconH1Config
from .falcon_h1 import FalconH1ForCausalLM, HybridCache, LayerCache
from .loading import load_tokenizer

__all__ = ["FalconH1Config", "FalconH1ForCausalLM", "HybridCache", "LayerCache", "load_tokenizer"]
