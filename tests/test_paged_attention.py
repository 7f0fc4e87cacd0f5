"""Paged attention: the reference against SDPA on contiguous K/V, the CPU kernels against the reference.

Tolerances (max abs error on outputs of magnitude ~1): fp32 2e-5 (ref vs SDPA 1e-5); bf16 2e-2; fp16 3e-3.
The kernels accumulate in fp32 and differ from the reference only by summation order (and, for
bf16/fp16, by rounding the output once).
"""

from __future__ import annotations

import math

import pytest
import torch
from _isa import run_script
import torch.nn.functional as F

from h1r_ops.reference import (
    paged_attention_decode_ref,
    paged_attention_prefill_ref,
    reshape_and_cache_ref,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def make_paged(seq_lens, block_size, hk, hd, dtype=torch.float32, extra_blocks=3, seed=0, table_fill=-1):
    """Random contiguous K/V per sequence, scattered into a shuffled page pool with holes.

    Returns (key_cache, value_cache, block_tables (int32), ks, vs) where ks[i], vs[i] (seq_len_i, hk, hd)
    are the contiguous keys/values of sequence i. Physical pages are a random permutation of the pool,
    `extra_blocks` pages per sequence stay unused (holes between the used ones), and the unused tail of
    every block table row holds `table_fill` (the kernels must never read it)."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(pages), 1) + 1  # one spare column: the tail of each row is never used
    num_blocks = 2 * sum(pages) + extra_blocks * len(seq_lens) + 1
    perm = torch.randperm(num_blocks, generator=g)
    key_cache = torch.randn(num_blocks, block_size, hk, hd, generator=g).to(dtype)  # garbage in the holes
    value_cache = torch.randn(num_blocks, block_size, hk, hd, generator=g).to(dtype)
    block_tables = torch.full((len(seq_lens), max_blocks), table_fill, dtype=torch.int32)
    ks, vs, nxt = [], [], 0
    for i, n in enumerate(seq_lens):
        k = torch.randn(n, hk, hd, generator=g).to(dtype)
        v = torch.randn(n, hk, hd, generator=g).to(dtype)
        for j in range(pages[i]):
            phys = int(perm[nxt])
            nxt += 1 + (j % 2) * (extra_blocks > 0)  # skip a page every other page: holes
            block_tables[i, j] = phys
            rows = slice(j * block_size, min((j + 1) * block_size, n))
            key_cache[phys, : rows.stop - rows.start] = k[rows]
            value_cache[phys, : rows.stop - rows.start] = v[rows]
        ks.append(k)
        vs.append(v)
    return key_cache, value_cache, block_tables, ks, vs


def sdpa_one(q, k, v, scale):
    """Independent formulation: SDPA with an explicit causal mask offset to the last positions."""
    q_len, seq_len = q.shape[0], k.shape[0]
    mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1), k.double().transpose(0, 1), v.double().transpose(0, 1),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


# ---------------------------------------------------------------------------------------------------
# The reference against SDPA
# ---------------------------------------------------------------------------------------------------

REF_CASES = [  # (seq_lens, q_lens, block_size, hq, hk, hd)
    ([1, 17, 40, 5], [1, 5, 40, 2], 16, 4, 4, 32),
    ([33, 1, 8], [1, 1, 3], 8, 4, 2, 16),
    ([70, 3], [9, 3], 32, 8, 2, 24),
    ([5, 12, 1], [5, 1, 1], 1, 6, 3, 8),
]


@pytest.mark.parametrize("case", REF_CASES)
def test_reference_matches_sdpa(case):
    seq_lens, q_lens, bs, hq, hk, hd = case
    kc, vc, bt, ks, vs = make_paged(seq_lens, bs, hk, hd, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), hq, hd, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 0.3
    out = paged_attention_prefill_ref(q, kc, vc, bt, sl, cu, scale)
    want = torch.cat([sdpa_one(q[cu[i] : cu[i + 1]], ks[i], vs[i], scale) for i in range(len(seq_lens))])
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)

    # Decode = the last query of each sequence alone.
    qd = torch.randn(len(seq_lens), hq, hd, generator=g, dtype=torch.float64)
    outd = paged_attention_decode_ref(qd, kc, vc, bt, sl)
    wantd = torch.cat([sdpa_one(qd[i : i + 1], ks[i], vs[i], 1 / math.sqrt(hd)) for i in range(len(seq_lens))])
    torch.testing.assert_close(outd, wantd, atol=1e-10, rtol=1e-10)


def test_reference_reshape_and_cache_explicit_loop():
    g = torch.Generator().manual_seed(2)
    nb, bs, hk, hd, T = 6, 4, 2, 8, 10
    kc = torch.randn(nb, bs, hk, hd, generator=g)
    vc = torch.randn(nb, bs, hk, hd, generator=g)
    key, value = torch.randn(T, hk, hd, generator=g), torch.randn(T, hk, hd, generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[3] = -1
    kw, vw = kc.clone(), vc.clone()
    for t in range(T):
        s = int(slots[t])
        if s >= 0:
            kw[s // bs, s % bs] = key[t]
            vw[s // bs, s % bs] = value[t]
    reshape_and_cache_ref(key, value, kc, vc, slots)
    assert torch.equal(kc, kw) and torch.equal(vc, vw)


# ---------------------------------------------------------------------------------------------------
# The CPU kernels against the reference
# ---------------------------------------------------------------------------------------------------

h1r_ops = pytest.importorskip("h1r_ops")
from h1r_ops import paged_attention_decode, paged_attention_prefill, reshape_and_cache  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(out, want, dtype):
    assert out.dtype == want.dtype and out.shape == want.shape
    err = (out.float() - want.float()).abs().max().item() if out.numel() else 0.0
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]} ({dtype})"


DECODE_CASES = [  # (seq_lens, block_size, hq, hk, hd)
    ([1, 17, 40, 5], 16, 4, 4, 64),      # GQA 1, a length-1 sequence
    ([33, 1, 300], 16, 12, 2, 128),      # Falcon-H1 heads (G = 6), lengths not a multiple of 16
    ([70, 3, 129], 32, 8, 2, 80),        # GQA 4, head_dim 80
    ([5, 12, 1, 64], 1, 4, 2, 64),       # block_size 1
    ([1000], 16, 4, 1, 64),              # one long sequence: split into partitions (2+ threads)
    ([5, 700, 2], 8, 2, 1, 72),          # split and unsplit sequences in one batch; head_dim % 16 != 0
    ([0, 9], 4, 4, 2, 16),               # seq_len 0 (padding row) gives zeros
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_matches_reference(case, dtype):
    seq_lens, bs, hq, hk, hd = case
    kc, vc, bt, _, _ = make_paged(seq_lens, bs, hk, hd, dtype=dtype, seed=len(seq_lens) + hd)
    q = torch.randn(len(seq_lens), hq, hd).to(dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention_decode(q, kc, vc, bt, sl)
    want = paged_attention_decode_ref(q, kc, vc, bt, sl)
    assert_close(out, want, dtype)
    if 0 in seq_lens:
        assert out[seq_lens.index(0)].abs().max() == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_partitions_and_fp32_query_on_bf16_cache(threads):
    """Long and short sequences in one batch: with several threads the long one is split into partitions
    (reduced afterwards), with one thread it is not; both must agree with the reference."""
    kc, vc, bt, _, _ = make_paged([2000, 3, 600], 16, 2, 64, dtype=torch.bfloat16, seed=5)
    q = torch.randn(3, 6, 64)  # fp32 query on a bf16 cache: output in fp32
    sl = torch.tensor([2000, 3, 600], dtype=torch.int32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = paged_attention_decode(q, kc, vc, bt, sl, scale=0.2)
    finally:
        torch.set_num_threads(n)
    assert_close(out, paged_attention_decode_ref(q, kc, vc, bt, sl, scale=0.2), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_query_row_views_read_in_place(dtype):
    """q as row views of a wider buffer (the decoder's projection output: any token stride, each row
    contiguous) gives the bits of a contiguous q, for decode and prefill; the output is contiguous."""
    seq_lens, hq, hk, hd = [5, 40, 17], 8, 2, 64
    kc, vc, bt, _, _ = make_paged(seq_lens, 16, hk, hd, dtype=dtype, seed=11)
    buf = torch.randn(3, hq * hd + 24).to(dtype)
    q = buf[:, 8 : 8 + hq * hd].view(3, hq, hd)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.ops.h1r.paged_attention_decode(q, kc, vc, bt, sl, 0.125)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, torch.ops.h1r.paged_attention_decode(q.contiguous(), kc, vc, bt, sl, 0.125))
    cu = torch.arange(4, dtype=torch.int32)
    pre = torch.ops.h1r.paged_attention_prefill(q, kc, vc, bt, sl, cu, 0.125)
    assert torch.equal(pre, torch.ops.h1r.paged_attention_prefill(q.contiguous(), kc, vc, bt, sl, cu, 0.125))


PREFILL_CASES = [  # (seq_lens, q_lens, block_size, hq, hk, hd)
    ([1, 17, 40, 5], [1, 5, 40, 2], 16, 4, 4, 64),
    ([33, 1, 150], [33, 1, 70], 16, 12, 2, 128),   # tiles of 10 queries x 6 heads
    ([70, 3], [9, 0], 32, 8, 2, 80),               # a sequence with no new queries
    ([12, 5], [12, 4], 1, 4, 2, 64),
    ([37], [37], 8, 2, 1, 72),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
def test_prefill_matches_reference(case, dtype):
    seq_lens, q_lens, bs, hq, hk, hd = case
    kc, vc, bt, _, _ = make_paged(seq_lens, bs, hk, hd, dtype=dtype, seed=hd)
    q = torch.randn(sum(q_lens), hq, hd).to(dtype)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention_prefill(q, kc, vc, bt, sl, cu)
    assert_close(out, paged_attention_prefill_ref(q, kc, vc, bt, sl, cu), dtype)


def test_prefill_of_one_query_is_decode():
    seq_lens = [19, 1, 64]
    kc, vc, bt, _, _ = make_paged(seq_lens, 16, 4, 32)
    q = torch.randn(3, 8, 32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    cu = torch.arange(4, dtype=torch.int32)
    torch.testing.assert_close(paged_attention_prefill(q, kc, vc, bt, sl, cu), paged_attention_decode(q, kc, vc, bt, sl),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reshape_and_cache_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    nb, bs, hk, hd, T = 7, 16, 2, 80, 21
    kc = torch.randn(nb, bs, hk, hd, generator=g).to(dtype)
    vc = torch.randn(nb, bs, hk, hd, generator=g).to(dtype)
    key, value = torch.randn(T, hk, hd, generator=g), torch.randn(T, hk, hd, generator=g)  # fp32: cast on write
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[[0, 7]] = -1
    kr, vr = kc.clone(), vc.clone()
    reshape_and_cache_ref(key, value, kr, vr, slots)
    reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)



def test_reshape_and_cache_row_views():
    """key / value as row views of one projection buffer are written without a copy, same bits."""
    g = torch.Generator().manual_seed(4)
    nb, bs, hk, hd, T = 5, 4, 2, 32, 9
    buf = torch.randn(T, 3 * hk * hd + 5, generator=g).to(torch.bfloat16)
    key = buf[:, 5 : 5 + hk * hd].view(T, hk, hd)
    value = buf[:, 5 + 2 * hk * hd :].view(T, hk, hd)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    kc, vc = torch.zeros(nb, bs, hk, hd, dtype=torch.bfloat16), torch.zeros(nb, bs, hk, hd, dtype=torch.bfloat16)
    kr, vr = kc.clone(), vc.clone()
    torch.ops.h1r.reshape_and_cache(key, value, kc, vc, slots)
    torch.ops.h1r.reshape_and_cache(key.contiguous(), value.contiguous(), kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr) and kc.abs().sum() > 0

def test_write_then_attend_round_trip():
    """reshape_and_cache + prefill on a fresh cache equals SDPA on the contiguous sequence."""
    hk, hq, hd, bs, n = 2, 4, 32, 16, 37
    kc, vc = torch.zeros(10, bs, hk, hd), torch.zeros(10, bs, hk, hd)
    bt = torch.tensor([[7, 2, 9, 0]], dtype=torch.int32)
    k, v, q = torch.randn(n, hk, hd), torch.randn(n, hk, hd), torch.randn(n, hq, hd)
    pos = torch.arange(n)
    slots = bt[0, pos // bs].long() * bs + pos % bs
    reshape_and_cache(k, v, kc, vc, slots)
    out = paged_attention_prefill(q, kc, vc, bt, torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32))
    torch.testing.assert_close(out, sdpa_one(q, k, v, 1 / math.sqrt(hd)).float(), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Validation, opcheck, torch.compile, ISA variants
# ---------------------------------------------------------------------------------------------------

def _small():
    kc, vc, bt, _, _ = make_paged([5, 20], 4, 2, 16)
    return torch.randn(2, 4, 16), kc, vc, bt, torch.tensor([5, 20], dtype=torch.int32)


@pytest.mark.parametrize(
    "mutate, arg",
    [
        (lambda a: a.update(bt=a["bt"].clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(10**6, dtype=torch.int32))), "block_tables"),
        (lambda a: a.update(bt=a["bt"].clone().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(-3, dtype=torch.int32))), "block_tables"),
        (lambda a: a.update(sl=torch.tensor([5, 10**4], dtype=torch.int32)), "seq_lens"),
        (lambda a: a.update(sl=torch.tensor([-1, 3], dtype=torch.int32)), "seq_lens"),
        (lambda a: a.update(q=torch.randn(2, 3, 16)), "q"),          # 3 heads vs 2 kv heads
        (lambda a: a.update(q=torch.randn(2, 4, 8)), "key_cache"),   # head_dim mismatch: named at the cache
        (lambda a: a.update(q=torch.randn(3, 4, 16)), "block_tables"),
        (lambda a: a.update(vc=a["vc"].half()), "value_cache"),
        (lambda a: a.update(bt=a["bt"].float()), "block_tables"),
        (lambda a: a.update(q=a["q"].double()), "q"),
    ],
)
def test_decode_bad_input_raises(mutate, arg):
    q, kc, vc, bt, sl = _small()
    a = dict(q=q, kc=kc, vc=vc, bt=bt, sl=sl)
    mutate(a)
    with pytest.raises(ValueError, match=arg):
        paged_attention_decode(a["q"], a["kc"], a["vc"], a["bt"], a["sl"])


def test_unused_table_entries_are_ignored():
    q, kc, vc, bt, sl = _small()
    bt2 = bt.clone()
    bt2[0, 2:] = 10**6  # sequence 0 (5 tokens, block 4) uses only 2 pages
    torch.testing.assert_close(paged_attention_decode(q, kc, vc, bt2, sl), paged_attention_decode(q, kc, vc, bt, sl))


def test_prefill_and_cache_bad_input_raises():
    q, kc, vc, bt, sl = _small()
    qp = torch.randn(7, 4, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention_prefill(qp, kc, vc, bt, sl, torch.tensor([0, 6, 7], dtype=torch.int32))  # 6 > seq_len 5
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention_prefill(qp, kc, vc, bt, sl, torch.tensor([0, 2, 6], dtype=torch.int32))  # != total_q
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention_prefill(qp, kc, vc, bt, sl, torch.tensor([0, 7], dtype=torch.int32))
    key = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        reshape_and_cache(key, key, kc, vc, torch.tensor([0, 1, kc.shape[0] * kc.shape[1]]))
    with pytest.raises(ValueError, match="value"):
        reshape_and_cache(key, torch.randn(3, 2, 8), kc, vc, torch.tensor([0, 1, 2]))


def test_opcheck():
    q, kc, vc, bt, sl = _small()
    torch.library.opcheck(torch.ops.h1r.paged_attention_decode.default, (q, kc, vc, bt, sl, 0.25))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.h1r.paged_attention_prefill.default, (torch.randn(7, 4, 16), kc, vc, bt, sl, cu, 0.25))
    torch.library.opcheck(torch.ops.h1r.reshape_and_cache.default,
                          (torch.randn(3, 2, 16), torch.randn(3, 2, 16), kc.clone(), vc.clone(), torch.tensor([0, -1, 9])))


def test_torch_compile_fullgraph():
    q, kc, vc, bt, sl = _small()

    def step(q, kc, vc, bt, sl, k_new, slots):
        reshape_and_cache(k_new, k_new, kc, vc, slots)
        return paged_attention_decode(q, kc, vc, bt, sl) * 2

    k_new, slots = torch.randn(2, 2, 16), torch.tensor([3, 10])
    want = step(q, kc.clone(), vc.clone(), bt, sl, k_new, slots)
    got = torch.compile(step, fullgraph=True)(q, kc.clone(), vc.clone(), bt, sl, k_new, slots)
    torch.testing.assert_close(got, want)


_ISA_SCRIPT = r"""
import torch, h1r_ops, tests.test_paged_attention as t
assert torch.ops.h1r.cpu_isa() == "{isa}", torch.ops.h1r.cpu_isa()
for dtype in (torch.float32, torch.bfloat16):
    t.test_decode_matches_reference(([33, 1, 300], 16, 12, 2, 128), dtype)
    t.test_decode_matches_reference(([5, 700, 2], 8, 2, 1, 72), dtype)
    t.test_prefill_matches_reference(([33, 1, 150], [33, 1, 70], 16, 12, 2, 128), dtype)
    t.test_prefill_matches_reference(([37], [37], 8, 2, 1, 72), dtype)
t.test_reshape_and_cache_matches_reference(torch.float16)
t.test_prefill_bf16_tiles_match_reference(t.AMX_PREFILL_CASES[4])
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_variants(isa):
    run_script(_ISA_SCRIPT.format(isa=isa), {"H1R_CPU_ISA": isa})


# ---------------------------------------------------------------------------------------------------
# bf16 prefill on AMX tiles (q and caches bf16, head_dim % 32 == 0, where the CPU has AMX; elsewhere and
# under H1R_CPU_NO_AMX=1 these cases run the fp32-vector kernel and must pass all the same).
#
# Tolerance: AMX_TOL = 2e-2 max abs, the bf16 tolerance above, against the fp32 reference on the same bf16
# inputs. The tile path rounds the probabilities P = exp(s - m) to bf16 before P V (as flash-attention does
# for bf16 inputs: relative error <= 2^-9 per weight, so |err| <= 2^-9 max|v| ~ 8e-3 for |v| <= 4, far less
# on average) and the output once to bf16 (2^-9 relative, ~4e-3 at |out| ~ 2); the scores and the softmax
# statistics stay fp32.
# ---------------------------------------------------------------------------------------------------
AMX_TOL = 2e-2
HAS_AMX = bool(torch.ops.h1r.linear_amx())

AMX_PREFILL_CASES = [  # (seq_lens, q_lens, block_size, hq, hk, hd)
    ([512], [512], 16, 8, 2, 128),                  # the model's shape (G = 4), several 128-token chunks
    ([45, 1, 150, 33], [45, 1, 70, 20], 16, 2, 2, 64),  # G = 1, chunked prefill, q_len % 16 != 0
    ([100, 7], [100, 7], 1, 4, 2, 128),             # G = 2, block_size 1
    ([77, 200], [77, 130], 256, 8, 1, 64),          # G = 8, one large page per sequence
    ([37, 0, 64], [29, 0, 64], 16, 6, 2, 96),       # G = 3 (pairs straddle chunks), hd 96, a padded row
    ([300], [1], 16, 8, 2, 128),                    # a single query over a long prefix
    ([50, 19], [50, 19], 8, 4, 2, 80),              # hd 80 (not a multiple of 32): the vector kernel
    ([70, 300], [70, 41], 16, 4, 2, 256),           # hd 256 (the largest on tiles), chunks of 256 tokens
    ([50], [50], 16, 2, 1, 32),                     # hd 32: one k block
]


def _prefill_case(case, seed=0):
    seq_lens, q_lens, bs, hq, hk, hd = case
    kc, vc, bt, _, _ = make_paged(seq_lens, bs, hk, hd, dtype=torch.bfloat16, seed=hd + seed)
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(sum(q_lens), hq, hd, generator=g)).to(torch.bfloat16)  # peaked softmax rows too
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return q, kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32), cu


@pytest.mark.parametrize("case", AMX_PREFILL_CASES, ids=str)
def test_prefill_bf16_tiles_match_reference(case):
    q, kc, vc, bt, sl, cu = _prefill_case(case)
    out = paged_attention_prefill(q, kc, vc, bt, sl, cu)
    want = paged_attention_prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, cu)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    err = (out.float() - want).abs().max().item()
    assert err <= AMX_TOL, f"max abs error {err}"


def test_prefill_bf16_tiles_row_views():
    """q as a column slice of a wider buffer (the fused model's projection output) gives the bits of its
    contiguous copy on the tile path too."""
    q, kc, vc, bt, sl, cu = _prefill_case(AMX_PREFILL_CASES[1])
    buf = torch.zeros(q.shape[0], q.shape[1] * q.shape[2] + 64, dtype=torch.bfloat16)
    view = buf[:, 32 : 32 + q.shape[1] * q.shape[2]].view_as(q)
    view.copy_(q)
    a = torch.ops.h1r.paged_attention_prefill(view, kc, vc, bt, sl, cu, 0.1)
    assert torch.equal(a, torch.ops.h1r.paged_attention_prefill(q, kc, vc, bt, sl, cu, 0.1))


_NO_AMX_SCRIPT = r"""
import torch, h1r_ops, tests.test_paged_attention as t
assert not torch.ops.h1r.linear_amx()
for case in t.AMX_PREFILL_CASES[:3]:
    q, kc, vc, bt, sl, cu = t._prefill_case(case)
    out = torch.ops.h1r.paged_attention_prefill(q, kc, vc, bt, sl, cu, 0.1)
    # the fp32-vector kernel: a bf16 q is widened exactly, so it gives the bits of an fp32 q rounded once
    want = torch.ops.h1r.paged_attention_prefill(q.float(), kc, vc, bt, sl, cu, 0.1).to(torch.bfloat16)
    assert torch.equal(out, want), case
    torch.save(out, "{path}/" + str(len(case[0])) + ".pt")
print("ok")
"""


@pytest.mark.skipif(not HAS_AMX, reason="no AMX on this CPU (the vector kernel runs every case)")
def test_prefill_bf16_tiles_taken_and_no_amx_reproduces_vector_path(tmp_path):
    """H1R_CPU_NO_AMX=1 runs the fp32-vector kernel (its bits: those of an fp32 q rounded once); without it
    the tile path runs: a slightly different result (P in bf16, another summation order), both within
    AMX_TOL of the reference."""
    run_script(_NO_AMX_SCRIPT.format(path=tmp_path), {"H1R_CPU_NO_AMX": "1"})
    for case in AMX_PREFILL_CASES[:3]:
        q, kc, vc, bt, sl, cu = _prefill_case(case)
        tiles = torch.ops.h1r.paged_attention_prefill(q, kc, vc, bt, sl, cu, 0.1)
        vector = torch.load(tmp_path / f"{len(case[0])}.pt")
        assert not torch.equal(tiles, vector), "the tile path did not run"
        want = paged_attention_prefill_ref(q.float(), kc.float(), vc.float(), bt, sl, cu, scale=0.1)
        for out in (tiles, vector):
            assert (out.float() - want).abs().max().item() <= AMX_TOL


@pytest.mark.parametrize("threads", [1, 3])
def test_prefill_bf16_tiles_threads(threads):
    """Work items spread over any number of threads give the same bits (each item is computed alone)."""
    q, kc, vc, bt, sl, cu = _prefill_case(AMX_PREFILL_CASES[3])
    n = torch.get_num_threads()
    try:
        ref = torch.ops.h1r.paged_attention_prefill(q, kc, vc, bt, sl, cu, 0.1)
        torch.set_num_threads(threads)
        out = torch.ops.h1r.paged_attention_prefill(q, kc, vc, bt, sl, cu, 0.1)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(out, ref)
