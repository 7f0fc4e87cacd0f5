"""Paged attention (vLLM-style KV cache in fixed-size pages), for the batched decoder.

Cache layout: ``key_cache, value_cache: (num_blocks, block_size, num_kv_heads, head_dim)``, both of one
dtype (fp32, bf16 or fp16). Sequence ``i`` owns the pages ``block_tables[i, :ceil(seq_lens[i] /
block_size)]`` (int32, logical to physical); the rest of its table row is never read. Grouped-query
attention: query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``. Queries sit at the last
positions of their sequence and attend causally. Scores and softmax are computed in fp32; the output
has q's dtype.

These are inference ops: they have no autograd formula (calling them on tensors that require grad
gives outputs that do not; train through an ordinary attention instead).

Validation: shapes, dtypes and devices are checked here; the *values* of the page tables (every used
``block_tables`` entry inside ``[0, num_blocks)``, ``0 <= seq_lens <= max_blocks * block_size``, sane
``cu_seqlens_q`` and ``slot_mapping``) are checked by the CPU kernel's glue in one pass over the tables
(no extra torch ops on the decode path), and here with torch ops for other devices (skipped while
torch.compile traces, as it would need a host sync). Either way a bad table raises ``ValueError``.
"""

from __future__ import annotations

import math

import torch

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, Shapes
from .._registry import has_kernel, require_kernel

__all__ = ["reshape_and_cache", "paged_attention_decode", "paged_attention_prefill"]


_CPU_KERNEL_LOADED: bool | None = None


def _cpu_kernel_loaded() -> bool:
    """Whether the CPU decode kernel is registered (looked up once; kernels are never unregistered)."""
    global _CPU_KERNEL_LOADED
    if not _CPU_KERNEL_LOADED:
        _CPU_KERNEL_LOADED = has_kernel("paged_attention_decode", "cpu")
    return _CPU_KERNEL_LOADED


def _check_caches(s: Shapes, key_cache, value_cache):
    s.check("key_cache", key_cache, ("num_blocks", "block_size", "num_kv_heads", "head_dim"))
    s.check("value_cache", value_cache, ("num_blocks", "block_size", "num_kv_heads", "head_dim"))
    s.require(value_cache.dtype == key_cache.dtype, "value_cache",
              f"expected the dtype of key_cache ({key_cache.dtype}), got {value_cache.dtype}")
    s.require(key_cache.is_contiguous(), "key_cache", "expected a contiguous cache (it is written in place)")
    s.require(value_cache.is_contiguous(), "value_cache", "expected a contiguous cache (it is written in place)")


def _check_attention(s: Shapes, q, key_cache, value_cache, block_tables, seq_lens, scale, q_rows: str):
    s.check("q", q, (q_rows, "num_heads", "head_dim"))
    _check_caches(s, key_cache, value_cache)
    s.check("block_tables", block_tables, ("batch", "max_blocks"), dtypes=INDEX_DTYPES)
    s.check("seq_lens", seq_lens, ("batch",), dtypes=INDEX_DTYPES)
    s.require(s["num_heads"] % max(s["num_kv_heads"], 1) == 0 and s["num_kv_heads"] > 0, "q",
              f"num_heads {s['num_heads']} must be a multiple of num_kv_heads {s['num_kv_heads']} (key_cache.shape[2])")
    if scale is None:
        scale = 1.0 / math.sqrt(s["head_dim"])
    s.require(math.isfinite(float(scale)), "scale", f"expected a finite number, got {scale!r}")
    return block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(), float(scale)


def _fast_decode_ok(q, key_cache, value_cache, block_tables, seq_lens) -> bool:
    """The common, valid decode call, recognized with a few attribute reads (the decode step runs once per
    layer per token: the full Shapes validation costs more than the kernel at small contexts). Anything
    else goes through the full validation, which normalizes or raises."""
    return (
        type(q) is torch.Tensor and type(key_cache) is torch.Tensor and type(value_cache) is torch.Tensor
        and type(block_tables) is torch.Tensor and type(seq_lens) is torch.Tensor
        and q.dim() == 3 and key_cache.dim() == 4 and block_tables.dim() == 2 and seq_lens.dim() == 1
        and q.dtype in FLOAT_DTYPES and key_cache.dtype in FLOAT_DTYPES and value_cache.dtype == key_cache.dtype
        and block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
        and value_cache.shape == key_cache.shape
        and q.shape[0] == block_tables.shape[0] == seq_lens.shape[0]
        and q.shape[2] == key_cache.shape[3] and key_cache.shape[2] > 0 and q.shape[1] % key_cache.shape[2] == 0
        and q.device.type == "cpu" and key_cache.device == q.device and value_cache.device == q.device
        and block_tables.device == q.device and seq_lens.device == q.device
        and key_cache.is_contiguous() and value_cache.is_contiguous()
        and block_tables.is_contiguous() and seq_lens.is_contiguous()
    )


def _fast_cache_ok(key, value, key_cache, value_cache, slot_mapping) -> bool:
    """A CPU cache write with int64 slots (the decoder's, once per layer per step): the kernel's glue checks
    every shape, dtype, device and slot itself (raising the same ValueError), so the Shapes validation,
    which costs more than the write of a decode step, is skipped."""
    return (
        type(key) is torch.Tensor and type(value) is torch.Tensor and type(key_cache) is torch.Tensor
        and type(value_cache) is torch.Tensor and type(slot_mapping) is torch.Tensor
        and slot_mapping.dtype == torch.int64 and key_cache.device.type == "cpu"
    )


def _check_table_values(s: Shapes, block_tables, seq_lens, block_size: int, num_blocks: int):
    """Page-table values, with torch ops (non-CPU devices; the CPU glue checks them itself)."""
    if block_tables.device.type == "cpu" or torch.compiler.is_compiling():
        return
    max_blocks = block_tables.shape[1]
    n_pages = (seq_lens.long() + block_size - 1) // block_size
    used = torch.arange(max_blocks, device=block_tables.device)[None, :] < n_pages[:, None]
    bad_table = (used & ((block_tables < 0) | (block_tables >= num_blocks))).any()
    bad_lens = ((seq_lens < 0) | (seq_lens > max_blocks * block_size)).any()
    bad_table, bad_lens = torch.stack([bad_table, bad_lens]).tolist()
    s.require(not bad_lens, "seq_lens", f"expected values in [0, max_blocks * block_size = {max_blocks * block_size}]")
    s.require(not bad_table, "block_tables", f"a used entry is outside [0, num_blocks = {num_blocks})")


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Write new keys and values into the paged caches, in place.

    Args:
        key, value: ``(tokens, num_kv_heads, head_dim)``, any float dtype (cast to the cache's).
        key_cache, value_cache: ``(num_blocks, block_size, num_kv_heads, head_dim)``, contiguous.
        slot_mapping: ``(tokens,)`` int64 (int32 accepted): ``block * block_size + offset`` of each token;
            negative slots (padding) are skipped.
    """
    if not torch.compiler.is_compiling() and _fast_cache_ok(key, value, key_cache, value_cache, slot_mapping) \
            and _cpu_kernel_loaded():
        torch.ops.h1r.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    s = Shapes("reshape_and_cache")
    _check_caches(s, key_cache, value_cache)
    s.check("key", key, ("tokens", "num_kv_heads", "head_dim"))
    s.check("value", value, ("tokens", "num_kv_heads", "head_dim"))
    s.check("slot_mapping", slot_mapping, ("tokens",), dtypes=INDEX_DTYPES)
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    if slot_mapping.device.type != "cpu" and not torch.compiler.is_compiling() and slot_mapping.numel():
        s.require(int(slot_mapping.max()) < s["num_blocks"] * s["block_size"], "slot_mapping",
                  f"expected slots below num_blocks * block_size = {s['num_blocks'] * s['block_size']}")
    require_kernel("reshape_and_cache", key.device)
    torch.ops.h1r.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_decode(q, key_cache, value_cache, block_tables, seq_lens, scale=None):
    """One decode step of attention over paged K/V.

    Args:
        q: ``(batch, num_heads, head_dim)``: the query of each sequence, at position ``seq_lens[i] - 1``.
        key_cache, value_cache: ``(num_blocks, block_size, num_kv_heads, head_dim)``, one dtype.
        block_tables: ``(batch, max_blocks)`` int32: physical page of each logical page of each sequence.
        seq_lens: ``(batch,)`` int32: context length of each sequence, the current token included
            (0 gives a zero output, for padded batch rows).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    Returns:
        ``(batch, num_heads, head_dim)`` in q's dtype.
    """
    if not torch.compiler.is_compiling() and _fast_decode_ok(q, key_cache, value_cache, block_tables, seq_lens):
        # CPU: the kernel's glue checks the table values; the kernel is there whenever _C loaded
        scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
        if math.isfinite(scale) and _cpu_kernel_loaded():
            return torch.ops.h1r.paged_attention_decode(q, key_cache, value_cache, block_tables, seq_lens, scale)
    s = Shapes("paged_attention_decode")
    block_tables, seq_lens, scale = _check_attention(s, q, key_cache, value_cache, block_tables, seq_lens, scale, "batch")
    _check_table_values(s, block_tables, seq_lens, s["block_size"], s["num_blocks"])
    require_kernel("paged_attention_decode", q.device)
    return torch.ops.h1r.paged_attention_decode(q, key_cache, value_cache, block_tables, seq_lens, scale)


def paged_attention_prefill(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale=None):
    """Causal attention of packed new queries (prefill or chunked prefill) over paged K/V.

    Args:
        q: ``(total_q, num_heads, head_dim)``: the queries of all sequences, packed.
        key_cache, value_cache: ``(num_blocks, block_size, num_kv_heads, head_dim)``; the new tokens' keys
            and values must already be written (``reshape_and_cache``).
        block_tables: ``(batch, max_blocks)`` int32.
        seq_lens: ``(batch,)`` int32: context length of each sequence, the new tokens included.
        cu_seqlens_q: ``(batch + 1,)`` int32: sequence ``i`` owns rows ``cu[i]:cu[i+1]`` of q, which are its
            last ``q_len = cu[i+1] - cu[i] <= seq_lens[i]`` positions: query ``j`` is at position
            ``seq_lens[i] - q_len + j`` and sees keys ``0 ..`` that position.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    Returns:
        ``(total_q, num_heads, head_dim)`` in q's dtype.
    """
    s = Shapes("paged_attention_prefill")
    block_tables, seq_lens, scale = _check_attention(s, q, key_cache, value_cache, block_tables, seq_lens, scale, "total_q")
    s.check("cu_seqlens_q", cu_seqlens_q, (s["batch"] + 1,), dtypes=INDEX_DTYPES)
    cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    _check_table_values(s, block_tables, seq_lens, s["block_size"], s["num_blocks"])
    if q.device.type != "cpu" and not torch.compiler.is_compiling():
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        ok = (cu_seqlens_q[0] == 0) & (cu_seqlens_q[-1] == q.shape[0]) & ((q_lens >= 0) & (q_lens <= seq_lens)).all()
        s.require(bool(ok), "cu_seqlens_q", "expected 0 = cu[0] <= ... <= cu[-1] = total_q with q_len <= seq_lens")
    require_kernel("paged_attention_prefill", q.device)
    return torch.ops.h1r.paged_attention_prefill(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale)


# ---- fake (meta) implementations: shapes only, for torch.compile and opcheck ---------------------------
@torch.library.register_fake("h1r::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
    return None


@torch.library.register_fake("h1r::paged_attention_decode")
def _decode_fake(q, key_cache, value_cache, block_tables, seq_lens, scale):
    return q.new_empty(q.shape)  # contiguous, whatever q's layout


@torch.library.register_fake("h1r::paged_attention_prefill")
def _prefill_fake(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale):
    return q.new_empty(q.shape)  # contiguous, whatever q's layout
