"""``h1r generate`` and ``h1r deepconf``: the engine and DeepConf from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="an HF-format Falcon-H1 checkpoint folder (config.json + safetensors)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs tokenizer.json in the folder)")
    g.add_argument("--prompt-file", help="a file holding the prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: prompt + max-tokens")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="trace i uses seed + i")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ssm-state-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="Mamba SSM state dtype (auto: the model dtype, as transformers; bf16 halves the state "
                         "memory per trace of an fp32 model)")
    ap.add_argument("--prepack-weights", action="store_true",
                    help="bf16 on CPU: oneDNN-blocked copies of the projection weights for the many-trace GEMMs "
                         "(one more copy of those weights in memory; pays on CPUs without AMX, where h1r's AMX GEMM is off)")


def _load(args):
    import torch

    from h1r_ops.infer import Engine, SamplingParams
    from h1r_ops.infer.engine import encode
    from h1r_ops.model import FalconH1ForCausalLM, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = FalconH1ForCausalLM.from_pretrained(args.model, dtype=dtype)
    tok = load_tokenizer(args.model)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    else:
        text = args.prompt if args.prompt is not None else open(args.prompt_file).read()
        if tok is None:
            raise SystemExit(f"h1r: no tokenizer.json in {args.model}: pass --prompt-ids")
        prompt = encode(tok, text)
    max_len = args.max_model_len or len(prompt) + args.max_tokens
    ssm_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.ssm_state_dtype)
    eng = Engine(model, tok, max_num_seqs=args.max_num_seqs, block_size=args.block_size, num_blocks=args.num_blocks,
                 max_model_len=max_len, ssm_state_dtype=ssm_dtype,
                 prepack_weights=args.prepack_weights)
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                        seed=args.seed, max_tokens=args.max_tokens, stop=list(args.stop))
    return eng, prompt, sp


def generate_main(argv) -> int:
    from dataclasses import replace

    ap = argparse.ArgumentParser(prog="h1r generate", description="sample n traces of a prompt with the paged engine")
    _common(ap)
    ap.add_argument("-n", type=int, default=1, help="traces (they share the prompt's prefill)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per trace")
    args = ap.parse_args(argv)
    eng, prompt, sp = _load(args)
    t0 = time.perf_counter()
    outs = eng.generate([prompt], replace(sp, n=args.n), use_tqdm=True)[0]
    dt = time.perf_counter() - t0
    for o in outs:
        if args.json:
            print(json.dumps(dict(index=o.index, finish_reason=o.finish_reason, num_tokens=o.num_tokens, text=o.text,
                                  token_ids=o.token_ids)))
        else:
            print(f"--- trace {o.index} ({o.finish_reason}, {o.num_tokens} tokens)")
            print(o.text if o.text is not None else o.token_ids)
    n_tok = sum(o.num_tokens for o in outs)
    reasons = {}
    for o in outs:
        reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
    print(f"\n{len(outs)} traces, {n_tok} tokens in {dt:.1f} s ({n_tok / dt:.1f} tokens/s); finish: {reasons}; "
          f"prompt {len(prompt)} tokens prefilled once", file=sys.stderr)
    return 0


def deepconf_main(argv) -> int:
    from h1r_ops.infer.deepconf import deepconf

    ap = argparse.ArgumentParser(prog="h1r deepconf", description="DeepConf voting over parallel traces of a prompt")
    _common(ap)
    ap.add_argument("--mode", choices=["online", "offline"], default="online")
    ap.add_argument("--budget", type=int, default=64, help="traces in all (warm-up included)")
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--eta", type=float, default=10, help="keep the top eta%% (s = percentile(warm-up, 100 - eta))")
    ap.add_argument("--window", type=int, default=2048, help="group-confidence window (tokens)")
    ap.add_argument("--tau", type=float, default=0.95, help="adaptive stop at this weighted consensus (<= 0: off)")
    ap.add_argument("--method", default=None, help="offline voting method (default top{eta}_bottom_window_filtered)")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = ap.parse_args(argv)
    eng, prompt, sp = _load(args)
    r = deepconf(eng, prompt, mode=args.mode, budget=args.budget, warmup=args.warmup, eta=args.eta, window=args.window,
                 tau=args.tau if args.tau > 0 else None, params=sp, offline_method=args.method, use_tqdm=True)
    print(r.summary())
    if args.mode == "offline":
        for k, v in r.voting.items():
            print(f"  {k}: {v['answer']} ({v['num_votes']} votes)")
    if args.json:
        print(json.dumps(dict(answer=r.answer, shares=r.shares, threshold=r.threshold, counts=r.counts(),
                              tokens_generated=r.tokens_generated, tokens_without_pruning=r.tokens_without_pruning,
                              seconds=r.seconds)))
    return 0
