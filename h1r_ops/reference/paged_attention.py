"""Paged attention, written from the math (ground truth for the kernels).

The KV cache is a pool of fixed-size pages ("blocks"):
``key_cache, value_cache: (num_blocks, block_size, num_kv_heads, head_dim)``. Sequence ``i`` owns the
physical pages ``block_tables[i, 0], block_tables[i, 1], ...`` in logical order, so its token ``t`` lives at
``(block_tables[i, t // block_size], t % block_size)``. Its first ``seq_lens[i]`` tokens are valid; the
rest of the table is ignored (it may hold anything).

Attention per sequence is plain causal softmax attention over those keys, with grouped-query heads:
query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)`` (the layout of HF ``repeat_kv`` and of
SDPA's ``enable_gqa``). A sequence with ``q_len`` queries and ``seq_len`` keys holds its queries at the
last positions: query ``j`` sits at position ``seq_len - q_len + j`` and sees keys ``0 .. that position``.
Scores, softmax and the weighted sum are computed in fp32 and the result is returned in q's dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reshape_and_cache_ref", "paged_attention_decode_ref", "paged_attention_prefill_ref", "gather_kv_ref"]


def reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Write ``key, value (tokens, hk, hd)`` into the caches, in place, at ``slot_mapping (tokens,)``.

    A slot is ``block * block_size + offset``; negative slots (padding tokens) are skipped."""
    num_blocks, block_size = key_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block, offset = slots // block_size, slots % block_size
    key_cache[block, offset] = key[keep].to(key_cache.dtype)
    value_cache[block, offset] = value[keep].to(value_cache.dtype)


def gather_kv_ref(cache, block_table, seq_len: int):
    """The first ``seq_len`` tokens of one sequence as a contiguous ``(seq_len, hk, hd)`` tensor."""
    block_size = cache.shape[1]
    n_pages = -(-seq_len // block_size)
    pages = cache[block_table[:n_pages].long()]  # (n_pages, block_size, hk, hd)
    return pages.reshape(n_pages * block_size, *cache.shape[2:])[:seq_len]


def _attend(q, k, v, scale: float):
    """Causal GQA attention of one sequence: q (q_len, hq, hd), k/v (seq_len, hk, hd), queries last."""
    q_len, hq, _ = q.shape
    seq_len, hk, _ = k.shape
    group = hq // hk
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute).transpose(0, 1)  # (hq, q_len, hd)
    kf = k.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)  # (hq, seq_len, hd)
    vf = v.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (qf @ kf.transpose(1, 2)) * scale  # (hq, q_len, seq_len)
    q_pos = torch.arange(q_len) + (seq_len - q_len)
    visible = torch.arange(seq_len)[None, :] <= q_pos[:, None]  # (q_len, seq_len)
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vf).transpose(0, 1).to(q.dtype)  # (q_len, hq, hd)


def _default_scale(scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def paged_attention_decode_ref(q, key_cache, value_cache, block_tables, seq_lens, scale=None):
    """One query per sequence. q (b, hq, hd), sitting at position seq_lens[i] - 1; returns (b, hq, hd)."""
    scale = _default_scale(scale, q.shape[-1])
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        k = gather_kv_ref(key_cache, block_tables[i], n)
        v = gather_kv_ref(value_cache, block_tables[i], n)
        out[i] = _attend(q[i : i + 1], k, v, scale)[0]
    return out


def paged_attention_prefill_ref(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale=None):
    """Queries packed by cu_seqlens_q: q (total_q, hq, hd); sequence i owns rows cu[i]:cu[i+1], its last
    positions, and attends causally over its seq_lens[i] keys. Returns (total_q, hq, hd)."""
    scale = _default_scale(scale, q.shape[-1])
    out = torch.empty_like(q)
    for i in range(block_tables.shape[0]):
        lo, hi = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        if hi == lo:
            continue
        n = int(seq_lens[i])
        k = gather_kv_ref(key_cache, block_tables[i], n)
        v = gather_kv_ref(value_cache, block_tables[i], n)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale)
    return out
