"""End-to-end: the native Falcon-H1 model vs transformers' FalconH1ForCausalLM on CPU, same weights.

Prefill (prompt tokens/s) and greedy decode (new tokens/s, prefill excluded) at batch 1 and 16, bf16 (the
headline dtype on a CPU with AMX, as users would run it) and fp32, on the small-but-real config of
../shared/reference/anchors.md (8 layers, hidden 1024, 16 x 64 mamba heads, d_state 128, vocab 32k).

Four paths are timed in the same run, interleaved round-robin (the minimum of each is kept: steadier
on a shared machine): transformers, h1r's module path (``use_fused = False``: one nn.Linear per
projection, the public validated ops; what the model ran before the fused path), h1r's fused path, and
the fused path with ``prepack_weights()`` (oneDNN-blocked copies of the bf16 weights for the many-row
GEMMs: one more copy of the weights in memory; the same as the fused path in fp32, where nothing is packed).

The limits printed beside them, from this run's own measurements:
- decode: every step reads all the weights but the embedding table, plus the Mamba / conv states (read
  and written) and the KV cache: bound = batch / (those bytes / memory-copy bandwidth), the bandwidth
  measured by a 256 MiB copy interleaved with the decode runs;
- prefill: the GEMMs' FLOPs (2 x non-embedding parameters per token) at the rate of one large GEMM in
  this dtype (attention and the scan not counted, so it is optimistic).

    python benchmarks/bench_model.py [--quick] [--dtype bf16,fp32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root (h1r_ops)
from common import memcpy_bandwidth, print_table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=128, mamba_d_ssm=1024, mamba_n_heads=16, mamba_d_head=64, mamba_n_groups=1,
    mamba_d_state=128, mamba_d_conv=4, mamba_chunk_size=128, max_position_embeddings=8192,
    lm_head_multiplier=0.0390625, embedding_multiplier=5.65685, key_multiplier=0.390625, attention_out_multiplier=0.9375,
    ssm_in_multiplier=1.25, ssm_out_multiplier=0.235702, mlp_multipliers=[0.88388, 0.5859375],
    ssm_multipliers=[0.35355, 0.25, 0.35355, 0.5, 0.35355], tie_word_embeddings=False,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(path: str, layers: int) -> None:
    """A random-weight transformers model of CONFIG with ``layers`` layers, saved at ``path``."""
    import transformers

    cfg = dict(CONFIG, num_hidden_layers=layers)
    hf_cfg = transformers.FalconH1Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e11})
    torch.manual_seed(0)
    transformers.FalconH1ForCausalLM(hf_cfg).save_pretrained(path)


def interleaved(fns: dict, rounds: int) -> dict:
    """Time each callable ``rounds`` times, round-robin after one warm-up each; the minimum per name."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def gemm_flops(dtype: torch.dtype, m: int = 512) -> float:
    """FLOP/s of one (m x 1024) @ (1024 x 4096) GEMM in ``dtype`` (AMX through oneDNN for bf16)."""
    a, w = torch.randn(m, 1024, dtype=dtype), torch.randn(4096, 1024, dtype=dtype)
    t = interleaved({"mm": lambda: torch.mm(a, w.t())}, 5)["mm"]
    return 2 * m * 1024 * 4096 / t


def decode_bytes(model, batch: int, ctx: int) -> int:
    """Bytes one decode step must move: the weights but the embedding table (one row of it is read), the
    conv and SSM states (read + written) and the KV cache of ``ctx`` positions (read)."""
    c, p = model.config, model.model.embed_tokens.weight
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    if model.lm_head is not None:
        weights -= p.numel() * p.element_size()
    ssm = c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state * 4
    conv = c.conv_dim * (c.mamba_d_conv - 1) * p.element_size()
    kv = 2 * c.num_key_value_heads * c.head_dim * ctx * p.element_size()
    return weights + batch * c.num_hidden_layers * (2 * ssm + 2 * conv + kv)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, shorter runs")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8, 2 with --quick)")
    ap.add_argument("--dtype", default="bf16,fp32")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens at batch 1 (a quarter at batch > 1)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path (the minimum is kept)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (2 if args.quick else 8)
    rounds = 1 if args.quick else args.rounds
    n_new = args.new_tokens // (4 if args.quick else 1)

    import transformers

    from h1r_ops.model import FalconH1ForCausalLM

    bw = memcpy_bandwidth()
    src = torch.ones(1 << 26)   # 256 MiB, copied between the decode runs to measure the bandwidth of the moment
    dst = torch.empty_like(src)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        build(d, layers)
        for dname in args.dtype.split(","):
            dtype = DTYPES[dname]
            hf = transformers.FalconH1ForCausalLM.from_pretrained(d, dtype=dtype).eval()
            ours = FalconH1ForCausalLM.from_pretrained(d, dtype=dtype)
            flops = gemm_flops(dtype)
            nonembed = sum(p.numel() for p in ours.parameters()) - ours.model.embed_tokens.weight.numel()
            # the lm head runs on one position per sequence in prefill
            prefill_flops_tok = 2 * (nonembed - (0 if ours.lm_head is None else ours.lm_head.weight.numel()))

            def module(fn):
                def run():
                    ours.use_fused = False
                    try:
                        return fn()
                    finally:
                        ours.use_fused = True
                return run

            ours.prepack_weights()
            packs = [layer.packs for layer in ours.model.layers], ours._lm_pack

            def unpacked(fn):  # the fused path without the blocked copies
                def run():
                    for layer in ours.model.layers:
                        layer.packs = {}
                    ours._lm_pack = None
                    try:
                        return fn()
                    finally:
                        for layer, pk in zip(ours.model.layers, packs[0]):
                            layer.packs = pk
                        ours._lm_pack = packs[1]
                return run

            for batch in map(int, args.batch.split(",")):
                L = args.prompt if batch == 1 else max(args.prompt // 4, 16)
                ids = torch.randint(3, CONFIG["vocab_size"], (batch, L))
                with torch.no_grad():
                    ours_prefill = lambda: ours.prefill(ids, ours.new_cache(batch, L))  # noqa: E731
                    t = interleaved({"hf": lambda: hf(ids, logits_to_keep=1), "module": module(ours_prefill),
                                     "fused": unpacked(ours_prefill), "packed": ours_prefill}, rounds)
                bound = flops / prefill_flops_tok
                toks = batch * L
                rows.append((f"prefill {L}", dname, batch, toks / t["hf"], toks / t["module"], toks / t["fused"],
                             toks / t["packed"], t["hf"] / t["fused"], t["hf"] / t["packed"], bound,
                             100 * toks / min(t["fused"], t["packed"]) / bound))

                # decode: time to generate n + 1 tokens minus time to generate 1 (= prefill + first token)
                p = ids[:, :16]

                def hf_gen(n):
                    return lambda: hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

                def our_gen(n):
                    return lambda: ours.generate_greedy(p, n)

                with torch.no_grad():
                    t = interleaved({"hf1": hf_gen(1), "hfn": hf_gen(n_new + 1), "mod1": module(our_gen(1)),
                                     "modn": module(our_gen(n_new + 1)), "us1": unpacked(our_gen(1)),
                                     "usn": unpacked(our_gen(n_new + 1)), "pk1": our_gen(1), "pkn": our_gen(n_new + 1),
                                     "memcpy": lambda: dst.copy_(src)}, rounds)
                step = {k: max(t[k + "n"] - t[k + "1"], 1e-9) / n_new for k in ("hf", "mod", "us", "pk")}
                # the bandwidth of the same moments (the machine's load drifts between the cases)
                bw_now = 2 * src.numel() * src.element_size() / t["memcpy"]
                bound = batch * bw_now / decode_bytes(ours, batch, 16 + n_new // 2)
                rows.append((f"decode {n_new}", dname, batch, batch / step["hf"], batch / step["mod"],
                             batch / step["us"], batch / step["pk"], step["hf"] / step["us"], step["hf"] / step["pk"],
                             bound, 100 * batch / min(step["us"], step["pk"]) / bound))
            hf = ours = None  # free both before the next dtype loads
    print_table(rows, ("path", "dtype", "batch", "transformers tok/s", "h1r module tok/s", "h1r fused tok/s",
                       "h1r fused+packed tok/s", "x transformers (fused)", "x transformers (packed)", "bound tok/s",
                       "% of bound (best)"),
                title=f"Falcon-H1 {layers}-layer model (hidden 1024, 16x64 mamba heads, d_state 128, vocab 32k), "
                      f"CPU {torch.get_num_threads()} threads, memcpy {bw / 1e9:.1f} GB/s, "
                      f"{torch.backends.cpu.get_cpu_capability()}")
    print("bound: decode = weights (embedding table excluded) + states + KV per step at memcpy bandwidth; "
          "prefill = GEMM FLOPs at this run's large-GEMM rate. Shared machine: compare within the run.")


if __name__ == "__main__":
    main()
