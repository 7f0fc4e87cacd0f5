"""h1r_ops.infer: a paged, continuous-batching decoder for the native Falcon-H1 model, with DeepConf.

    from h1r_ops.infer import Engine, SamplingParams, deepconf
    eng = Engine(model, tokenizer, max_num_seqs=64, block_size=16)
    outs = eng.generate(["prompt"], SamplingParams(n=8, temperature=0.6, top_p=0.95, max_tokens=512, seed=0))
    res = deepconf(eng, "prompt", mode="online", budget=64, warmup=16, eta=10)
"""

from .answers import answers_equal, extract_answer
from .deepconf import DeepConfResult, compute_all_voting_results, deepconf, weighted_vote
from .engine import Engine, TraceOutput
from .sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "TraceOutput", "deepconf", "DeepConfResult", "compute_all_voting_results",
           "weighted_vote", "extract_answer", "answers_equal"]
