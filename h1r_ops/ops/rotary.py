"""Rotary position embedding (NeoX / ``rotate_half`` layout): drop-in for HF ``apply_rotary_pos_emb`` and
Liger's ``liger_rotary_pos_emb``, plus the in-place form for inference and the cos / sin helper.

CPU tensors run the C++ kernel (csrc/cpu/rotary*.cpp), CUDA tensors the Triton kernel
(h1r_ops/triton_kernels/rotary.py). q and k rotate in one kernel call. The backward of the rotation is
the inverse rotation (the same kernel with ``inverse=True``); cos / sin receive no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _registry


from .._checks import INDEX_DTYPES, Shapes, check_choice, check_positive
from ..reference.rotary import rotary_cos_sin as _rotary_cos_sin_fp32

__all__ = ["rotary", "rotary_", "rotary_cos_sin", "RotaryEmbedding"]


def _prepare(op, q, k, cos, sin, position_ids, unsqueeze_dim, inplace):
    """Validate; return q, k seen as (b, h, s, hd), cos, sin, position_ids (int64 or None)."""
    check_choice(op, "unsqueeze_dim", unsqueeze_dim, (1, 2))
    s = Shapes(op)
    head_layout = ("b", "hq", "s", "hd") if unsqueeze_dim == 1 else ("b", "s", "hq", "hd")
    s.check("q", q, head_layout)
    s.check("k", k, tuple("hk" if d == "hq" else d for d in head_layout))
    s.require(k.dtype == q.dtype, "k", f"expected dtype {q.dtype} (that of 'q'), got {k.dtype}")
    if unsqueeze_dim == 2:  # (b, s, h, hd) storage seen as (b, h, s, hd)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if position_ids is None:
        if isinstance(cos, torch.Tensor) and cos.dim() == 2:  # (s, rd): one row per position
            cos = cos.unsqueeze(0)
            sin = sin.unsqueeze(0) if isinstance(sin, torch.Tensor) else sin
        s.check("cos", cos, ("cb", "s", "rd"))
        s.require(s["cb"] in (1, s["b"]), "cos", f"expected a leading dimension of 1 or b = {s['b']}, got {s['cb']}")
        s.check("sin", sin, ("cb", "s", "rd"))
    else:
        s.check("position_ids", position_ids, ("b", "s"), dtypes=INDEX_DTYPES)
        s.check("cos", cos, ("max_pos", "rd"))
        s.check("sin", sin, ("max_pos", "rd"))
        position_ids = position_ids.to(torch.int64).contiguous()
    s.require(sin.dtype == cos.dtype, "sin", f"expected dtype {cos.dtype} (that of 'cos'), got {sin.dtype}")
    rd, hd = s["rd"], s["hd"]
    s.require(rd % 2 == 0 and 2 <= rd <= hd, "cos", f"expected an even rotary width rd with 2 <= rd <= hd = {hd}, got {rd}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            s.require(not inplace, name, f"expected a unit stride on the last dimension, got strides {tuple(t.stride())}")
    if not inplace:
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
    _registry.require_kernel("rotary_" if inplace else "rotary", q.device)
    return q, k, cos.contiguous(), sin.contiguous(), position_ids


def rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
    """Apply the rotary embedding to q and k; returns new (q, k). Differentiable w.r.t. q and k.

    Args:
        q: (b, hq, s, hd) (or (b, s, hq, hd) with ``unsqueeze_dim=2``), any strides with a unit last stride.
        k: (b, hk, s, hd) likewise, same dtype as q.
        cos, sin: (1 or b, s, rd) (or (s, rd)) already gathered per position, as HF's rotary embedding
            returns them; or tables (max_pos, rd) when ``position_ids`` (b, s) is given. Any float dtype.
            rd <= hd: the first rd channels of each head are rotated, the rest pass through.
        unsqueeze_dim: 1 or 2, the head dimension of q and k, as in HF ``apply_rotary_pos_emb``.

    Returns:
        (q_embed, k_embed) like q and k: ``x * cos + rotate_half(x) * sin`` on the first rd channels,
        computed in fp32 with one rounding.
    """
    q, k, cos, sin, position_ids = _prepare("rotary", q, k, cos, sin, position_ids, unsqueeze_dim, False)
    q_out, k_out = torch.ops.h1r.rotary(q, k, cos, sin, position_ids, False)
    if unsqueeze_dim == 2:
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def rotary_(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
    """In-place :func:`rotary` for inference (no autograd): rotates q and k where they are and returns them.

    Same arguments as :func:`rotary`; q and k must have a unit last stride."""
    q_view, k_view, cos, sin, position_ids = _prepare("rotary_", q, k, cos, sin, position_ids, unsqueeze_dim, True)
    torch.ops.h1r.rotary_(q_view, k_view, cos, sin, position_ids, False)
    return q, k


def rotary_cos_sin(positions, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32,
                   device=None, compute_dtype: torch.dtype = torch.float32):
    """cos, sin for :func:`rotary`, as HF's default rotary embedding computes them.

    Args:
        positions: an int ``max_pos`` (gives tables (max_pos, dim) for use with ``position_ids``), or an
            integer tensor of positions (gives (*positions.shape, dim), e.g. (b, s, dim)).
        dim: the rotary width rd (even). inv_freq = 1 / base^(arange(0, dim, 2) / dim), emb = cat(freqs, freqs).
        base: rope_theta (Falcon-H1 uses 1e11).
        dtype: dtype of the returned cos / sin.
        compute_dtype: float32 (HF, bit-identical to it) or float64 (exact angles). With rope_theta = 1e11, fp32
            angles are off by up to ~6e-8 * position rad: cos/sin errors of 1e-4 at position 4k, 1.5e-3 at
            200k, 2.8e-3 at 262k (measured in tests/test_rotary.py).
    """
    check_choice("rotary_cos_sin", "compute_dtype", compute_dtype, (torch.float32, torch.float64))
    if not (isinstance(dim, int) and dim >= 2 and dim % 2 == 0):
        raise ValueError(f"rotary_cos_sin: argument 'dim': expected an even int >= 2, got {dim!r}")
    check_positive("rotary_cos_sin", "base", base)
    if isinstance(positions, int):
        check_positive("rotary_cos_sin", "positions", positions)
        positions = torch.arange(positions, device=device)
    elif not isinstance(positions, torch.Tensor) or positions.dtype not in INDEX_DTYPES:
        raise ValueError(f"rotary_cos_sin: argument 'positions': expected an int or an int32/int64 tensor, got {positions!r}")
    if compute_dtype == torch.float32:
        return _rotary_cos_sin_fp32(positions, dim, base, dtype)
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    emb = positions[..., None].double() * (1.0 / (float(base) ** exponent))
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryEmbedding(nn.Module):
    """Drop-in for HF's default rotary embedding module (e.g. ``FalconH1RotaryEmbedding``):
    ``forward(x, position_ids (b, s))`` returns ``(cos, sin)`` of shape (b, s, dim) in x's dtype, computed in
    fp32 like HF; feed them to :func:`rotary` / :func:`rotary_`."""

    def __init__(self, dim: int, base: float = 10000.0, device=None):
        super().__init__()
        self.dim, self.base = dim, base
        rotary_cos_sin(1, dim, base)  # validates dim and base
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim)),
                             persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


# ---- fake (meta) implementations, autograd, CUDA (Triton) kernels --------------------------------------------


def _rotary_fake(q, k, cos, sin, position_ids, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _rotary_inplace_fake(q, k, cos, sin, position_ids, inverse):
    return None


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, position_ids, inverse = inputs
    ctx.inverse = inverse
    ctx.save_for_backward(cos, sin, position_ids)


def _unit_last_stride(g):
    return g if g.stride(-1) == 1 or g.shape[-1] <= 1 else g.contiguous()


def _rotary_backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = _unit_last_stride(dq), _unit_last_stride(dk)  # autograd materializes unused grads as zeros
    # The rotation is orthogonal: its backward is the inverse rotation.
    dq, dk = torch.ops.h1r.rotary(dq, dk, cos, sin, position_ids, not ctx.inverse)
    return dq, dk, None, None, None, None


def _triton():
    from ..triton_kernels import rotary as kernels

    return kernels


def _rotary_cuda(q, k, cos, sin, position_ids, inverse):
    return _triton().rotary(q, k, cos, sin, position_ids, inverse)


def _rotary_inplace_cuda(q, k, cos, sin, position_ids, inverse):
    _triton().rotary_(q, k, cos, sin, position_ids, inverse)


if _registry._LOAD_ERROR is None:
    torch.library.register_fake("h1r::rotary")(_rotary_fake)
    torch.library.register_fake("h1r::rotary_")(_rotary_inplace_fake)
    torch.library.register_kernel("h1r::rotary", "cuda")(_rotary_cuda)
    torch.library.register_kernel("h1r::rotary_", "cuda")(_rotary_inplace_cuda)
    torch.library.register_autograd("h1r::rotary", _rotary_backward, setup_context=_rotary_setup)
