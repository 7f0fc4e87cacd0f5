"""Plain-torch rotary position embedding, NeoX (``rotate_half``) layout, as in HF ``apply_rotary_pos_emb``.

For the first ``rd`` channels of each head, with ``x1, x2`` its two halves and ``c, s`` the cos/sin rows
(width ``rd``): ``out = x * c + rotate_half(x) * s`` where ``rotate_half(x) = cat(-x2, x1)``. Channels past ``rd``
pass through. ``inverse`` applies the transposed map (the rotation by ``-theta`` when the two halves of
cos/sin are equal, as HF builds them): it is the backward of the forward map.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _gather(cos, sin, position_ids):
    if position_ids is not None:  # table (max_pos, rd) -> (b, s, rd)
        return cos[position_ids], sin[position_ids]
    return cos, sin


def rotary(q, k, cos, sin, position_ids=None, inverse: bool = False):
    """q (b, hq, s, hd), k (b, hk, s, hd); cos, sin (1 or b, s, rd), or tables (max_pos, rd) with
    position_ids (b, s). Computes in fp32, returns (q_out, k_out) in the input dtype."""
    cos, sin = _gather(cos, sin, position_ids)
    c = cos.float().unsqueeze(1)
    s = sin.float().unsqueeze(1)
    rd = c.shape[-1]

    def apply(x):
        xr, xp = x[..., :rd].float(), x[..., rd:]
        if not inverse:
            y = xr * c + rotate_half(xr) * s
        else:  # transpose of the map above: y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1
            x1, x2 = xr.chunk(2, dim=-1)
            c1, c2 = c.chunk(2, dim=-1)
            s1, s2 = s.chunk(2, dim=-1)
            y = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
        return torch.cat((y.to(x.dtype), xp), dim=-1)

    return apply(q), apply(k)


def rotary_cos_sin(positions, dim: int, base: float = 10000.0, dtype=torch.float32, device=None):
    """cos, sin of shape (*positions.shape, dim) (or (max_pos, dim) when ``positions`` is an int), computed in
    fp32 exactly as HF's default rotary embedding: inv_freq = 1 / base^(arange(0, dim, 2) / dim),
    emb = cat(freqs, freqs), then cast to ``dtype``."""
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
