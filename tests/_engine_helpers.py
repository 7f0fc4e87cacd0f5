"""A tiny random native Falcon-H1 for the engine and DeepConf tests (no transformers needed)."""

import math

import torch

from h1r_ops.model import FalconH1Config, FalconH1ForCausalLM

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
    mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, max_position_embeddings=512,
    lm_head_multiplier=0.37, embedding_multiplier=3.1, mlp_multipliers=[0.8, 0.6], key_multiplier=0.45,
    attention_out_multiplier=0.9, attention_in_multiplier=1.2, ssm_multipliers=[0.35, 0.25, 0.4, 0.5, 0.3],
    ssm_in_multiplier=1.25, ssm_out_multiplier=0.24, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, mamba_rms_norm=True, mamba_norm_before_gate=False,
)


def tiny_model(seed: int = 0, **over) -> FalconH1ForCausalLM:
    m = FalconH1ForCausalLM(FalconH1Config(**{**TINY, **over})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 1.0)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                # sharper than test_model's init so that greedy argmax is well separated
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[-1])))
    return m


def one_thread():
    """Generator for a module-scoped fixture: the tiny model's ops run single-threaded (they are far too
    small to gain from threads, and on a loaded machine OpenMP barriers dominate)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
