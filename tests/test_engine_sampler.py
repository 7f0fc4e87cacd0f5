"""The decoder's fused sampler (h1r::sample_top_p) against its full-sort reference and the engine's torch
sampler, the model's logits(out=), and the engine's use of both."""

import os
import sys

import pytest
import torch
from _isa import run_script

sys.path.insert(0, os.path.dirname(__file__))
from _engine_helpers import one_thread, tiny_model  # noqa: E402

import h1r_ops  # noqa: E402
from h1r_ops.infer import Engine, SamplingParams  # noqa: E402
from h1r_ops.infer.sampling import Workspace, raw_logprobs, sample_rows  # noqa: E402
from h1r_ops.reference import sample_top_p_ref  # noqa: E402

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
# log-prob tolerance (fp32 kernel vs fp64 reference, logits up to ~|40|): absolute
LP_ATOL = 2e-4


def _rows(b, V, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(b, V, generator=g) * 3
    elif kind == "ties":      # few distinct values: ties everywhere, ranked lowest id first
        x = torch.randint(0, 4, (b, V), generator=g).float()
    elif kind == "peaked":    # one token holds almost all the mass
        x = torch.randn(b, V, generator=g)
        x[:, V // 3] += 30
    elif kind == "flat":
        x = torch.zeros(b, V)
    elif kind == "masked":    # -inf logits (filtered tokens) never drawn
        x = torch.randn(b, V, generator=g) * 2
        x[:, ::3] = float("-inf")
    return x, g


def _params(b, g):
    temp = torch.tensor([0.0, 0.6, 1.0, 1.7])[torch.randint(0, 4, (b,), generator=g)]
    top_p = torch.tensor([1.0, 0.95, 0.5, 0.05])[torch.randint(0, 4, (b,), generator=g)]
    u = 1.0 - torch.rand(b, generator=g)
    return temp, top_p, u


def _check(x, temp, top_p, u, k):
    got = h1r_ops.sample_top_p(x, temp, top_p, u, k)
    want = sample_top_p_ref(x, temp, top_p, u, k)
    assert torch.equal(got[0], want[0])
    finite = torch.isfinite(want[1])
    torch.testing.assert_close(got[1][finite], want[1][finite], atol=LP_ATOL, rtol=0)
    assert torch.equal(got[2][finite], want[2][finite])
    torch.testing.assert_close(got[3], want[3], atol=LP_ATOL, rtol=0)
    return got


@pytest.mark.parametrize("V", [1, 5, 97, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(V, dtype):
    """Tokens equal the full-sort reference (same uniforms), log-probs within LP_ATOL, top-k ids equal;
    V not a multiple of the vector width or of the 64-logit blocks."""
    b = 13
    x, g = _rows(b, V, V)
    temp, top_p, u = _params(b, g)
    x = x.to(dtype)
    for k in sorted({0, 1, min(20, V)}):
        _check(x, temp, top_p, u, k)


@pytest.mark.parametrize("kind", ["ties", "peaked", "flat", "masked"])
def test_edge_rows(kind):
    x, g = _rows(9, 777, 5, kind)
    temp, top_p, u = _params(9, g)
    toks = _check(x, temp, top_p, u, 20)[0]
    assert bool(torch.isfinite(x.gather(1, toks[:, None])).all())


def test_strided_rows_and_extreme_uniforms():
    x, g = _rows(6, 300, 3)
    wide = torch.randn(6, 512)
    wide[:, :300] = x
    temp = torch.full((6,), 0.8)
    top_p = torch.tensor([1.0, 0.9, 0.9, 0.3, 1.0, 0.99])
    u = torch.tensor([1.0, 1.0, 1e-7, 1e-7, 0.5, 1.0])   # u = 1: the last kept token; tiny u: the first kept
    got = h1r_ops.sample_top_p(wide[:, :300], temp, top_p, u, 4)
    assert torch.equal(got[0], sample_top_p_ref(x, temp, top_p, u, 4)[0])


def test_equals_the_engine_torch_sampler():
    """Same uniforms -> the same tokens and log-probs as infer.sampling's bucketing torch sampler."""
    x, g = _rows(32, 5000, 7)
    params = [SamplingParams(temperature=t, top_p=p) for t, p in
              zip(torch.tensor([0.6, 1.0, 0.0, 1.3])[torch.randint(0, 4, (32,), generator=g)].tolist(),
                  torch.tensor([0.95, 1.0, 0.7, 0.2])[torch.randint(0, 4, (32,), generator=g)].tolist())]
    u = torch.tensor([1.0 - float(torch.rand((), generator=g)) if p.temperature > 0 else 1.0 for p in params])
    tokens = sample_rows(x, params, [None] * 32, Workspace(), uniform=u)
    tv, ti, chosen = raw_logprobs(x, 20, tokens)
    got = h1r_ops.sample_top_p(x, torch.tensor([p.temperature for p in params]),
                               torch.tensor([p.top_p for p in params]), u, 20)
    assert torch.equal(got[0], tokens)
    torch.testing.assert_close(got[1], tv, atol=LP_ATOL, rtol=0)
    torch.testing.assert_close(got[3], chosen, atol=LP_ATOL, rtol=0)


def test_frequencies():
    """Many draws of one row: the nucleus frequencies (independent of the reference)."""
    n = 4000
    x = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])).repeat(n, 1)
    u = 1.0 - torch.rand(n, generator=torch.Generator().manual_seed(0))
    toks = h1r_ops.sample_top_p(x, torch.ones(n), torch.full((n,), 0.85), u, 0)[0]
    freq = torch.bincount(toks, minlength=6).double() / n
    want = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.0, 0.0]) / 0.9     # nucleus: 0.4 + 0.25 + 0.15 < 0.85
    torch.testing.assert_close(freq, want.double(), atol=0.03, rtol=0)


def test_reference_rules_by_hand():
    """The reference itself on a row small enough to work out: p = [0.5, 0.3, 0.2] (ids 2, 0, 1)."""
    x = torch.log(torch.tensor([[0.3, 0.2, 0.5]]))
    one = torch.ones(1)
    # top_p 0.6: kept = {2 (above 0), 0 (above 0.5)}; 1 has 0.8 above it. Vocab order: 0 (0.3), 2 (0.5)
    assert sample_top_p_ref(x, one, torch.tensor([0.6]), torch.tensor([0.3 / 0.8 - 1e-6]), 0)[0].item() == 0
    assert sample_top_p_ref(x, one, torch.tensor([0.6]), torch.tensor([0.3 / 0.8 + 1e-6]), 0)[0].item() == 2
    assert sample_top_p_ref(x, torch.zeros(1), one, one, 0)[0].item() == 2


def test_bad_arguments():
    x = torch.randn(3, 10)
    ok = (torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="argument 'logits'"):
        h1r_ops.sample_top_p(torch.randn(10), *ok)
    with pytest.raises(ValueError, match="argument 'top_p'"):
        h1r_ops.sample_top_p(x, torch.ones(3), torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="argument 'num_logprobs'"):
        h1r_ops.sample_top_p(x, *ok, 11)
    with pytest.raises(ValueError, match="argument 'uniform'"):   # the C++ glue checks direct calls too
        torch.ops.h1r.sample_top_p(x, torch.ones(3), torch.ones(3), torch.ones(3, dtype=torch.float64), 2)


def test_opcheck_and_compile():
    x = torch.randn(4, 50)
    args = (x, torch.full((4,), 0.7), torch.full((4,), 0.9), torch.full((4,), 0.5), 3)
    torch.library.opcheck(torch.ops.h1r.sample_top_p.default, args)
    got = torch.compile(h1r_ops.sample_top_p, fullgraph=True)(*args)
    want = h1r_ops.sample_top_p(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
import h1r_ops
assert torch.ops.h1r.cpu_isa() in ("{isa}", "scalar")
import test_engine_sampler as t
t.test_matches_reference(1000, torch.bfloat16)
t.test_matches_reference(97, torch.float32)
t.test_edge_rows("ties")
t.test_edge_rows("masked")
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_variants(isa):
    run_script(_ISA_SCRIPT.format(isa=isa), {"H1R_CPU_ISA": isa})


# -- the model's logits(out=) and the engine ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_out_equals_logits(dtype):
    # 20 rows: above the row kernel's threshold, the same GEMM as logits() (fewer rows: see below)
    m = tiny_model(seed=2).to(dtype)
    h = torch.randn(20, m.config.hidden_size, dtype=dtype)
    out = torch.empty(20, m.config.vocab_size, dtype=dtype)
    with torch.no_grad():
        assert m.logits(h, out=out) is out
    assert torch.equal(out, m.logits(h))
    with pytest.raises(ValueError, match="argument 'out'"):
        m.logits(h, out=torch.empty(20, m.config.vocab_size, dtype=torch.float64))
    few = torch.empty(3, m.config.vocab_size, dtype=dtype)
    with torch.no_grad():
        m.logits(h[:3], out=few)
    tol = dict(atol=2e-2, rtol=1.6e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(few, m.logits(h[:3]), **tol)



def test_logits_out_prepacked_and_few_rows():
    """bf16 logits(out=) on the prepacked lm head equal the plain GEMM's bit for bit."""
    m = tiny_model(seed=2).to(torch.bfloat16)
    h = torch.randn(9, m.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = m.logits(h)
        m.prepack_weights()
        if getattr(m, "_lm_pack", None) is None:
            pytest.skip("oneDNN has no blocked bf16 layout here")
        out = torch.empty_like(plain)
        assert m.logits(h, out=out) is out
        torch.testing.assert_close(out, plain, atol=0, rtol=0)


def test_engine_prepacked_weights_same_greedy_tokens():
    """Engine(prepack_weights=True) decodes the same greedy tokens as the engine on the plain weights."""
    prompts = [[5, 7, 9, 11], [3, 4], [8, 8, 8]]
    params = SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = []
    for prepack in (False, True):
        m = tiny_model(seed=4).to(torch.bfloat16).fuse_projections()
        eng = Engine(m, max_num_seqs=9, block_size=4, max_model_len=32, prepack_weights=prepack)
        outs.append([[x.token_ids for x in r] for r in eng.generate(prompts, params)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_fused_sampler_equals_torch_sampler(dtype, monkeypatch):
    """The engine samples with h1r::sample_top_p when every row is greedy / temperature / top-p, else with
    the torch sampler: with the kernel hidden, the same seeded traces (tokens and log-probs)."""
    m = tiny_model(seed=4).to(dtype).fuse_projections()
    prompts = [[5, 7, 9, 11], [3, 4]]
    params = [SamplingParams(n=4, temperature=0.7, top_p=0.9, seed=1, max_tokens=9, ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, seed=2, max_tokens=6, ignore_eos=True)]
    calls = []
    real = torch.ops.h1r.sample_top_p
    outs = {}
    for fused in (True, False):
        eng = Engine(m, max_num_seqs=4, block_size=4, max_model_len=32)
        monkeypatch.setattr(eng, "_has_sampler", fused)
        if fused:
            monkeypatch.setattr(torch.ops.h1r, "sample_top_p", lambda *a: calls.append(1) or real(*a))
        outs[fused] = eng.generate(prompts, params)
        monkeypatch.setattr(torch.ops.h1r, "sample_top_p", real)
    assert calls
    for a, b in zip(outs[True], outs[False]):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.token_logprobs), torch.tensor(y.token_logprobs), atol=LP_ATOL,
                                       rtol=0)
            torch.testing.assert_close(torch.tensor(x.token_confidences), torch.tensor(y.token_confidences),
                                       atol=LP_ATOL, rtol=0)


def test_engine_default_state_dtype_is_the_model_dtype():
    m = tiny_model(seed=4).to(torch.bfloat16)
    assert Engine(m, max_num_seqs=2, max_model_len=16).states.ssm.dtype == torch.bfloat16
    assert Engine(m, max_num_seqs=2, max_model_len=16, ssm_state_dtype=torch.float32).states.ssm.dtype == torch.float32
