"""Parallel-trace decoding: the paged engine (h1r_ops.infer.Engine) vs transformers' generate with
num_return_sequences, on CPU, same weights, measured in one run.

For 1, 16, 64 and 256 traces of one prompt (the config of bench_model.py), both sample ``--new-tokens``
tokens per trace (``--new-tokens-large`` from ``--large-from`` traces on; EOS ignored) with temperature 0.6
and top-p 0.95 (DeepConf's setting). Printed: end-to-end tokens/s of each (prompt prefill included: the
engine prefills the prompt once and forks it, transformers once per returned sequence) and their ratio
(the speed-up); the tokens/s of each at its median decode step (transformers' steps timed by a stopping
criterion called once per step, the engine's by its step loop) and their ratio, which a burst of load from
other processes on a shared machine moves far less than the end-to-end times; the engine's memory per trace
(KV pages at the final length + the Mamba state slot). The SSM states default to the model dtype
(``--ssm-state-dtype auto``: transformers' policy, which keeps them in the model dtype too).

The decode bound printed beside them: one decode step must read every weight but the embedding table once,
read and write every trace's Mamba states (conv + SSM, in the engine's state dtype) and read its KV cache
(at the mean context of the run): bound = traces / (those bytes / memory-copy bandwidth, measured in the
run); "% of bound" is the engine's median-step tokens/s against it.

``--prepack-weights on`` gives the engine oneDNN-blocked copies of the bf16 weights
(``Engine(prepack_weights=True)``, one more copy of the weights in memory); ``off`` (default, the Engine's
default) keeps the plain weights, which on a CPU with AMX run the many-trace GEMMs on h1r::linear's AMX
path (no per-call weight reorder, muP scale / SwiGLU in its epilogue): as fast or faster at 64 traces.

``--dtype auto`` is bf16 where the CPU has AMX (oneDNN's bf16 matmuls), else fp32; ``--dtype both`` runs
fp32 and bf16 in the same run.

    python benchmarks/bench_engine.py [--quick] [--traces 1,16,64,256] [--dtype auto|fp32|bf16|both]
                                      [--ssm-state-dtype auto|fp32|bf16] [--prepack-weights on|off]
                                      [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import CONFIG  # noqa: E402
from common import memcpy_bandwidth, print_table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


class StepClock:
    """A transformers stopping criterion that stops nothing and records the time of each call (once per
    generated token, all sequences together); t[0] is its creation."""

    def __init__(self):
        self.t = [time.perf_counter()]

    def __call__(self, input_ids, scores, **kwargs):
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_bytes(eng, traces: int, ctx: int) -> int:
    """Bytes one decode step of ``traces`` traces at context ``ctx`` must move: the weights but the
    embedding table (read once), each trace's Mamba states (read + written) and its KV cache (read)."""
    m = eng.model
    emb = m.model.embed_tokens.weight
    weights = sum(t.numel() * t.element_size() for t in m.parameters())
    if m.lm_head is not None:
        weights -= emb.numel() * emb.element_size()
    return weights + traces * (2 * eng.states.bytes_per_slot() + eng.kv_bytes_per_token() * ctx)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, traces 1,16,64, fewer tokens")
    ap.add_argument("--traces", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "both"])
    ap.add_argument("--ssm-state-dtype", default="auto", choices=["auto", *DTYPES],
                    help="auto: the model dtype (as transformers)")
    ap.add_argument("--prepack-weights", default="off", choices=["on", "off"],
                    help="Engine(prepack_weights=): oneDNN-blocked bf16 weight copies for the many-trace GEMMs")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--new-tokens-large", type=int, default=16, help="new tokens per trace from --large-from traces on")
    ap.add_argument("--large-from", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both (1 is the least noisy on a loaded, shared machine)")
    ap.add_argument("--skip-hf-above", type=int, default=10**9, help="skip transformers above this many traces")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    traces = [int(t) for t in (args.traces or ("1,16,64" if args.quick else "1,16,64,256")).split(",")]
    dtypes = {"auto": ["bf16" if has_amx() else "fp32"], "both": ["fp32", "bf16"]}.get(args.dtype, [args.dtype])

    import transformers

    from h1r_ops.infer import Engine, SamplingParams
    from h1r_ops.model import FalconH1ForCausalLM

    cfg = dict(CONFIG)
    if args.quick:
        cfg["num_hidden_layers"] = 2
    rows = []
    bw = memcpy_bandwidth(256 << 20)
    with tempfile.TemporaryDirectory() as d:
        hf_cfg = transformers.FalconH1Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e11})
        torch.manual_seed(0)
        hf32 = transformers.FalconH1ForCausalLM(hf_cfg).eval()
        hf32.save_pretrained(d)
        prompt = torch.randint(3, cfg["vocab_size"], (1, args.prompt))
        for dname in dtypes:
            dtype = DTYPES[dname]
            hf = hf32.to(dtype) if dtype != torch.float32 else hf32
            ours = FalconH1ForCausalLM.from_pretrained(d, dtype=dtype)
            for n in traces:
                new = args.new_tokens_large if n >= args.large_from else (args.new_tokens or (8 if args.quick else 32))
                sp = SamplingParams(n=n, temperature=0.6, top_p=0.95, max_tokens=new, seed=0, ignore_eos=True)
                eng = Engine(ours, max_num_seqs=n, block_size=16, max_model_len=args.prompt + new,
                             ssm_state_dtype=DTYPES.get(args.ssm_state_dtype),
                             prepack_weights=args.prepack_weights == "on")
                eng.generate([prompt[0].tolist()], SamplingParams(n=n, max_tokens=2, ignore_eos=True))  # warm-up
                t0 = time.perf_counter()
                eng.add_request(prompt[0].tolist(), sp)
                steps, outs = [t0], []
                while eng.has_unfinished():
                    outs += eng.step()
                    steps.append(time.perf_counter())
                t_us = steps[-1] - t0
                assert sum(o.num_tokens for o in outs) == n * new
                # the first step prefills the prompt and starts the traces; the others decode all n traces
                dec = n / median([b - a for a, b in zip(steps[1:], steps[2:])])
                per_trace = eng.kv_bytes_per_token() * (args.prompt + new) + eng.states.bytes_per_slot()
                bound = n * bw / decode_step_bytes(eng, n, args.prompt + new // 2)
                if n <= args.skip_hf_above:
                    with torch.no_grad():
                        hf.generate(prompt, max_new_tokens=2, do_sample=True, num_return_sequences=min(n, 4),
                                    pad_token_id=0)
                        clock = StepClock()
                        hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=0.6,
                                    top_p=0.95, num_return_sequences=n, pad_token_id=0,
                                    stopping_criteria=transformers.StoppingCriteriaList([clock]))
                        t_hf = time.perf_counter() - clock.t[0]
                    # the first interval is the prefill and first token; the others one decode step each
                    hf_dec = n / median([b - a for a, b in zip(clock.t[1:], clock.t[2:])])
                    hf_tps, hf_dec_s = f"{n * new / t_hf:.1f}", f"{hf_dec:.1f}"
                    ratio, ratio_dec = f"{t_hf / t_us:.1f}x", f"{dec / hf_dec:.1f}x"
                else:
                    hf_tps = hf_dec_s = "skipped"
                    ratio = ratio_dec = "-"
                rows.append((dname, n, new, hf_tps, f"{n * new / t_us:.1f}", ratio, hf_dec_s, f"{dec:.1f}", ratio_dec,
                             f"{bound:.0f}", f"{100 * dec / bound:.0f}%",
                             f"{per_trace / 2**20:.2f}", f"{eng.kv_bytes_per_token() * 1000 / 2**20:.1f}",
                             f"{eng.states.bytes_per_slot() / 2**20:.2f}"))
                print(rows[-1], flush=True)
                del eng
            del ours
    print_table(rows, ("dtype", "traces", "new tok", "transformers tok/s", "h1r engine tok/s", "speed-up",
                       "transformers median step tok/s", "engine median step tok/s", "speed-up (median step)",
                       "decode bound tok/s", "engine % of bound", "MiB/trace", "KV MiB/1k tok", "state MiB"),
                title=f"Parallel traces, Falcon-H1 {cfg['num_hidden_layers']}-layer bench config, prompt {args.prompt}, "
                      f"SSM states {args.ssm_state_dtype}, prepacked weights {args.prepack_weights}, CPU {torch.get_num_threads()} threads, "
                      f"memcpy {bw / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
