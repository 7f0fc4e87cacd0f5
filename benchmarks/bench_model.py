"""End-to-end: the native Falcon-H1 model vs transformers' FalconH1ForCausalLM on CPU, same weights.

Prefill (tokens/s over a prompt) and greedy decode (new tokens/s) at batch 1 and 16, fp32 and bf16, on the
small-but-real config of ../shared/reference/anchors.md (185 M parameters). Both models are measured in
this run; the table prints our speed-up over transformers and, for decode, the weight-streaming bound
(bytes of weights per step / memory-copy bandwidth).

    python benchmarks/bench_model.py [--quick] [--dtype fp32,bf16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root (h1r_ops)
from common import memcpy_bandwidth, print_table, timeit  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, mamba_d_ssm=1024, mamba_n_heads=16, mamba_d_head=64, mamba_n_groups=1,
    mamba_d_state=128, mamba_d_conv=4, mamba_chunk_size=128, max_position_embeddings=8192,
    lm_head_multiplier=0.0390625, embedding_multiplier=5.65685, key_multiplier=0.390625, attention_out_multiplier=0.9375,
    ssm_in_multiplier=1.25, ssm_out_multiplier=0.235702, mlp_multipliers=[0.88388, 0.5859375],
    ssm_multipliers=[0.35355, 0.25, 0.35355, 0.5, 0.35355], tie_word_embeddings=False,
)


def build(path: str, quick: bool):
    import transformers

    cfg = dict(CONFIG)
    if quick:
        cfg["num_hidden_layers"] = 4
    hf_cfg = transformers.FalconH1Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e11})
    torch.manual_seed(0)
    hf = transformers.FalconH1ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(path)
    return hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, shorter runs")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    from h1r_ops.model import FalconH1ForCausalLM

    bw = memcpy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        hf32 = build(d, args.quick)
        for dname in args.dtype.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            hf = hf32.to(dtype) if dtype != torch.float32 else hf32
            ours = FalconH1ForCausalLM.from_pretrained(d, dtype=dtype)
            weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
            for batch in (1, 16):
                L = args.prompt if batch == 1 else args.prompt // 4
                ids = torch.randint(3, CONFIG["vocab_size"], (batch, L))
                with torch.no_grad():
                    t_hf = timeit(lambda: hf(ids, logits_to_keep=1), warmup=1, iters=2)
                    t_us = timeit(lambda: ours.prefill(ids, ours.new_cache(batch, L)), warmup=1, iters=2)
                rows.append((f"prefill {L} tok", dname, batch, batch * L / t_hf, batch * L / t_us, t_hf / t_us, ""))
                n = args.new_tokens // (2 if args.quick else 1)
                p = ids[:, :16]
                with torch.no_grad():
                    t_hf = timeit(lambda: hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                      pad_token_id=0), warmup=1, iters=1)
                    t_us = timeit(lambda: ours.generate_greedy(p, n), warmup=1, iters=2)
                bound = bw / weight_bytes * batch
                rows.append((f"decode {n} new", dname, batch, batch * n / t_hf, batch * n / t_us, t_hf / t_us,
                             f"{bound:.0f}"))
    print_table(rows, ("path", "dtype", "batch", "transformers tok/s", "h1r tok/s", "speed-up", "weight-bound tok/s"),
                title=f"Falcon-H1 {'4' if args.quick else '8'}-layer 185M-class model, CPU {torch.get_num_threads()} "
                      f"threads (memcpy {bw / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
