"""A lean Falcon-H1 / Falcon-H1R causal LM built only on torch.nn parameters and the h1r ops.

Every decoder layer runs attention and the Mamba2 mixer in parallel on the same normalized input and sums
their outputs (each with its muP multiplier) into the residual, then a SwiGLU MLP (see
../shared/reference/falcon_h1_and_kernels.md). Module and parameter names are those of transformers'
``FalconH1ForCausalLM``, so an HF state dict loads as is (``h1r_ops.model.loading``).

Numerics follow transformers: RMSNorm statistics in fp32, rotary angles in fp32 (cast to the model dtype
like HF's cos/sin), the scan in fp32 with outputs in the model dtype.

Two paths compute the same function:

- the module path (``nn.Linear`` per projection, public ``h1r_ops`` ops with full validation), used
  whenever autograd records (training) and by the engine's per-piece calls;
- the fused inference path, used under ``torch.no_grad()`` / ``torch.inference_mode()`` once
  :meth:`FalconH1ForCausalLM.fuse_projections` has run (``from_pretrained`` does it): every layer reads
  its normed input with ONE GEMM over the concatenated rows [mamba in_proj | q | k | v] and its MLP input
  with one GEMM over [gate | up]; the muP multipliers are applied as one per-channel scale of the GEMM
  output (weights are never rescaled, so they stay bit-identical to the checkpoint) or as the ``alpha`` of
  the residual ``addmm``; the ops are called as ``torch.ops.h1r.*`` directly (arguments are known-good,
  validated once per forward), rotary runs in place on the GEMM output through a cached cos/sin table.
  The fused weight tensors *are* the parameters' storage (each ``nn.Linear`` weight is a row-slice view of
  its group), so fusing costs no memory, optimizer updates stay visible to the fused path, and
  ``state_dict`` / ``save_pretrained`` still hold the original per-projection tensors.
  On CPU, a decode step's few rows go through ``torch.ops.h1r.linear`` (the weights streamed once for all
  rows, with the muP scale, bias, SwiGLU and residual add in its fp32 epilogue: :func:`row_kernel`), and so
  do bf16 inputs of up to 512 rows (4096 for the input and [gate | up] projections) where the CPU has AMX
  tiles (the same epilogue; the weight read in its plain layout where the BLAS would reorder it on every
  call); more rows through the BLAS, the MLP's activation through ``torch.ops.h1r.swiglu``. Opt-in
  :meth:`FalconH1ForCausalLM.prepack_weights` keeps oneDNN-blocked copies of the bf16 weights for those
  many-row GEMMs (one more copy of the weights in memory, no per-call reorder).
"""

from __future__ import annotations

import os
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

    key, value: (b, max_len, kv_heads, head_dim) post-RoPE, filled up to ``HybridCache.length``: the paged
        attention kernels' cache layout with one page of max_len slots per sequence, so the fused decode step
        attends through ``h1r::paged_attention_decode`` with the trivial table (sequence i -> page i);
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
        return self.layers[0].key.shape[1]


def mup_vector(cfg: FalconH1Config) -> torch.Tensor:
    """The mixer's muP scales over in_proj's output [z | x | B | C | dt] (transformers' compute_mup_vector)."""
    m, d, GN = cfg.ssm_multipliers, cfg.mamba_d_ssm, cfg.mamba_n_groups * cfg.mamba_d_state
    sizes = [d, d, GN, GN, cfg.mamba_n_heads]
    return torch.cat([torch.full((n,), float(v)) for n, v in zip(sizes, m)])


def rope_inv_freq(cfg: FalconH1Config) -> torch.Tensor:
    """1 / theta^(2i / head_dim) in fp32, as HF's default RoPE."""
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))


# ----------------------------------------------------------------------------------------------------
# fused projections (inference path)
# ----------------------------------------------------------------------------------------------------
class FusedRows:
    """Several ``nn.Linear`` layers reading the same input, fused into one weight ``(sum of outs, in)``.

    The group tensor becomes the storage of the layers' parameters (each ``weight`` / ``bias`` is re-pointed
    to its row-slice view), so one GEMM computes all the outputs and nothing is duplicated. ``valid()`` says
    whether the parameters still live there (``load_state_dict(assign=True)``, ``.to()`` or FSDP flattening
    give them new storage; the model then falls back to its module path or re-fuses)."""

    def __init__(self, linears: list[nn.Linear]):
        ws = [lin.weight for lin in linears]
        self.sizes = [w.shape[0] for w in ws]
        self.weight = torch.cat([w.detach() for w in ws])
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            # absent biases read as zero rows (only the present ones become views)
            self.bias = self.weight.new_zeros(self.weight.shape[0])
        # (module, parameter name, address of its rows): the module is asked each time, since
        # load_state_dict(assign=True) replaces the Parameter objects themselves
        self._views: list[tuple[nn.Module, str, int]] = []
        off = 0
        for lin, n in zip(linears, self.sizes):
            self._repoint(lin, "weight", self.weight[off : off + n])
            if lin.bias is not None:
                self.bias[off : off + n].copy_(lin.bias.detach())
                self._repoint(lin, "bias", self.bias[off : off + n])
            off += n

    def _repoint(self, module: nn.Module, name: str, view: torch.Tensor) -> None:
        getattr(module, name).data = view
        self._views.append((module, name, view.data_ptr()))

    def valid(self) -> bool:
        dtype = self.weight.dtype
        for module, name, ptr in self._views:
            p = getattr(module, name)
            if p.data_ptr() != ptr or p.dtype != dtype:
                return False
        return True


def linear_nt(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (m, k) @ w (n, k)^T. Few rows on CPU go through h1r's linear kernel (one pass over the weights for
    all rows, or AMX tiles for a bf16 batch, see :func:`row_kernel`); more rows through the oneDNN-blocked
    copy of w when there is one
    (``packed``, :func:`pack_weight`), else the BLAS; one row elsewhere through the matrix-vector kernel (for
    a 16-bit w it streams the weights faster than a 1-row GEMM)."""
    if row_kernel(x, w, packed):
        return _linear_op(x, w, None, None, 1.0, None, False)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
    return torch.mv(w, x[0])[None] if x.shape[0] == 1 else torch.mm(x, w.t())


def addlinear_nt(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float,
                 bias: torch.Tensor | None = None, packed: torch.Tensor | None = None,
                 inplace: bool = False) -> torch.Tensor:
    """r + alpha * (x @ w^T + bias) (r (m, n), x (m, k), w (n, k)): few CPU rows in one h1r linear call,
    else the blocked copy's GEMM and one add, else the BLAS's addmm / addmv, and a separate bias add.
    ``inplace``: the GEMM paths accumulate into r itself (r contiguous, owned by the caller) instead of
    first copying it into a fresh output (a full pass over the residual stream per call in prefill); the
    few-row kernel still returns a new tensor (its epilogue reads r once anyway)."""
    if row_kernel(x, w, packed):
        return _linear_op(x, w, bias, None, alpha, r, False)
    if packed is not None:
        y = linear_nt(x, w, packed)
        out = r.add_(y, alpha=alpha) if inplace else torch.add(r, y, alpha=alpha)
    elif x.shape[0] == 1:
        out = r[0].addmv_(w, x[0], alpha=alpha)[None] if inplace else torch.addmv(r[0], w, x[0], alpha=alpha)[None]
    else:
        out = r.addmm_(x, w.t(), alpha=alpha) if inplace else torch.addmm(r, x, w.t(), alpha=alpha)
    return out if bias is None else out.add_(bias, alpha=alpha)


# oneDNN's blocked (AMX-ready) layout of a 16-bit weight, made once instead of at every GEMM: +10-20 % on
# the prefill GEMMs and +50 % on 16-row decode GEMMs (bf16, one thread). The layout is chosen for a number
# of rows; 128 serves 1..2048 rows alike (measured).
_PACK_ROWS_HINT = 128


def pack_weight(w: torch.Tensor):
    """(w's data_ptr, w's version, a oneDNN-blocked copy of w) for a bf16 CPU weight (n, k), or None where
    oneDNN is unavailable or the dtype gains nothing. The copy costs w's size in memory."""
    if w.device.type != "cpu" or w.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return (w.data_ptr(), w._version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_ROWS_HINT))
    except (AttributeError, RuntimeError):
        return None


def packed_of(entry, w: torch.Tensor) -> torch.Tensor | None:
    """The blocked copy in ``entry`` (from :func:`pack_weight`) if it still holds w's values: same storage
    and no in-place update since (an optimizer step, a load_state_dict copy), else None."""
    if entry is None or entry[0] != w.data_ptr() or entry[1] != w._version:
        return None
    return entry[2]


# Rows of x up to which h1r's linear kernel (csrc/cpu/linear_kernels.cpp: the weights read once for all
# rows, the muP scale / bias / SwiGLU / residual in its epilogue) beats the BLAS on CPU, measured one
# thread on (4096 | 32768) x 1024 and 1024 x 2816 weights: bf16 GEMMs run on AMX through oneDNN and win
# from 8 rows (the kernel's vdpbf16ps is then compute-bound); fp32 / fp16 GEMMs re-read the weights per
# few rows, the kernel wins up to ~16-32 rows.
_ROW_KERNEL_MAX_ROWS = {torch.bfloat16: 4, torch.float16: 16, torch.float32: 16}
# bf16 rows up to which the same op on AMX tiles (where the CPU has them: the weight read in its plain
# layout, no per-call reorder as the BLAS's GEMM does) is used. Measured one thread on the 8-layer model of
# benchmarks/bench_model.py (CPU time, same runs): the GEMM alone 1.1-1.5x the BLAS at 8..64 rows, about even
# at 512, slower beyond. The input projection and the MLP's [gate | up] gain more: the muP scale and the
# SwiGLU run in the kernel's epilogue instead of a separate pass over a (rows, 3856 / 5632) output: whole
# prefills of 2048 / 4096 rows 9-14% / 13% faster with those two on AMX than on the BLAS (not measured
# beyond 4096 rows). The residual projections (out_proj, o_proj, down), which the BLAS accumulates in place
# (addmm_), are even at 512 rows and 4% faster on the BLAS at 1024. A prepacked copy (prepack_weights)
# beats both from 8 rows and is used instead when there is one.
_AMX_MAX_ROWS = 512
_AMX_EPILOGUE_MAX_ROWS = 4096
# The lm head gains nothing from the fused epilogue but its multiplier: the plain GEMM's crossover (128 rows;
# 32768 x 1024 bf16 weight: 1.4x the BLAS at 64 rows, 0.73x at 512)
_AMX_LM_HEAD_MAX_ROWS = 128
_linear_op = None
_amx = None


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_cpu_direct_ops: dict = {}


def cpu_direct(name: str):
    """``torch.ops.h1r.<name>``'s CPU kernel called past the dispatcher's autograd layer: for an op with a
    ``register_autograd`` formula that layer is a Python function (grad-mode check, redispatch), ~4 us of a
    ~3 us call on a decode step's tiny inputs. Only for the fused inference path, which runs with autograd
    off and CPU inputs."""
    f = _cpu_direct_ops.get(name)
    if f is None:
        redispatch = getattr(torch.ops.h1r, name).default.redispatch
        f = _cpu_direct_ops[name] = lambda *args: redispatch(_CPU_KEYS, *args)
    return f


def fused_op(name: str, device: torch.device):
    """``torch.ops.h1r.<name>`` for the fused inference path: on CPU its kernel directly (:func:`cpu_direct`)."""
    return cpu_direct(name) if device.type == "cpu" else getattr(torch.ops.h1r, name)


def _paged_decode_op(*args):
    """``h1r::paged_attention_decode`` (q (b, heads, d) at any row stride, caches (pages, slots, kv, d),
    tables, lens, scale) for the fused decode step (:func:`fused_op`; the CPU glue checks the tables)."""
    return fused_op("paged_attention_decode", args[0].device)(*args)


def _paged_decode_ok(device: torch.device) -> bool:
    from h1r_ops import _registry

    return _registry.has_kernel("paged_attention_decode", device.type)


def _paged_prefill_op(*args):
    """``h1r::paged_attention_prefill`` (q (tokens, heads, d) at any row stride, caches, tables, lens,
    cu_seqlens_q, scale) for the fused prefill (:func:`fused_op`; the CPU glue checks the tables)."""
    return fused_op("paged_attention_prefill", args[0].device)(*args)


def _paged_prefill_ok(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the fused prefill from position 0 attends through ``h1r::paged_attention_prefill`` on the
    cache instead of SDPA: only where its kernel runs on AMX tiles (bf16 on CPU, head_dim % 32 == 0, <= 256).
    Measured (op alone, 2 threads, shared machine, 8 / 2 heads, head_dim 128, bf16, min of 20): 512 tokens
    0.44 ms vs SDPA's 0.79, 16 x 128 tokens 1.07 vs 1.31 per layer (both near the ~10 MB of q, K, V and
    output that this machine moves at ~10 GB/s); whole 8-layer prefill (one process, interleaved, min of 8):
    b1 x 512 106 -> 101 ms, b16 x 128 368 -> 370 ms (no measurable change). Its fp32-vector kernel (fp32,
    or no AMX) is ~2-3x slower than SDPA, so everything else keeps SDPA."""
    from h1r_ops import _registry

    # the kernel's tile path also rounds with AVX512-BF16 (every AMX CPU has it): off when that is turned off
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256
            and "H1R_CPU_NO_AVX512_BF16" not in os.environ
            and amx_rows() and _registry.has_kernel("paged_attention_prefill", "cpu"))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of (b, vocab) logits (the first max of each row): by ``h1r::sample_top_p`` at
    temperature 0 where the device has that kernel (one pass over the row; ATen's CPU argmax of a (16, 32k)
    bf16 batch takes ~1.7 ms, 5x as long), else by argmax."""
    from h1r_ops import _registry

    if torch.compiler.is_compiling() or not _registry.has_kernel("sample_top_p", logits.device.type) \
            or logits.dim() != 2 or logits.stride(1) != 1 or logits.shape[1] == 0:
        return logits.argmax(-1)
    b = logits.shape[0]
    zeros = torch.zeros(b, device=logits.device)
    ones = torch.ones(b, device=logits.device)
    return torch.ops.h1r.sample_top_p(logits, zeros, ones, ones, 0)[0]


def row_kernel_op():
    """``torch.ops.h1r.linear``'s CPU kernel (:func:`cpu_direct`) when this build has it (and ``swiglu``),
    else None."""
    global _linear_op
    if _linear_op is None:
        from h1r_ops import _registry

        _linear_op = cpu_direct("linear") if _registry.has_kernel("linear", "cpu") else False
    return _linear_op or None


def rms_norm_fused(x: torch.Tensor, ln: "RMSNorm") -> torch.Tensor:
    """The fused path's RMSNorm of x (n, d) by the module ``ln`` (on CPU its kernel called directly)."""
    return fused_op("rms_norm_fwd", x.device)(x, ln.weight, ln.eps, None)[0]


def amx_rows() -> bool:
    """Whether ``torch.ops.h1r.linear`` runs bf16 inputs of 5+ rows on AMX tiles on this machine."""
    global _amx
    if _amx is None:
        _amx = row_kernel_op() is not None and bool(torch.ops.h1r.linear_amx())
    return _amx


def row_kernel(x: torch.Tensor, w: torch.Tensor | None = None, packed: torch.Tensor | None = None,
               swiglu: bool = False, amx_max_rows: int = _AMX_MAX_ROWS) -> bool:
    """Whether the projection of the rows of x (m, k) by w (n, k) goes through ``torch.ops.h1r.linear`` on
    CPU: a few rows (the weight-streaming kernel), or bf16 up to ``amx_max_rows`` rows on AMX tiles when
    the shapes fit them (k % 32, n_out % 16; n_out = n / 2 with ``swiglu``) and no prepacked copy of w
    (``packed``) is at hand."""
    if x.device.type != "cpu":
        return False
    m = x.shape[0]
    if m <= _ROW_KERNEL_MAX_ROWS.get(x.dtype, 0):
        return row_kernel_op() is not None
    if packed is not None or w is None or m > amx_max_rows or x.dtype != torch.bfloat16:
        return False
    n_out = w.shape[0] // 2 if swiglu else w.shape[0]
    return x.shape[1] % 32 == 0 and n_out % 16 == 0 and amx_rows()


def rope_table(inv_freq: torch.Tensor, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (n, head_dim) for positions 0..n-1: angles in fp32 then cast (as HF's rotary)."""
    freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=inv_freq.device), inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_FAST_DEVICES: dict[str, bool] = {}  # device type -> every op of the fused path has a kernel there
_FAST_OPS = ("rms_norm_fwd", "gated_rms_norm_fwd", "rotary_", "causal_conv1d_fwd", "causal_conv1d_update",
             "selective_scan_fwd", "selective_state_update")


# ----------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------
def attend(q, k, v, scale: float, mask=None, cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
    """Attention of q (b, hq, l, d) over k, v (b, hk, l, d) (GQA), both the module path's and the fused
    path's. With ``cache`` the keys/values are first written at positions start..start+l and the queries
    attend to every cached position before them too. No ``mask``: causal (query i at position start + i);
    a single query (decode) attends to every cached position."""
    l = q.shape[2]
    if cache is not None:  # the cache is (b, max_len, kv_heads, d): write and read it as (b, kv_heads, len, d)
        cache.key.narrow(1, start, l).copy_(k.transpose(1, 2))
        cache.value.narrow(1, start, l).copy_(v.transpose(1, 2))
        if start > 0:  # from position 0 the keys and values are just k and v (no strided read back)
            k = cache.key.narrow(1, 0, start + l).transpose(1, 2)
            v = cache.value.narrow(1, 0, start + l).transpose(1, 2)
    if mask is None and l > 1:
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        pos_q = torch.arange(start, start + l, device=q.device)[:, None]  # chunked prefill on a cache
        mask = pos_q >= torch.arange(start + l, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


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
        o = attend(q, k, v, self.scale, mask=mask, cache=cache, start=start)
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

    # -- fused inference path: torch.ops.h1r.* on known-good arguments ----------------------------------
    def scan_constants(self) -> tuple[torch.Tensor, ...]:
        """A = -exp(A_log) (h,), D (h, p), dt_bias (h,), the conv weight (conv_dim, d_conv) and bias, fp32
        contiguous as the kernels take them (no per-call conversion); cached until one of the parameters
        changes (in place or by reassignment)."""
        params = [self.A_log, self.D, self.dt_bias, self.conv1d.weight] + (
            [] if self.conv1d.bias is None else [self.conv1d.bias])
        key = tuple((t.data_ptr(), t._version) for t in params)
        if getattr(self, "_consts_key", None) != key:
            A = -torch.exp(self.A_log.detach().float())
            D = self.D.detach().float()
            D = (D[:, None].expand(self.H, self.P) if D.dim() == 1 else D).contiguous()
            conv_b = None if self.conv1d.bias is None else self.conv1d.bias.detach().float().contiguous()
            self._consts = (A, D, self.dt_bias.detach().float().contiguous(),
                            self.conv1d.weight.detach().squeeze(1).float().contiguous(), conv_b)
            self._consts_key = key
        return self._consts

    def _gate_out_fast(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (n, d_ssm) -> the gated norm's output (n, d_ssm) (or y when the mixer has no norm: the
        silu(z) gate was applied by the scan)."""
        if self.norm is None:
            return y
        n = self.norm
        if y.device.type == "cpu":  # the CPU kernel reads z's strided rows (a slice of the projection) in place
            return cpu_direct("gated_rms_norm_fwd")(y, z, n.weight, n.eps, n.group_size, n.norm_before_gate)[0]
        return torch.ops.h1r.gated_rms_norm_fwd(y, z.contiguous(), n.weight, n.eps, n.group_size,
                                                n.norm_before_gate)[0]

    def step_fused(self, z, xBC, dt, conv_state, ssm_state, state_indices=None) -> torch.Tensor:
        """Decode core on the fused projection's output: z (b, d_ssm), xBC (b, conv_dim), dt (b, h) (any
        row stride), conv_state (S, conv_dim, d_conv-1) and ssm_state (S, h, p, n) fp32 updated in place
        (rows ``state_indices`` (b,) int32, else the first b). Returns y (b, d_ssm), before out_proj."""
        b = xBC.shape[0]
        A, D, dt_bias, conv_w, conv_b = self.scan_constants()
        xBC = torch.ops.h1r.causal_conv1d_update(xBC, conv_state, conv_w, conv_b, True, state_indices)
        x, B, C = xBC.split([self.d_ssm, self.G * self.N, self.G * self.N], dim=-1)
        y = torch.ops.h1r.selective_state_update(
            ssm_state, x.view(b, self.H, self.P), dt, A, B.view(b, self.G, self.N), C.view(b, self.G, self.N), D,
            None if self.norm is not None else z.reshape(b, self.H, self.P), dt_bias, True, state_indices)
        return self._gate_out_fast(y.view(b, self.d_ssm), z)

    def forward_fused(self, z, xBC, dt, b: int, l: int, seq_idx=None, cache: LayerCache | None = None):
        """Full-sequence core on the fused projection's output: z (b*l, d_ssm), xBC (b*l, conv_dim),
        dt (b*l, h) (any row stride); with ``cache`` the final conv / SSM states are written into it.
        Returns y (b*l, d_ssm), before out_proj."""
        A, D, dt_bias, conv_w, conv_b = self.scan_constants()
        # (b, l, conv_dim) seen as (b, conv_dim, l): the conv's channel-last layout, no copy
        xBC_t = xBC.view(b, l, self.conv_dim).transpose(1, 2)
        xBC_t, conv_final = torch.ops.h1r.causal_conv1d_fwd(xBC_t, conv_w, conv_b, seq_idx, None, cache is not None,
                                                            True)
        x, B, C = xBC_t.transpose(1, 2).split([self.d_ssm, self.G * self.N, self.G * self.N], dim=-1)
        lo, hi = self.cfg.time_step_limit
        y, ssm_final = torch.ops.h1r.selective_scan_fwd(
            x.reshape(b, l, self.H, self.P), dt.view(b, l, self.H), A, B.reshape(b, l, self.G, self.N),
            C.reshape(b, l, self.G, self.N), self.cfg.mamba_chunk_size, D,
            None if self.norm is not None else z.reshape(b, l, self.H, self.P), dt_bias, None, seq_idx, True,
            float(lo), float(hi))
        if cache is not None:
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(ssm_final)
        return self._gate_out_fast(y.view(b * l, self.d_ssm), z)


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

    # -- fused inference path ---------------------------------------------------------------------------
    def fuse(self) -> None:
        """Fuse [mamba.in_proj | q | k | v] and [gate | up] (see :class:`FusedRows`) and build the
        per-channel muP scale of the fused input projection."""
        c, at, mx = self.cfg, self.self_attn, self.mamba
        self.fused_in = FusedRows([mx.in_proj, at.q_proj, at.k_proj, at.v_proj])
        self.fused_gate_up = FusedRows([self.feed_forward.gate_proj, self.feed_forward.up_proj])
        dev = self.fused_in.weight.device
        ai, km = c.attention_in_multiplier, c.key_multiplier
        # HF: in_proj(h * ssm_in) * mup; q_proj(h * ai); k_proj(h * ai) * km; v_proj(h * ai). A scale of
        # the GEMM output equals a scale of its input; a bias is scaled by the output factors only.
        out_scale = torch.cat([mx.mup_vector.float().cpu(), torch.ones(at.q_proj.out_features),
                               torch.full((at.k_proj.out_features,), float(km)), torch.ones(at.v_proj.out_features)])
        in_scale = torch.cat([torch.full((mx.in_proj.out_features,), float(c.ssm_in_multiplier)),
                              torch.full((self.fused_in.weight.shape[0] - mx.in_proj.out_features,), float(ai))])
        # in the weights' dtype, as HF's bf16 model multiplies by its bf16 mup_vector
        self.in_scale = (in_scale * out_scale).to(device=dev, dtype=self.fused_in.weight.dtype)
        self.in_scale_f32 = self.in_scale.float()  # the same values, as the linear kernel's epilogue takes them
        self.in_bias_scale = out_scale.to(device=dev, dtype=self.fused_in.weight.dtype)
        # the [gate | up] GEMM's output scale for the row kernel's SwiGLU epilogue: gate_multiplier, 1
        ff = self.feed_forward
        self.gate_up_scale = torch.cat([torch.full((ff.gate_proj.out_features,), float(ff.gate_multiplier)),
                                        torch.ones(ff.up_proj.out_features)]).to(dev)

    packs: dict = {}  # role -> pack_weight() entry, filled by FalconH1ForCausalLM.prepack_weights()

    def prepack(self) -> None:
        """oneDNN-blocked copies of the fused path's weights (:func:`pack_weight`)."""
        mx, at, ff = self.mamba, self.self_attn, self.feed_forward
        weights = {"in": self.fused_in.weight, "out_proj": mx.out_proj.weight, "o_proj": at.o_proj.weight,
                   "gate_up": self.fused_gate_up.weight, "down": ff.down_proj.weight}
        self.packs = {k: e for k, w in weights.items() if (e := pack_weight(w)) is not None}

    def fused_valid(self) -> bool:
        return (getattr(self, "fused_in", None) is not None and self.fused_in.valid()
                and self.fused_gate_up.valid())

    def project_fused(self, x: torch.Tensor):
        """The layer's input side in one GEMM. x (n, hidden) residual stream ->
        (z (n, d_ssm), xBC (n, conv_dim), dt (n, h), q (n, heads, hd), k (n, kv, hd), v (n, kv, hd)): the
        muP-scaled mixer inputs and the attention projections (key_multiplier and attention_in_multiplier
        applied, RoPE not yet), all views of one (n, in_proj + q + k + v) buffer."""
        n = x.shape[0]
        ln = self.input_layernorm
        h = rms_norm_fused(x, ln)
        f = self.fused_in
        bias = None if f.bias is None else f.bias * self.in_bias_scale
        packed = packed_of(self.packs.get("in"), f.weight)
        # the muP scale and the bias in the kernel's epilogue
        if row_kernel(h, f.weight, packed, amx_max_rows=_AMX_EPILOGUE_MAX_ROWS):
            p = _linear_op(h, f.weight, bias, self.in_scale_f32, 1.0, None, False)
        else:
            p = linear_nt(h, f.weight, packed)
            p.mul_(self.in_scale)
            if bias is not None:
                p.add_(bias)
        mx, at = self.mamba, self.self_attn
        z, xBC, dt, q, k, v = p.split([mx.d_ssm, mx.conv_dim, mx.H, at.n_heads * at.head_dim,
                                       at.n_kv * at.head_dim, at.n_kv * at.head_dim], dim=-1)
        return (z, xBC, dt, q.view(n, at.n_heads, at.head_dim), k.view(n, at.n_kv, at.head_dim),
                v.view(n, at.n_kv, at.head_dim))

    def output_fused(self, x: torch.Tensor, y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The layer's output side: x (n, hidden) residual, y (n, d_ssm) the mixer's gated output, o (n,
        heads * hd) the attention output -> the layer's output (n, hidden): the two output projections
        accumulate into the residual with their muP multipliers as addmm's alpha, then the SwiGLU MLP on
        the fused [gate | up] GEMM, its down projection accumulated the same way."""
        c, mx, at, ff = self.cfg, self.mamba, self.self_attn, self.feed_forward
        pk = self.packs
        x = addlinear_nt(x, y, mx.out_proj.weight, c.ssm_out_multiplier, mx.out_proj.bias,
                         packed_of(pk.get("out_proj"), mx.out_proj.weight))
        # x is now this call's own tensor: the next projections accumulate into it in place
        x = addlinear_nt(x, o, at.o_proj.weight, c.attention_out_multiplier, at.o_proj.bias,
                         packed_of(pk.get("o_proj"), at.o_proj.weight), inplace=True)
        ln = self.pre_ff_layernorm
        h = rms_norm_fused(x, ln)
        f = self.fused_gate_up
        packed = packed_of(pk.get("gate_up"), f.weight)
        # silu(gate * gate_multiplier) * up in the kernel's epilogue
        if row_kernel(h, f.weight, packed, swiglu=True, amx_max_rows=_AMX_EPILOGUE_MAX_ROWS):
            g = _linear_op(h, f.weight, f.bias, self.gate_up_scale, 1.0, None, True)
        else:
            gu = linear_nt(h, f.weight, packed)
            if f.bias is not None:
                gu.add_(f.bias)
            if h.device.type == "cpu" and row_kernel_op() is not None:  # one pass over [gate | up]
                g = cpu_direct("swiglu")(gu, ff.gate_multiplier)
            else:
                g, u = gu.split(f.sizes, dim=-1)
                g.mul_(ff.gate_multiplier)
                F.silu(g, inplace=True)
                g.mul_(u)
        return addlinear_nt(x, g, ff.down_proj.weight, ff.down_multiplier, ff.down_proj.bias,
                            packed_of(pk.get("down"), ff.down_proj.weight), inplace=True)

    def forward_fused(self, x, b: int, l: int, rope, pos_ids, mask=None, seq_idx=None,
                      cache: LayerCache | None = None, start: int = 0, decode: bool = False,
                      pages: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole layer on the fused path: x (b*l, hidden); rope = (cos, sin) tables (max_pos, head_dim);
        pos_ids (b, l) int64. ``decode`` (l == 1, with ``cache``) steps the mixer's cached states;
        otherwise the full-sequence mixer runs (with ``cache``: from position 0, final states written).
        ``pages``: (block_tables (b, 1), seq_lens (b,)) int32 of the cache seen as one page per sequence; in
        decode the step's attention then runs in ``h1r::paged_attention_decode`` (one call for all heads,
        no (b, heads, len) score tensors as SDPA's small-query path makes); in a prefill from position 0
        (pages then also holds cu_seqlens_q (b + 1,)) in ``h1r::paged_attention_prefill`` on the cache just
        written (see _paged_prefill_ok)."""
        at = self.self_attn
        z, xBC, dt, q, k, v = self.project_fused(x)
        q4, k4 = q.view(b, l, at.n_heads, at.head_dim), k.view(b, l, at.n_kv, at.head_dim)
        torch.ops.h1r.rotary_(q4.transpose(1, 2), k4.transpose(1, 2), rope[0], rope[1], pos_ids, False)
        if pages is not None and decode:
            cache.key.select(1, start).copy_(k)
            cache.value.select(1, start).copy_(v)
            o = _paged_decode_op(q, cache.key, cache.value, pages[0], pages[1], at.scale)
            o = o.view(b, at.n_heads * at.head_dim)
        elif pages is not None:  # prefill from 0: write the rows once, attend on the cache (q read in place)
            cache.key.narrow(1, 0, l).copy_(k.view(b, l, at.n_kv, at.head_dim))
            cache.value.narrow(1, 0, l).copy_(v.view(b, l, at.n_kv, at.head_dim))
            o = _paged_prefill_op(q, cache.key, cache.value, pages[0], pages[1], pages[2], at.scale)
            o = o.view(b * l, at.n_heads * at.head_dim)
        else:
            q4, k4, v4 = q4.transpose(1, 2), k4.transpose(1, 2), v.view(b, l, at.n_kv, at.head_dim).transpose(1, 2)
            o = attend(q4, k4, v4, at.scale, mask=mask, cache=cache, start=start)
            o = o.transpose(1, 2).reshape(b * l, at.n_heads * at.head_dim)
        if decode:
            y = self.mamba.step_fused(z, xBC, dt, cache.conv_state, cache.ssm_state)
        else:
            y = self.mamba.forward_fused(z, xBC, dt, b, l, seq_idx=seq_idx, cache=cache)
        return self.output_fused(x, y, o)


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

    use_fused: bool = True  # set False to run inference on the module path (e.g. to compare the two)

    def fuse_projections(self) -> "FalconH1ForCausalLM":
        """Enable the fused inference path (module docstring): every layer's input projections and MLP
        gate/up become one weight tensor each, the parameters views into it. Free in memory; the weights
        and ``state_dict`` are unchanged. ``from_pretrained`` calls it; call it again after giving the
        parameters new storage outside ``.to()`` (e.g. ``load_state_dict(assign=True)``)."""
        for layer in self.model.layers:
            if not layer.fused_valid():
                layer.fuse()
        self._rope = None
        return self

    def prepack_weights(self) -> "FalconH1ForCausalLM":
        """Give the fused inference path oneDNN-blocked copies of the projection and lm-head weights
        (bf16 on CPU; :func:`pack_weight`): the many-row GEMMs skip their per-call weight reordering. Costs
        one more copy of those weights in memory. A copy whose weight changed (in place or moved) is no
        longer used; call again after such a change to re-pack.

        On a CPU with AMX the plain weights already avoid the reorder: bf16 batches of 5+ rows run on
        ``h1r::linear``'s AMX path (its fp32 epilogue also applying the muP scale and SwiGLU), which measured as
        fast as the prepacked copies or faster (engine, 64 traces, 2 threads: 10.3x vs 9.7x transformers'
        generate). Prepacking pays where that path is off (no AMX, ``H1R_CPU_NO_AMX=1``)."""
        self.fuse_projections()
        for layer in self.model.layers:
            layer.prepack()
        self._lm_pack = pack_weight(self.lm_head_weight)
        return self

    def _lm_head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (m, vocab) of final hidden states h (m, hidden) on the fused path's projection helpers,
        into ``out`` (m, vocab) when given (the multiplier's pass writes it: no extra copy on the GEMM path)."""
        w, mult = self.lm_head_weight, self.config.lm_head_multiplier
        packed = packed_of(getattr(self, "_lm_pack", None), w)
        if row_kernel(h, w, packed, amx_max_rows=_AMX_LM_HEAD_MAX_ROWS):
            y = _linear_op(h, w, None, None, mult, None, False)
            return y if out is None else out.copy_(y)
        y = linear_nt(h, w, packed)
        return y.mul_(mult) if out is None else torch.mul(y, mult, out=out)

    def _apply(self, fn, recurse=True):
        # .to() / .float() / .cuda() give the parameters new storage: fuse again if the model was fused
        fused = any(getattr(layer, "fused_in", None) is not None for layer in self.model.layers)
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return out

    def fused_ready(self, device: torch.device) -> bool:
        """Whether the fused inference path serves a call now: autograd not recording, not tracing, the
        projections fused (and still so) and every op it calls has a kernel for ``device``."""
        if torch.is_grad_enabled() or not self.use_fused or torch.compiler.is_compiling():
            return False
        if device.type not in _FAST_DEVICES:
            from h1r_ops import _registry

            _FAST_DEVICES[device.type] = all(_registry.has_kernel(op, device.type) for op in _FAST_OPS)
        return _FAST_DEVICES[device.type] and all(layer.fused_valid() for layer in self.model.layers)

    def rope_tables(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables (>= n, head_dim) in ``dtype``, grown by doubling and kept between calls."""
        t = getattr(self, "_rope", None)
        if t is None or t[0].shape[0] < n or t[0].dtype != dtype or t[0].device != self.inv_freq.device:
            size = max(n, 2 * t[0].shape[0] if t is not None and t[0].dtype == dtype else 256)
            t = self._rope = rope_table(self.inv_freq, size, dtype)
        return t

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
                # positions at or past the cache's length are never read: no need to clear them
                key=torch.empty(batch, max_len, c.num_key_value_heads, c.head_dim, dtype=dtype, device=p.device),
                value=torch.empty(batch, max_len, c.num_key_value_heads, c.head_dim, dtype=dtype, device=p.device),
                conv_state=torch.zeros(batch, c.conv_dim, c.mamba_d_conv - 1, dtype=dtype, device=p.device),
                ssm_state=torch.zeros(batch, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, dtype=torch.float32,
                                      device=p.device),
            )
            for _ in range(c.num_hidden_layers)
        ]
        return HybridCache(layers)

    def _embed(self, input_ids):
        return self.model.embed_tokens(input_ids) * self.config.embedding_multiplier

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits ``hidden @ lm_head^T * lm_head_multiplier`` in the weights' dtype for final hidden
        states (..., hidden) -> (..., vocab) (use sparingly). ``out``: a contiguous (..., vocab) tensor of
        the weights' dtype to write them into instead of a fresh tensor (a decoder reusing its memory; no
        autograd through ``out``); with ``out`` and no autograd, a few rows go through h1r's row kernel (fp32
        epilogue, one rounding: the decode step's own lm head; bf16 up to 128 rows on AMX tiles where the CPU
        has them) and more rows through the prepacked lm head when :meth:`prepack_weights` made one (the
        same GEMM, without the per-call weight reorder)."""
        if out is None:
            return F.linear(hidden, self.lm_head_weight) * self.config.lm_head_multiplier
        w = self.lm_head_weight
        if out.dtype != w.dtype or out.shape != (*hidden.shape[:-1], w.shape[0]) or not out.is_contiguous():
            raise ValueError(f"logits: argument 'out': expected a contiguous {w.dtype} tensor of shape "
                             f"{(*hidden.shape[:-1], w.shape[0])}, got {out.dtype} {tuple(out.shape)}")
        h2 = hidden.reshape(-1, w.shape[1]).to(w.dtype)
        packed = packed_of(getattr(self, "_lm_pack", None), w)
        if not torch.is_grad_enabled() and (
                packed is not None or row_kernel(h2, w, amx_max_rows=_AMX_LM_HEAD_MAX_ROWS)):
            # the fused path's lm head: h1r's linear kernel for a few rows (or an AMX batch), else the
            # prepacked GEMM (no per-call weight reorder)
            self._lm_head(h2, out=out.view(-1, w.shape[0]))
            return out
        torch.mm(h2, w.t(), out=out.view(-1, w.shape[0]))
        return out.mul_(self.config.lm_head_multiplier)

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
            max_pos = l
        else:
            max_pos = int(position_ids.max()) + 1 if position_ids.numel() else 1
        x = self._embed(input_ids)
        mask = None
        if seq_idx is not None:
            same = seq_idx[:, :, None] == seq_idx[:, None, :]
            mask = (same & torch.ones(l, l, dtype=torch.bool, device=x.device).tril())[:, None]
        if cache is not None:
            if l > cache.max_len:
                raise ValueError(f"prefill: argument 'input_ids': {l} tokens exceed the cache's max_len {cache.max_len}")
        if self.fused_ready(input_ids.device):
            return self._run_fused(x, position_ids, max_pos, mask=mask, seq_idx=seq_idx, cache=cache)
        cos, sin = self.rotary_cos_sin(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask=mask, seq_idx=seq_idx, cache=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = l
        return self.model.final_layernorm(x)

    def _run_fused(self, x, position_ids, max_pos: int, mask=None, seq_idx=None, cache: HybridCache | None = None,
                   decode: bool = False) -> torch.Tensor:
        """All layers on the fused path: x (b, l, hidden) embedded input, position_ids (b, l) all below
        ``max_pos``. Returns the
        final-normed hidden states (b, l, hidden); with ``cache`` (prefill from 0, or one decode step at
        cache.length) fills it."""
        b, l, d = x.shape
        start = cache.length if decode else 0
        pos = position_ids.to(torch.int64).expand(b, l).contiguous()
        rope = self.rope_tables(max_pos, x.dtype)
        x = x.reshape(b * l, d)
        pages = None
        if (_paged_decode_ok(x.device) if decode else cache is not None and mask is None
                and _paged_prefill_ok(x, self.model.layers[0].self_attn.head_dim)):
            # the cache as one page per sequence (LayerCache): page i is sequence i, start + l tokens long
            i32 = dict(dtype=torch.int32, device=x.device)
            pages = (torch.arange(b, **i32).view(b, 1), torch.full((b,), start + l, **i32))
            if not decode:
                pages += (torch.arange(0, b * l + 1, l, **i32),)  # cu_seqlens_q: all l tokens are new
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_fused(x, b, l, rope, pos, mask=mask, seq_idx=seq_idx,
                                    cache=None if cache is None else cache.layers[i], start=start, decode=decode,
                                    pages=pages)
        if cache is not None:
            cache.length = start + l
        ln = self.model.final_layernorm
        return rms_norm_fused(x, ln).view(b, l, d)

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
        return self._lm_head(h[:, -1])

    @torch.no_grad()
    def step(self, input_ids, cache: HybridCache) -> torch.Tensor:
        """Decode one token per sequence: input_ids (b,) at position cache.length; returns logits (b, vocab)."""
        pos = cache.length
        if pos >= cache.max_len:
            raise ValueError(f"step: the cache is full ({cache.max_len} tokens)")
        x = self._embed(input_ids)
        position_ids = torch.full((input_ids.shape[0], 1), pos, device=input_ids.device)
        if self.fused_ready(input_ids.device):
            h = self._run_fused(x[:, None], position_ids, pos + 1, cache=cache, decode=True)[:, 0]
            return self._lm_head(h)
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
            tok = greedy_tokens(logits)
            out.append(tok[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(tok, cache)
        return torch.cat(out, dim=1)
