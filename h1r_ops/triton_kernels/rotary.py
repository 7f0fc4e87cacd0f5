"""Triton kernel for the rotary embedding (NeoX / rotate_half layout): forward, inverse (= backward) and in place.

Registered for the CUDA dispatch key of ``torch.ops.h1r.rotary`` / ``rotary_`` by h1r_ops/ops/rotary.py; the
launchers take torch tensors and also run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).

One program per token (batch b, position t), as Liger's rope: it loads the token's cos / sin row once (through
position_ids when given) and rotates all q heads, then all k heads, as [heads, rd/2] tiles, whatever the
strides of q and k (unit last stride). The functional form also copies the channels past rd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, XO, b, t, sb, sh, ss, osb, osh, oss, nheads, c1, c2, s1, s2, half, rd, hd,
                  HEADS: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr, INVERSE: tl.constexpr,
                  COPY_TAIL: tl.constexpr):
    h = tl.arange(0, HEADS)[:, None]
    i = tl.arange(0, HALF)[None, :]
    mask = (h < nheads) & (i < half)
    x_ptr = X + b * sb + h * sh + t * ss + i
    o_ptr = XO + b * osb + h * osh + t * oss + i
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation: its backward
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(o_ptr, y1.to(XO.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, y2.to(XO.dtype.element_ty), mask=mask)
    if COPY_TAIL:  # channels [rd, hd) pass through
        j = rd + tl.arange(0, TAIL)[None, :]
        tmask = (h < nheads) & (j < hd)
        tail = tl.load(X + b * sb + h * sh + t * ss + j, mask=tmask)
        tl.store(XO + b * osb + h * osh + t * oss + j, tail, mask=tmask)


@triton.jit
def _rotary_kernel(Q, QO, K, KO, COS, SIN, POS, max_pos, seqlen, hq, hk, rd, hd, cos_batch_stride,
                   q_sb, q_sh, q_ss, qo_sb, qo_sh, qo_ss, k_sb, k_sh, k_ss, ko_sb, ko_sh, ko_ss,
                   HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr,
                   HAS_POS: tl.constexpr, INVERSE: tl.constexpr, COPY_TAIL: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seqlen
    t = token % seqlen
    half = rd // 2
    i = tl.arange(0, HALF)[None, :]
    m = i < half
    if HAS_POS:
        pos = tl.load(POS + token)  # position_ids is (b, s) contiguous: index = token
        # The CPU glue raises on positions outside the table; here (no host sync) they are asserted in
        # debug builds and never read out of bounds (their cos / sin read as 0).
        tl.device_assert((pos >= 0) & (pos < max_pos), "rotary: position_ids out of range of cos / sin")
        m = m & (pos >= 0) & (pos < max_pos)
        row = pos * rd
    else:
        row = b * cos_batch_stride + t * rd
    c1 = tl.load(COS + row + i, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(COS + row + half + i, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + row + i, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + row + half + i, mask=m, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, b, t, q_sb, q_sh, q_ss, qo_sb, qo_sh, qo_ss, hq, c1, c2, s1, s2, half, rd, hd,
                  HQ, HALF, TAIL, INVERSE, COPY_TAIL)
    _rotate_heads(K, KO, b, t, k_sb, k_sh, k_ss, ko_sb, ko_sh, ko_ss, hk, c1, c2, s1, s2, half, rd, hd,
                  HK, HALF, TAIL, INVERSE, COPY_TAIL)


def _check(cond: bool, name: str, msg: str):
    if not cond:
        raise ValueError(f"argument '{name}': {msg}")


def _launch(q, k, q_out, k_out, cos, sin, position_ids, inverse):
    for name, t in (("q", q), ("k", k)):
        _check(t.dim() == 4 and t.stride(-1) == 1 and t.dtype == q.dtype, name,
               "expected (b, heads, s, hd) with a unit last stride and q's dtype")
    b, hq, s, hd = q.shape
    hk = k.shape[1]
    _check(k.shape[0] == b and k.shape[2] == s and k.shape[3] == hd, "k", f"expected (b, hk, s, hd) = ({b}, hk, {s}, {hd})")
    _check(cos.is_contiguous() and sin.is_contiguous() and sin.shape == cos.shape, "cos", "expected contiguous cos/sin of one shape")
    rd = cos.shape[-1]
    _check(rd % 2 == 0 and 2 <= rd <= hd, "cos", f"expected an even rotary width <= {hd}, got {rd}")
    if position_ids is not None:
        _check(cos.dim() == 2 and position_ids.shape == (b, s) and position_ids.is_contiguous(), "position_ids",
               "expected (b, s) contiguous with a (max_pos, rd) table")
        cos_batch_stride = 0
    else:
        _check(cos.dim() == 3 and cos.shape[0] in (1, b) and cos.shape[1] == s, "cos", f"expected (1 or {b}, {s}, rd)")
        cos_batch_stride = 0 if cos.shape[0] == 1 else s * rd
    if b * s == 0:
        return
    copy_tail = rd < hd and q_out.data_ptr() != q.data_ptr()
    heads = max(hq, hk)
    _rotary_kernel[(b * s,)](
        q, q_out, k, k_out, cos, sin, position_ids, cos.shape[0], s, hq, hk, rd, hd, cos_batch_stride,
        *q.stride()[:3], *q_out.stride()[:3], *k.stride()[:3], *k_out.stride()[:3],
        HQ=triton.next_power_of_2(max(hq, 1)), HK=triton.next_power_of_2(max(hk, 1)),
        HALF=triton.next_power_of_2(rd // 2), TAIL=triton.next_power_of_2(max(hd - rd, 1)),
        HAS_POS=position_ids is not None, INVERSE=bool(inverse), COPY_TAIL=copy_tail,
        num_warps=8 if heads * rd >= 4096 else 4,
    )


def rotary(q, k, cos, sin, position_ids, inverse):
    """torch.ops.h1r.rotary: returns new (q, k) (same layout as the inputs when dense)."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, q_out, k_out, cos, sin, position_ids, inverse)
    return q_out, k_out


def rotary_(q, k, cos, sin, position_ids, inverse):
    """torch.ops.h1r.rotary_: rotates q and k in place."""
    _launch(q, k, q, k, cos, sin, position_ids, inverse)
