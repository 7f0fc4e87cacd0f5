"""The paged continuous-batching engine vs the model's own contiguous-cache decoding."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _engine_helpers import one_thread, tiny_model  # noqa: E402

from h1r_ops.infer import Engine, SamplingParams  # noqa: E402
from h1r_ops.infer.block_manager import BlockAllocator, BlockTable, OutOfBlocks  # noqa: E402


_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _prompts(n, seed=0, lo=1, hi=40):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 97, (L,), generator=g).tolist() for L in lens]


def _no_leak(eng):
    a = eng.allocator
    assert a.num_free == a.num_blocks and a.num_allocated == a.num_freed
    assert eng.states.num_free == eng.states.num_slots and eng.states.num_allocated == eng.states.num_freed
    assert not eng.has_unfinished()


# -- block manager ----------------------------------------------------------------------------------------
def test_allocator_free_list_and_refcounts():
    a = BlockAllocator(4, 2)
    t = BlockTable(a)
    copies = []
    assert t.append_slots(3, lambda s, d: copies.append((s, d))) == [0, 1, 2]  # blocks 0, 1
    f = t.fork()
    assert a.refcount(0) == 2 and a.refcount(1) == 2
    # the fork writes into the shared partial page: copy-on-write into a fresh page
    s = f.append_slots(1, lambda src, dst: copies.append((src, dst)))
    assert copies == [(1, 2)] and s == [2 * 2 + 1] and f.blocks == [0, 2]
    assert a.refcount(1) == 1
    t.append_slots(1, lambda *x: copies.append(x))   # t now owns block 1 alone: no copy
    assert len(copies) == 1
    t.release(), f.release()
    assert a.num_free == 4 and a.num_allocated == a.num_freed
    with pytest.raises(RuntimeError, match="double free"):
        a.free(0)
    for _ in range(4):
        a.allocate()
    with pytest.raises(OutOfBlocks):
        a.allocate()


# -- greedy equals the model's own decoding ---------------------------------------------------------------
def test_greedy_matches_model_many_sequences(model):
    prompts = _prompts(12, seed=1)
    new = [5, 17, 30, 9, 1, 23, 12, 28, 3, 19, 31, 7]
    eng = Engine(model, max_num_seqs=5, block_size=4, max_model_len=80)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in new]
    outs = eng.generate(prompts, params)
    for p, n, o in zip(prompts, new, outs):
        ref = model.generate_greedy(torch.tensor([p]), n)[0, len(p):].tolist()
        assert o[0].token_ids == ref and o[0].finish_reason == "length"
    _no_leak(eng)


@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_equals_module_path(ssm_dtype, monkeypatch):
    """A fused model (fuse_projections) decodes on the fused path (one input GEMM per layer, in-place RoPE,
    step_fused, output_fused); with the fuse state toggled off the engine falls back to the module path:
    identical greedy tokens, and both equal the model's own step-by-step decoding."""
    m = tiny_model(seed=3).fuse_projections()
    calls = []
    real = Engine._decode_fused
    monkeypatch.setattr(Engine, "_decode_fused", lambda self, *a: calls.append(1) or real(self, *a))
    prompts = _prompts(6, seed=4)
    new = [7, 1, 12, 5, 9, 3]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in new]
    outs = {}
    for fused in (True, False):
        m.use_fused = fused
        n0 = len(calls)
        eng = Engine(m, max_num_seqs=4, block_size=4, max_model_len=64, ssm_state_dtype=ssm_dtype)
        outs[fused] = [o[0].token_ids for o in eng.generate(prompts, params)]
        assert (len(calls) > n0) == fused   # the fused path ran exactly when the model was fused
        _no_leak(eng)
    m.use_fused = True
    assert outs[True] == outs[False]
    if ssm_dtype == torch.float32:
        for p, n, o in zip(prompts, new, outs[True]):
            assert o == m.generate_greedy(torch.tensor([p]), n)[0, len(p):].tolist()


def test_fused_prefill_equals_module_path(monkeypatch):
    """A fused model prefills on the fused path (one input GEMM per layer, in-place RoPE, forward_fused):
    the same last logits, K/V pages and Mamba states as the module path (fp32, to rounding)."""
    m = tiny_model(seed=5).fuse_projections()
    ids = _prompts(1, seed=6, lo=20, hi=21)[0]
    calls = []
    real = Engine._prefill_fused
    monkeypatch.setattr(Engine, "_prefill_fused", lambda self, *a: calls.append(1) or real(self, *a))
    res = {}
    for fused in (True, False):
        m.use_fused = fused
        n0 = len(calls)
        eng = Engine(m, max_num_seqs=2, block_size=4, max_model_len=32)
        table, slot = BlockTable(eng.allocator), eng.states.allocate()
        logits = eng._prefill(ids, table, slot)
        res[fused] = (logits, eng.kv[:, :, table.blocks].clone(), eng.states.conv[:, slot].clone(),
                      eng.states.ssm[:, slot].clone())
        assert (len(calls) > n0) == fused
    m.use_fused = True
    for a, b in zip(res[True], res[False]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(res[True][0], m.prefill(torch.tensor([ids]), m.new_cache(1, 32))[0], atol=2e-5,
                                   rtol=2e-5)


def test_bf16_ssm_states(model):
    """ssm_state_dtype=bf16: the pool holds bf16 states and decoding stays close to the fp32-state engine."""
    prompts = _prompts(3, seed=9)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    eng = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64, ssm_state_dtype=torch.bfloat16)
    assert eng.states.ssm.dtype == torch.bfloat16
    half = eng.generate(prompts, sp)
    full = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64).generate(prompts, sp)
    for a, b in zip(half, full):
        assert a[0].token_ids[:2] == b[0].token_ids[:2]
        torch.testing.assert_close(torch.tensor(a[0].token_confidences[:2]), torch.tensor(b[0].token_confidences[:2]),
                                   atol=0.05, rtol=0.05)
    _no_leak(eng)


def test_eos_and_stop_token_ids_end_traces(model):
    prompts = _prompts(6, seed=2)
    ref = [model.generate_greedy(torch.tensor([p]), 20)[0, len(p):].tolist() for p in prompts]
    stop_tok = ref[0][4]
    eng = Engine(model, max_num_seqs=3, block_size=8, max_model_len=80)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]))
    for r, o in zip(ref, outs):
        o = o[0]
        cut = [i for i, t in enumerate(r) if t in (stop_tok, 2)]
        if cut:
            assert o.token_ids == r[: cut[0] + 1] and o.finish_reason == "stop" and o.stop_reason == r[cut[0]]
        else:
            assert o.token_ids == r and o.finish_reason == "length"
    _no_leak(eng)


def test_shared_prefix_equals_separate_prefills(model):
    # n greedy traces of one prompt (one prefill, shared pages, copy-on-write of the partial page) give
    # the separate prefill's result; prompt length 10 with block 4 leaves a partial last page.
    p = _prompts(1, seed=3, lo=10, hi=11)[0]
    eng = Engine(model, max_num_seqs=8, block_size=4, max_model_len=64)
    shared = eng.generate([p], SamplingParams(n=6, temperature=0, max_tokens=15, ignore_eos=True))[0]
    assert eng.stats["prefill_tokens"] == len(p)
    sep = eng.generate([p] * 6, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))
    for a, b in zip(shared, sep):
        assert a.token_ids == b[0].token_ids
    # sampled traces too: same seeds, same tokens, whether the prompt is shared or not
    sp = SamplingParams(n=4, temperature=1.0, top_k=20, max_tokens=12, seed=7, ignore_eos=True)
    shared = eng.generate([p], sp)[0]
    alone = [eng.generate([p], SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=7 + i, ignore_eos=True))[0][0]
             for i in range(4)]
    assert [o.token_ids for o in shared] == [o.token_ids for o in alone]
    _no_leak(eng)


def test_more_traces_than_seats_and_preemption(model):
    # few pages: traces must wait for seats and get preempted / recomputed; results stay greedy-exact
    p = _prompts(1, seed=4, lo=6, hi=7)[0]
    ref = model.generate_greedy(torch.tensor([p]), 30)[0, len(p):].tolist()
    eng = Engine(model, max_num_seqs=4, block_size=4, num_blocks=20, max_model_len=40)
    outs = eng.generate([p], SamplingParams(n=9, temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert all(o.token_ids == ref for o in outs)
    assert eng.stats["preemptions"] > 0
    _no_leak(eng)


# -- sampling -----------------------------------------------------------------------------------------------
def test_seeded_sampling_reproducible_and_batch_independent(model):
    prompts = _prompts(5, seed=5)
    sp = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=30, min_p=0.02, max_tokens=16, seed=123)
    a = Engine(model, max_num_seqs=16, block_size=4, max_model_len=64).generate(prompts, sp)
    b = Engine(model, max_num_seqs=2, block_size=8, max_model_len=64).generate(prompts[::-1], sp)[::-1]
    c = [Engine(model, max_num_seqs=1, block_size=16, max_model_len=64).generate([q], sp)[0] for q in prompts[:2]]
    for x, y in zip(a, b):
        assert [o.token_ids for o in x] == [o.token_ids for o in y]
        assert [o.seed for o in x] == [123, 124, 125]
    for x, y in zip(a, c):
        assert [o.token_ids for o in x] == [o.token_ids for o in y]
    assert len({tuple(o.token_ids) for o in a[0]}) > 1   # different seeds, different traces


def test_sampling_filters():
    from h1r_ops.infer.sampling import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    one = torch.ones(2)
    x = filter_logits(logits, one, torch.tensor([2, 0]), one, torch.zeros(2))
    assert torch.isinf(x[0, 2:]).all() and torch.isfinite(x[0, :2]).all() and torch.isfinite(x[1]).all()
    x = filter_logits(logits, one, torch.tensor([0, 0]), torch.tensor([0.7, 1.0]), torch.zeros(2))
    assert torch.isfinite(x[0, :2]).all() and torch.isinf(x[0, 2:]).all()   # 0.5 + 0.3 reaches 0.7
    x = filter_logits(logits, one, torch.tensor([0, 0]), one, torch.tensor([0.2, 0.0]))
    assert torch.isfinite(x[0, :3]).all() and torch.isinf(x[0, 3])          # 0.05 < 0.2 * 0.5


def _reference_filter(x, k, top_p, min_p):
    """One row, by the definitions: full sort, top-k, nucleus on the renormalized top-k, min-p."""
    xs, idx = x.sort(descending=True)
    if k > 0:
        xs = xs[:k]
    p = xs.softmax(-1)
    keep = (p.cumsum(-1) - p) < top_p
    keep[0] = True
    p = p * keep
    keep = keep & (p >= min_p * p.max())
    out = torch.full_like(x, float("-inf"))
    out[idx[: len(keep)][keep]] = x[idx[: len(keep)][keep]]
    return out


def test_sampling_filters_fast_and_full_paths():
    from h1r_ops.infer.sampling import filter_logits

    g = torch.Generator().manual_seed(0)
    V = 3000
    scale = torch.tensor([8.0, 8.0, 0.5, 8.0, 0.5, 3.0, 1.0])[:, None]   # peaked rows: nucleus in the candidates
    logits = torch.randn(7, V, generator=g) * scale
    top_k = torch.tensor([0, 50, 0, 0, 1500, 0, 0])
    top_p = torch.tensor([1.0, 0.9, 0.95, 0.95, 0.8, 1.0, 0.5])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.01, 0.0, 0.05, 0.0])
    temp = torch.tensor([1.0, 0.7, 1.0, 0.6, 1.3, 1.0, 1.0])
    got = filter_logits(logits, temp, top_k, top_p, min_p)
    for i in range(7):
        want = _reference_filter(logits[i] / temp[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(want)), i
        # each row alone gives the same (no batch dependence)
        one = filter_logits(logits[i : i + 1], temp[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], min_p[i : i + 1])
        assert torch.equal(torch.isfinite(one[0]), torch.isfinite(got[i]))


def _definition_keep(x, k, top_p, min_p):
    """One row in float64, by the definitions (full sort): the kept mask, and a mask of the tokens whose
    mass above lies within 1e-5 of top_p (where fp32 rounding may legitimately decide either way)."""
    xs, idx = x.double().sort(descending=True)
    if k > 0:
        xs, idx = xs[:k], idx[:k]
    p = xs.softmax(-1)
    above = p.cumsum(-1) - p
    keep = above < top_p
    keep[0] = True
    keep &= (p * keep) >= min_p * p.max()
    out = torch.zeros(x.shape, dtype=torch.bool)
    out[idx[keep]] = True
    amb = torch.zeros(x.shape, dtype=torch.bool)
    amb[idx] = ((above - top_p).abs() < 1e-5) | ((p - min_p * p.max()).abs() < 1e-7)
    return out, amb


def _random_rows(seed, b=6, V=None):
    g = torch.Generator().manual_seed(seed)
    V = V or int(torch.randint(1, 4000, (1,), generator=g))
    scale = torch.tensor([0.01, 0.3, 1.0, 3.0, 8.0, 30.0])[torch.randint(0, 6, (b,), generator=g)][:, None]
    x = torch.randn(b, V, generator=g) * scale
    if seed % 5 == 0:   # heavy ties: a few distinct logit levels
        x = (x * 2).round() / 2
    if seed % 7 == 0:   # masked vocabulary entries
        x[torch.rand(b, V, generator=g) < 0.2] = float("-inf")
        x[:, 0] = 0.0
    top_p = torch.rand(b, generator=g).clamp(0.02, 1.0)
    top_p[torch.rand(b, generator=g) < 0.2] = 1.0
    top_p[torch.rand(b, generator=g) < 0.1] = 0.9999
    return g, x, top_p


def _assert_same_nucleus(got, x, k, top_p, min_p):
    """got (V,) kept mask vs the definition. Only the multiset of kept logits is defined (which of tied
    tokens is kept is arbitrary): the number of kept tokens of every logit value must agree, except for
    values where fp32 rounding may legitimately decide either way."""
    want, amb = _definition_keep(x, k, top_p, min_p)
    vg, cg = x[got].unique(return_counts=True)
    vw, cw = x[want].unique(return_counts=True)
    vals = torch.cat([vg, vw]).unique()
    n_got = torch.zeros(len(vals), dtype=torch.long).index_put_((torch.searchsorted(vals, vg),), cg)
    n_want = torch.zeros(len(vals), dtype=torch.long).index_put_((torch.searchsorted(vals, vw),), cw)
    differ = vals[n_got != n_want]
    assert torch.isin(differ, x[amb]).all(), differ


@pytest.mark.parametrize("seed", range(60))
def test_bucket_nucleus_matches_full_sort(seed):
    from h1r_ops.infer.sampling import Workspace, _nucleus_buckets

    g, x, top_p = _random_rows(seed)
    temp = torch.rand(x.shape[0], generator=g) * 1.5 + 0.1
    ws = Workspace()
    for t in (None, temp):
        got = _nucleus_buckets(x, top_p, ws if seed % 2 else None, t) > 0
        for i in range(x.shape[0]):
            xi = x[i] if t is None else x[i] / t[i]
            _assert_same_nucleus(got[i], xi, 0, float(top_p[i]), 0.0)
            # a row alone gives the same result (the path depends on the row only)
            one = _nucleus_buckets(x[i : i + 1], top_p[i : i + 1], None, None if t is None else t[i : i + 1]) > 0
            assert torch.equal(one[0], got[i])


@pytest.mark.parametrize("seed", range(30))
def test_filter_combinations_match_full_sort(seed):
    from h1r_ops.infer.sampling import filter_logits

    g, x, top_p = _random_rows(seed + 1000)
    b, V = x.shape
    top_k = torch.randint(0, 80, (b,), generator=g) * (torch.rand(b, generator=g) < 0.5)
    min_p = torch.where(torch.rand(b, generator=g) < 0.4, torch.rand(b, generator=g) * 0.3, torch.zeros(b))
    temp = torch.rand(b, generator=g) + 0.3
    got = torch.isfinite(filter_logits(x, temp, top_k, top_p, min_p))
    for i in range(b):
        xi = x[i] / temp[i]
        _assert_same_nucleus(got[i] & torch.isfinite(xi), xi, int(top_k[i]), float(top_p[i]), float(min_p[i]))


def test_bucket_nucleus_flat_and_peaked_full_vocab():
    """The shapes the engine sees: a 32k vocab, near-uniform rows (a random model) and peaked ones."""
    from h1r_ops.infer.sampling import _nucleus_buckets

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32768, generator=g) * torch.tensor([0.02, 0.5, 4.0, 25.0])[:, None]
    top_p = torch.tensor([0.95, 0.9, 0.95, 0.5])
    x[1, 5] = float("-inf")
    for row_max in (None, x.amax(-1)):   # the range from the full row, or the known max and a strided sample
        got = _nucleus_buckets(x, top_p, None, torch.full((4,), 0.6), row_max) > 0
        for i in range(4):
            _assert_same_nucleus(got[i], x[i] / 0.6, 0, float(top_p[i]), 0.0)


def test_sample_rows_inverse_cdf_and_workspace():
    from h1r_ops.infer.sampling import Workspace, _filtered_probs, sample_rows

    g, x, _ = _random_rows(11, b=8, V=500)
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m) for t, p, k, m in
              [(0.6, 0.95, 0, 0.0), (1.0, 0.5, 0, 0.0), (0.8, 1.0, 20, 0.0), (0.0, 1.0, 0, 0.0),
               (1.3, 0.9, 0, 0.05), (0.7, 1.0, 0, 0.0), (0.6, 0.95, 0, 0.0), (1.0, 0.3, 40, 0.1)]]
    seeds = list(range(8))
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]   # noqa: E731
    toks = sample_rows(x, params, gens())
    assert torch.equal(sample_rows(x, params, gens(), Workspace()), toks)
    for i, sp in enumerate(params):
        if sp.temperature == 0:
            assert toks[i] == x[i].argmax()
            continue
        # the draw is the inverse CDF (vocab order) of the filtered distribution at u = 1 - U(0, 1)
        u = 1.0 - torch.rand((), generator=torch.Generator().manual_seed(seeds[i]))
        p = _filtered_probs(x[i : i + 1] / sp.temperature, torch.tensor([sp.top_k]), torch.tensor([sp.top_p]),
                            torch.tensor([sp.min_p])).double()[0]
        cdf = p.cumsum(0) / p.sum()
        assert p[toks[i]] > 0
        assert cdf[toks[i]] >= u - 1e-6 and (toks[i] == 0 or cdf[toks[i] - 1] < u + 1e-6)
        # batch independence
        assert sample_rows(x[i : i + 1], params[i : i + 1], gens()[i : i + 1])[0] == toks[i]


def test_sample_rows_frequencies():
    from h1r_ops.infer.sampling import sample_rows

    x = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    toks = sample_rows(x, [SamplingParams(temperature=1.0, top_p=0.85)] * 4000, gens)
    freq = torch.bincount(toks, minlength=6).double() / 4000
    want = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.0, 0.0]) / 0.9     # nucleus: 0.4 + 0.25 + 0.15 < 0.85
    torch.testing.assert_close(freq, want.double(), atol=0.03, rtol=0)


def test_raw_logprobs_against_log_softmax():
    from h1r_ops.infer.sampling import Workspace, raw_logprobs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 777, generator=g) * 4
    toks = torch.randint(0, 777, (5,), generator=g)
    lp = torch.log_softmax(x.double(), -1)
    for k in (0, 1, 20):
        v, i, chosen = raw_logprobs(x, k, toks, Workspace())
        want_v, want_i = lp.topk(k, -1) if k else (lp[:, :0], None)
        torch.testing.assert_close(v.double(), want_v, atol=1e-5, rtol=0)
        if k:
            assert torch.equal(i, want_i)
        torch.testing.assert_close(chosen.double(), lp.gather(1, toks[:, None])[:, 0], atol=1e-5, rtol=0)


def test_persistent_block_tables_follow_the_tables(model):
    """The engine's per-slot block table rows equal every live trace's pages after each step (pages
    appended, shared partial pages copied on write, preemption and recompute)."""
    p = _prompts(1, seed=4, lo=6, hi=7)[0]
    eng = Engine(model, max_num_seqs=4, block_size=4, num_blocks=20, max_model_len=40)
    eng.add_request(p, SamplingParams(n=7, temperature=0.9, top_p=0.9, max_tokens=30, ignore_eos=True, seed=1))
    checked = 0
    while eng.has_unfinished():
        eng.step()
        for s in eng.running:
            n = -(-(s.table.num_tokens) // 4)
            assert eng.block_tables[s.slot, :n].tolist() == s.table.blocks[:n]
            checked += 1
    assert checked > 0 and eng.stats["preemptions"] > 0
    _no_leak(eng)


def test_confidences_recorded(model):
    eng = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64)
    o = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, logprobs=5, keep_logprobs=True,
                                                   ignore_eos=True))[0][0]
    ids = torch.tensor([[5, 6, 7] + o.token_ids[:-1]])
    lp = torch.log_softmax(model(ids, return_logits=True)["logits"][0, 2:].float(), -1)
    want = -lp.topk(5, -1).values.mean(-1)
    torch.testing.assert_close(torch.tensor(o.token_confidences), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(o.token_logprobs), lp.gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0],
                               atol=1e-4, rtol=1e-4)
    assert len(o.top_logprobs) == 5 and o.top_logprobs[0][0][0] == o.token_ids[0]


def test_bad_arguments(model):
    eng = Engine(model, max_num_seqs=2, block_size=4, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(list(range(3, 15)), SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("hello", SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# -- text, stop strings and the CLI ----------------------------------------------------------------------------
def _char_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789{}\\ .,=+-()"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), 97)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return tok


def test_text_prompts_and_stop_strings(model):
    tok = _char_tokenizer()
    eng = Engine(model, tok, max_num_seqs=4, block_size=4, max_model_len=64)
    full = eng.generate("abc", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0][0]
    assert full.text == tok.decode(full.token_ids)
    stop = tok.decode(full.token_ids[6:8])
    assert stop in full.text
    o = eng.generate("abc", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0][0]
    assert o.finish_reason == "stop" and o.stop_reason == stop and o.text == full.text[: full.text.index(stop)]
    _no_leak(eng)


def test_cli_generate_and_deepconf(model, tmp_path, capsys):
    from h1r_ops.cli import main

    model.save_pretrained(tmp_path)
    _char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert main(["generate", str(tmp_path), "--prompt", "ab", "-n", "3", "--max-tokens", "6", "--dtype", "fp32",
                 "--ssm-state-dtype", "bf16", "--json"]) == 0
    out = capsys.readouterr()
    assert out.out.count('"finish_reason"') == 3 and "tokens/s" in out.err
    assert main(["deepconf", str(tmp_path), "--prompt-ids", "5,6,7", "--budget", "6", "--warmup", "3", "--window", "4",
                 "--max-tokens", "8", "--dtype", "fp32", "--eta", "50"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "without pruning" in out and "threshold s" in out
