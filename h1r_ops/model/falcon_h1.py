"""A lean Falcon-H1 / Falcon-H1R causal LM built only on torch.nn parameters and the h1r ops.

Every decoder layer runs attention and the Mamba2 mixer in parallel on the same normalized input and sums
their outputs (each with its muP multiplier) into the residual, then a SwiGLU MLP (see
../shared/reference/falcon_h1_and_kernels.md). Module and parameter names are those of transformers'
``FalconH1ForCausalLM``, so an HF state dict loads as is (``h1r_ops.model.loading``).

Numerics follow transformers: RMSNorm statistics in fp32, rotary angles in fp32 (cast to the model dtype
like HF's cos/sin), the scan in fp32 with outputs in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import h1r_ops

from .config import FalconH1Config


# ----------------------------------------------------------------------------------------------------
# caches for decoding
# ----------------------------------------------------------------------------------------------------
@dataclass
class LayerCache:
    """One layer's decode state for a batch of sequences of equal length.

    key, value: (b, kv_heads, max_len, head_dim) post-RoPE, filled up to ``HybridCache.length``;
    conv_state: (b, conv_dim, d_conv - 1), the last inputs of the depthwise conv;
    ssm_state: (b, mamba_heads, mamba_d_head, d_state) fp32."""

    key: torch.Tensor
    value: torch.Tensor
    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@dataclass
class HybridCache:
    """Decode state of the whole model: one LayerCache per layer and the tokens seen so far."""

    layers: list[LayerCache]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.layers[0].key.shape[2]


def mup_vector(cfg: FalconH1Config) -> torch.Tensor:
    """The mixer's muP scales over in_proj's output [z | x | B | C | dt] (transformers' compute_mup_vector)."""
    m, d, GN = cfg.ssm_multipliers, cfg.mamba_d_ssm, cfg.mamba_n_groups * cfg.mamba_d_state
    sizes = [d, d, GN, GN, cfg.mamba_n_heads]
    return torch.cat([torch.full((n,), float(v)) for n, v in zip(sizes, m)])


def rope_inv_freq(cfg: FalconH1Config) -> torch.Tensor:
    """1 / theta^(2i / head_dim) in fp32, as HF's default RoPE."""
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))


# ----------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """FalconH1RMSNorm on h1r_ops.rms_norm (fp32 statistics, output in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return h1r_ops.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """The Mamba2 mixer's optional gated norm (per-group statistics, both gate orders)."""

    def __init__(self, hidden_size: int, eps: float, n_groups: int, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.group_size = hidden_size // n_groups
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return h1r_ops.gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


class Attention(nn.Module):
    """GQA attention with NeoX rotary; keys scaled by key_multiplier before RoPE (as HF)."""

    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.scale = self.head_dim**-0.5

    def _qkv(self, h, cos, sin):
        b, l, _ = h.shape
        q = self.q_proj(h).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)
        k = (self.k_proj(h) * self.cfg.key_multiplier).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = h1r_ops.rotary(q, k, cos, sin)
        return q, k, v

    def forward(self, h, cos, sin, mask=None, cache: LayerCache | None = None, start: int = 0):
        """h (b, l, hidden); cos/sin (b or 1, l, head_dim); mask: None (causal) or a bool (b, 1, l, l)
        block-diagonal causal mask for packed sequences. With ``cache``, keys/values are written at
        positions start..start+l and the queries attend to all cached positions before them too."""
        b, l, _ = h.shape
        q, k, v = self._qkv(h, cos, sin)
        if cache is not None:
            cache.key[:, :, start : start + l] = k
            cache.value[:, :, start : start + l] = v
            k, v = cache.key[:, :, : start + l], cache.value[:, :, : start + l]
        if mask is None and l > 1:
            if start == 0:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            else:  # chunked prefill on top of a cache: query i sits at position start + i
                pos_q = torch.arange(start, start + l, device=h.device)[:, None]
                causal = pos_q >= torch.arange(start + l, device=h.device)[None, :]
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=self.scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, l, -1))


class Mixer(nn.Module):
    """The Falcon-H1 Mamba2 mixer: in_proj -> depthwise causal conv + silu -> chunked SSD scan ->
    (gated norm | silu gate) -> out_proj, with the muP multipliers of transformers' FalconH1Mixer."""

    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.cfg = cfg
        H, P, N, G = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_n_groups
        self.H, self.P, self.N, self.G = H, P, N, G
        self.d_ssm, self.conv_dim = cfg.mamba_d_ssm, cfg.conv_dim
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_size, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.mamba_d_conv, groups=self.conv_dim,
                                padding=cfg.mamba_d_conv - 1, bias=cfg.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(self.d_ssm, cfg.rms_norm_eps, G, cfg.mamba_norm_before_gate) if cfg.mamba_rms_norm else None
        self.out_proj = nn.Linear(self.d_ssm, cfg.hidden_size, bias=cfg.projectors_bias)
        self.register_buffer("mup_vector", mup_vector(cfg), persistent=False)

    def _project(self, h):
        zxbcdt = self.in_proj(h * self.cfg.ssm_in_multiplier) * self.mup_vector.to(h.dtype)
        return zxbcdt.split([self.d_ssm, self.conv_dim, self.H], dim=-1)

    def _gate_out(self, y, z):
        if self.norm is not None:
            y = self.norm(y, z)
        return self.out_proj(y)

    def forward(self, h, seq_idx=None, cache: LayerCache | None = None):
        """Full-sequence form. h (b, l, hidden); seq_idx (b, l) int32 for packed documents; with ``cache``
        (prefill from position 0), the final conv and SSM states are written into it."""
        b, l, _ = h.shape
        z, xBC, dt = self._project(h)
        conv_w = self.conv1d.weight.squeeze(1)
        res = h1r_ops.causal_conv1d(xBC.transpose(1, 2), conv_w, self.conv1d.bias, seq_idx=seq_idx,
                                    return_final_states=cache is not None, activation="silu")
        if cache is not None:
            xBC, conv_final = res
            cache.conv_state.copy_(conv_final)
        else:
            xBC = res
        xBC = xBC.transpose(1, 2)
        x, B, C = xBC.split([self.d_ssm, self.G * self.N, self.G * self.N], dim=-1)
        A = -torch.exp(self.A_log.float())
        out = h1r_ops.selective_scan(
            x.reshape(b, l, self.H, self.P), dt, A, B.reshape(b, l, self.G, self.N), C.reshape(b, l, self.G, self.N),
            self.cfg.mamba_chunk_size, D=self.D, z=None if self.norm is not None else z.reshape(b, l, self.H, self.P),
            dt_bias=self.dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=self.cfg.time_step_limit,
            return_final_states=cache is not None)
        if cache is not None:
            y, ssm_final = out
            cache.ssm_state.copy_(ssm_final)
        else:
            y = out
        return self._gate_out(y.reshape(b, l, self.d_ssm), z)

    def step(self, h, cache: LayerCache):
        """One decode token per sequence. h (b, hidden); updates cache.conv_state / ssm_state in place."""
        b = h.shape[0]
        z, xBC, dt = self._project(h)
        xBC = h1r_ops.causal_conv1d_update(xBC, cache.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                           activation="silu")
        x, B, C = xBC.split([self.d_ssm, self.G * self.N, self.G * self.N], dim=-1)
        A = -torch.exp(self.A_log.float())
        y = h1r_ops.selective_state_update(
            cache.ssm_state, x.reshape(b, self.H, self.P), dt, A, B.reshape(b, self.G, self.N),
            C.reshape(b, self.G, self.N), D=self.D, z=None if self.norm is not None else z.reshape(b, self.H, self.P),
            dt_bias=self.dt_bias, dt_softplus=True)
        return self._gate_out(y.reshape(b, self.d_ssm), z)


class MLP(nn.Module):
    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_multiplier, self.down_multiplier = cfg.mlp_multipliers

    def forward(self, x):
        return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x) * self.gate_multiplier)) * self.down_multiplier


class DecoderLayer(nn.Module):
    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mamba = Mixer(cfg)
        self.feed_forward = MLP(cfg)

    def _mix(self, x, m, a):
        c = self.cfg
        x = x + (m * c.ssm_out_multiplier + a * c.attention_out_multiplier)
        return x + self.feed_forward(self.pre_ff_layernorm(x))

    def forward(self, x, cos, sin, mask=None, seq_idx=None, cache: LayerCache | None = None):
        h = self.input_layernorm(x)
        m = self.mamba(h, seq_idx=seq_idx, cache=cache)
        a = self.self_attn(h * self.cfg.attention_in_multiplier, cos, sin, mask=mask, cache=cache)
        return self._mix(x, m, a)

    def step(self, x, cos, sin, cache: LayerCache, pos: int):
        """x (b, hidden): one token per sequence at position ``pos``."""
        h = self.input_layernorm(x)
        m = self.mamba.step(h, cache)
        a = self.self_attn(h[:, None] * self.cfg.attention_in_multiplier, cos, sin, cache=cache, start=pos)[:, 0]
        return self._mix(x, m, a)


class FalconH1Model(nn.Module):
    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def positions_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each document boundary of a packed row: seq_idx (b, l) -> (b, l)."""
    b, l = seq_idx.shape
    idx = torch.arange(l, device=seq_idx.device).expand(b, l)
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


class FalconH1ForCausalLM(nn.Module):
    """Falcon-H1 causal LM on the h1r ops. Load with :meth:`from_pretrained` (HF-format folder).

    ``forward(input_ids, labels=...)`` returns the loss through the fused linear cross-entropy (the full
    logits are never formed unless ``return_logits=True``); :meth:`prefill` / :meth:`step` decode with a
    :class:`HybridCache`."""

    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.config = cfg
        self.model = FalconH1Model(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    # -- weights ----------------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "FalconH1ForCausalLM":
        """Load an HF-format Falcon-H1 folder (config.json + safetensors, single or sharded)."""
        from .loading import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, safe_max_shard_bytes: int = 5 << 30) -> None:
        """Write config.json + safetensors in the HF format (readable by transformers)."""
        from .loading import save_pretrained

        save_pretrained(self, path, max_shard_bytes=safe_max_shard_bytes)

    # -- helpers ----------------------------------------------------------------------------------------
    def rotary_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin (b, l, head_dim) for positions (b, l), computed in fp32 then cast (as HF)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> HybridCache:
        """Preallocate a decode cache for ``batch`` sequences of up to ``max_len`` tokens."""
        c = self.config
        p = self.model.embed_tokens.weight
        dtype = dtype or p.dtype
        layers = [
            LayerCache(
                key=torch.zeros(batch, c.num_key_value_heads, max_len, c.head_dim, dtype=dtype, device=p.device),
                value=torch.zeros(batch, c.num_key_value_heads, max_len, c.head_dim, dtype=dtype, device=p.device),
                conv_state=torch.zeros(batch, c.conv_dim, c.mamba_d_conv - 1, dtype=dtype, device=p.device),
                ssm_state=torch.zeros(batch, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, dtype=torch.float32,
                                      device=p.device),
            )
            for _ in range(c.num_hidden_layers)
        ]
        return HybridCache(layers)

    def _embed(self, input_ids):
        return self.model.embed_tokens(input_ids) * self.config.embedding_multiplier

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits for the given final hidden states (use sparingly: (..., vocab))."""
        return F.linear(hidden, self.lm_head_weight) * self.config.lm_head_multiplier

    # -- forward ----------------------------------------------------------------------------------------
    def hidden_states(self, input_ids, position_ids=None, seq_idx=None, cache: HybridCache | None = None):
        """Final-normed hidden states (b, l, hidden). ``seq_idx`` (b, l) marks packed documents: conv, scan
        and attention do not cross them and positions restart (unless ``position_ids`` is given)."""
        b, l = input_ids.shape
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32)
            if cache is not None:
                raise ValueError("hidden_states: argument 'seq_idx': packed sequences cannot fill a decode cache")
        if position_ids is None:
            position_ids = (positions_from_seq_idx(seq_idx) if seq_idx is not None
                            else torch.arange(l, device=input_ids.device).expand(b, l))
        x = self._embed(input_ids)
        cos, sin = self.rotary_cos_sin(position_ids, x.dtype)
        mask = None
        if seq_idx is not None:
            same = seq_idx[:, :, None] == seq_idx[:, None, :]
            mask = (same & torch.ones(l, l, dtype=torch.bool, device=x.device).tril())[:, None]
        if cache is not None:
            if l > cache.max_len:
                raise ValueError(f"prefill: argument 'input_ids': {l} tokens exceed the cache's max_len {cache.max_len}")
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask=mask, seq_idx=seq_idx, cache=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = l
        return self.model.final_layernorm(x)

    def forward(self, input_ids, labels=None, position_ids=None, seq_idx=None, return_logits: bool = False,
                ignore_index: int = -100):
        """Training / scoring forward.

        input_ids (b, l) int64; labels (b, l) as HF (the loss predicts labels[:, 1:] from positions
        :-1; -100 = ignored). Returns a dict with ``loss`` (mean over non-ignored tokens, via the fused
        chunked lm-head cross-entropy) when labels are given and ``logits`` (b, l, vocab) only when
        ``return_logits``."""
        h = self.hidden_states(input_ids, position_ids=position_ids, seq_idx=seq_idx)
        out = {}
        if labels is not None:
            hs = h[:, :-1].reshape(-1, h.shape[-1])
            tgt = labels[:, 1:].reshape(-1)
            out["loss"] = h1r_ops.fused_linear_cross_entropy(
                hs, self.lm_head_weight, tgt, ignore_index=ignore_index, logit_scale=self.config.lm_head_multiplier)
        if return_logits:
            out["logits"] = self.logits(h)
        return out

    @torch.no_grad()
    def prefill(self, input_ids, cache: HybridCache) -> torch.Tensor:
        """Run the prompt (b, l) through the model, filling ``cache``; returns the last logits (b, vocab)."""
        h = self.hidden_states(input_ids, cache=cache)
        return self.logits(h[:, -1])

    @torch.no_grad()
    def step(self, input_ids, cache: HybridCache) -> torch.Tensor:
        """Decode one token per sequence: input_ids (b,) at position cache.length; returns logits (b, vocab)."""
        pos = cache.length
        if pos >= cache.max_len:
            raise ValueError(f"step: the cache is full ({cache.max_len} tokens)")
        x = self._embed(input_ids)
        position_ids = torch.full((input_ids.shape[0], 1), pos, device=input_ids.device)
        cos, sin = self.rotary_cos_sin(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer.step(x, cos, sin, cache.layers[i], pos)
        cache.length = pos + 1
        return self.logits(self.model.final_layernorm(x))

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of a batch of equal-length prompts (b, l) -> (b, l + max_new_tokens)."""
        b, l = input_ids.shape
        cache = self.new_cache(b, l + max_new_tokens)
        logits = self.prefill(input_ids, cache)
        out = [input_ids]
        for i in range(max_new_tokens):
            tok = logits.argmax(-1)
            out.append(tok[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(tok, cache)
        return torch.cat(out, dim=1)
