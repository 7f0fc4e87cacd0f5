"""Paged attention: the reference against SDPA on contiguous K/V, the CPU kernels against the reference.

Tolerances (max abs error on outputs of magnitude ~1): fp32 2e-5 (ref vs SDPA 1e-5); bf16 2e-2; fp16 3e-3.
The kernels accumulate in fp32 and differ from the reference only by summation order (and, for
bf16/fp16, by rounding the output once).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
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
