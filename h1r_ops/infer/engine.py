"""The batched decoder: paged KV cache + Mamba state slots + continuous batching over the native model.

Every live trace owns a block table (its KV pages) and a state slot (its conv and SSM states). One
``step()``:
  1. starts traces of requests whose prompt is already prefilled (the trace forks the prompt's pages,
     copies the prompt's Mamba state into its own slot and samples its first token from the prompt's
     last logits with its own generator), then prefills the next waiting prompt if there is room;
  2. runs one decode step of every live trace together through the batched ops (paged attention,
     causal_conv1d_update / selective_state_update over the slot pool), on the model's fused inference
     path when the model is fused (``fuse_projections``; ``from_pretrained`` does it), else its modules;
  3. samples, records confidences, and retires the traces that hit EOS, a stop token or string,
     max_tokens, or DeepConf's confidence threshold; their pages and slot are freed at once.
Prefill runs on the fused path too when the model is fused (``_prefill_fused``). The per-step host work
is kept small: the block tables live on the device (one row per state slot, a page written when a trace
gets or copies one), the per-trace inputs go over in one transfer, the logits (the model's own, in its
dtype) are written into workspace memory, sampling is one fused pass per row (``h1r_ops.sample_top_p``:
no sort of the vocabulary; the torch sampler of ``sampling`` serves top-k / min-p), and the step's sampled
tokens, confidences and log-probs come back in one transfer.
When the pages run out, the most recently started trace is preempted (its pages and slot freed) and
later recomputed by one prefill of its prompt and tokens so far; its generator continues unchanged.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

import h1r_ops
from h1r_ops.model.falcon_h1 import LayerCache

from .block_manager import BlockAllocator, BlockTable
from .confidence import WindowStop
from .sampling import (BatchParams, SamplingParams, Workspace, draw_uniforms, make_generator, raw_logprobs, sample_rows,
                       token_confidence)
from .state_pool import StatePool


@dataclass
class TraceOutput:
    """One finished trace. finish_reason: "stop" (EOS, stop token or string), "length" (max_tokens),
    "pruned" (DeepConf early stop), "aborted". token_confidences: DeepConf's C_i per generated token;
    token_logprobs: log-prob of each generated token under the model's raw distribution (log_softmax of
    the logits, temperature 1: what a trainer recomputes for importance-sampling corrections)."""

    request_id: int
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    token_confidences: list[float]
    text: str | None = None
    stop_reason: int | str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    seed: int | None = None
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class _Request:
    def __init__(self, rid, prompt_ids, params):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.next_trace = 0          # traces started so far
        self.prefix: BlockTable | None = None
        self.prefix_slot: int | None = None
        self.prefix_logits: torch.Tensor | None = None
        self.aborted = False


@dataclass
class _Seq:
    req: _Request
    index: int
    generator: torch.Generator
    seed: int | None
    table: BlockTable | None = None
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)   # generated; the last one is not yet in the cache
    confs: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stopper: WindowStop | None = None
    top: list | None = None
    finish: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None
    bt_cols: int = 0          # columns of its row of Engine.block_tables written so far
    bt_last: int = -1         # the page written in the last of them


def _eos_ids(model, tokenizer) -> set[int]:
    e = getattr(model.config, "eos_token_id", None)
    ids = set(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    t = getattr(tokenizer, "eos_token_id", None)
    if isinstance(t, int):
        ids.add(t)
    return ids


def encode(tokenizer, text: str) -> list[int]:
    r = tokenizer.encode(text)
    return list(r.ids if hasattr(r, "ids") else r)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)


class Engine:
    """Continuous-batching decoder over a paged KV cache for a native ``FalconH1ForCausalLM``.

    Args:
        model: the model (its device and dtype are the engine's).
        tokenizer: optional (``tokenizers.Tokenizer`` or a transformers tokenizer): enables text prompts,
            text outputs and stop strings.
        max_num_seqs: traces decoded together at most.
        block_size: tokens per KV page.
        num_blocks: KV pages in the pool (default: room for ``max_num_seqs`` traces of ``max_model_len``).
        max_model_len: prompt + generated tokens per trace, at most.
        ssm_state_dtype: dtype of the Mamba SSM states. Default (None): the model's dtype, the policy of
            transformers' cache and vLLM's ``mamba_ssm_cache_dtype="auto"``; a bf16 model then keeps bf16
            states, half the state memory and half the state bytes every decode step reads and writes (the
            largest part of a step at many traces). fp32 keeps them unrounded whatever the model dtype.
        prepack_weights: give a bf16 CPU model oneDNN-blocked copies of its projection and lm-head weights
            (``FalconH1ForCausalLM.prepack_weights``): the many-trace decode GEMMs skip oneDNN's per-call
            weight reorder, at the cost of one more copy of those weights in memory. Off by default: on a CPU
            with AMX the plain weights run on ``h1r::linear``'s AMX path, which needs no reorder and measured
            faster at 64 traces (10.3x vs 9.7x transformers' generate); prepacking pays where that path is
            off (no AMX). Greedy tokens are the same either way (tested).
    """

    SAMPLE_CHUNK = 16   # rows sampled together (their scratch fits in L2)

    def __init__(self, model, tokenizer=None, max_num_seqs: int = 64, block_size: int = 16,
                 num_blocks: int | None = None, max_model_len: int = 2048,
                 ssm_state_dtype: torch.dtype | None = None, prepack_weights: bool = False):
        self.model = model.eval()
        if prepack_weights:
            # oneDNN-blocked copies of the bf16 projection / lm-head weights for the many-row decode GEMMs
            # (FalconH1ForCausalLM.prepack_weights): no weight reorder per GEMM, at the cost of one more copy
            # of those weights in memory; a no-op for other dtypes / devices
            model.prepack_weights()
        self.tokenizer = tokenizer
        cfg = model.config
        self.cfg = cfg
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.max_num_seqs, self.block_size, self.max_model_len = max_num_seqs, block_size, max_model_len
        if num_blocks is None:
            num_blocks = max_num_seqs * -(-max_model_len // block_size) + 1
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.allocator = BlockAllocator(num_blocks, block_size)
        L, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        # kv[layer, 0] = key cache, kv[layer, 1] = value cache: (num_blocks, block_size, kv_heads, head_dim)
        self.kv = torch.zeros(L, 2, num_blocks, block_size, kv, hd, dtype=self.dtype, device=self.device)
        # one slot per live trace, plus one per prompt held for traces not yet started
        self.states = StatePool(cfg, max_num_seqs + 2, self.dtype, self.device, ssm_state_dtype or self.dtype)
        # the block tables of the live traces, one row per state slot, kept on the device and updated in
        # place when a trace gets a page (every block_size tokens) or copies a shared one, instead of being
        # rebuilt from Python lists at every step
        self.block_tables = torch.zeros(self.states.num_slots, self.max_blocks_per_seq, dtype=torch.int32,
                                        device=self.device)
        self.ws = Workspace()   # per-step scratch of the (traces, vocab) logits and sampling
        self._has_sampler: bool | None = None   # h1r_ops.sample_top_p has a kernel for the device
        self.eos_ids = _eos_ids(model, tokenizer)
        self._ids = itertools.count()
        self.waiting: deque[_Request] = deque()
        self.prefixed: deque[_Request] = deque()   # prompt prefilled, traces left to start
        self.preempted: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.orphans: list[TraceOutput] = []   # finished traces of requests added outside generate()
        self.stats = dict(prefill_tokens=0, decode_tokens=0, decode_steps=0, decode_time=0.0, prefill_time=0.0,
                          preemptions=0)

    # -- memory ---------------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        c = self.cfg
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.kv.element_size()

    def _copy_block(self, src: int, dst: int) -> None:
        self.kv[:, :, dst].copy_(self.kv[:, :, src])

    # -- requests -------------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams) -> int:
        """Queue a prompt (text, needs a tokenizer, or token ids) for ``params.n`` traces; returns its id."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("Engine.add_request: argument 'prompt': a text prompt needs a tokenizer")
            ids = encode(self.tokenizer, prompt)
        else:
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise ValueError("Engine.add_request: argument 'prompt': empty prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"Engine.add_request: argument 'prompt': {len(ids)} prompt + {params.max_tokens} new tokens "
                             f"exceed max_model_len {self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("Engine.add_request: argument 'params': stop strings need a tokenizer")
        r = _Request(next(self._ids), ids, params)
        self.waiting.append(r)
        return r.id

    def abort(self, request_id: int) -> list[TraceOutput]:
        """Stop every trace of a request now (finish reason "aborted"); returns the traces it ended."""
        out = []
        for r in list(self.waiting) + list(self.prefixed):
            if r.id == request_id:
                r.aborted = True
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for r in [r for r in self.prefixed if r.id == request_id]:
            self._release_prefix(r)
        self.prefixed = deque(r for r in self.prefixed if r.id != request_id)
        for s in [s for s in self.running if s.req.id == request_id] + [s for s in self.preempted if s.req.id == request_id]:
            s.finish = "aborted"
            out.append(self._retire(s))
        self.running = [s for s in self.running if s.finish is None]
        self.preempted = deque(s for s in self.preempted if s.finish is None)
        return out

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefixed or self.preempted or self.running)

    # -- the forward passes -----------------------------------------------------------------------------
    @torch.no_grad()
    def _prefill(self, ids: list[int], table: BlockTable, slot: int) -> torch.Tensor:
        """Run ``ids`` from position 0 into a fresh table and slot; returns the last logits (vocab,)."""
        t0 = time.perf_counter()
        m, l = self.model, len(ids)
        slots = torch.tensor(table.append_slots(l, self._copy_block), dtype=torch.int64, device=self.device)
        bt = torch.tensor([table.blocks], dtype=torch.int32, device=self.device)
        seq_lens = torch.tensor([l], dtype=torch.int32, device=self.device)
        cu = torch.tensor([0, l], dtype=torch.int32, device=self.device)
        input_ids = torch.tensor([ids], device=self.device)
        x = m._embed(input_ids)
        if m.fused_ready(self.device):
            h = self._prefill_fused(x[0], slots, bt, seq_lens, cu, slot)
            self.stats["prefill_tokens"] += l
            self.stats["prefill_time"] += time.perf_counter() - t0
            return m.logits(h)[0].float()
        cos, sin = m.rotary_cos_sin(torch.arange(l, device=self.device)[None], x.dtype)
        for i, layer in enumerate(m.model.layers):
            h = layer.input_layernorm(x)
            st = LayerCache(None, None, self.states.conv[i, slot : slot + 1], self.states.ssm[i, slot : slot + 1])
            mx = layer.mamba(h, cache=st)
            attn = layer.self_attn
            q, k, v = attn._qkv(h * self.cfg.attention_in_multiplier, cos, sin)   # (1, heads, l, d)
            kc, vc = self.kv[i, 0], self.kv[i, 1]
            h1r_ops.reshape_and_cache(k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(), kc, vc, slots)
            o = h1r_ops.paged_attention_prefill(q[0].transpose(0, 1).contiguous(), kc, vc, bt, seq_lens, cu, scale=attn.scale)
            a = attn.o_proj(o.reshape(1, l, -1))
            x = layer._mix(x, mx, a)
        self.stats["prefill_tokens"] += l
        self.stats["prefill_time"] += time.perf_counter() - t0
        return m.logits(m.model.final_layernorm(x[:, -1]))[0].float()

    def _prefill_fused(self, x, slots, bt, seq_lens, cu, slot: int) -> torch.Tensor:
        """The prefill's layers on the model's fused inference path (``_layers_fused``), for one sequence of
        l tokens from position 0: x (l, hidden) embedded prompt; the K/V go to the pages ``slots``, the final
        conv and SSM states to state slot ``slot``. Returns the final-normed last hidden state (1, hidden)."""
        l = x.shape[0]

        def attend(i, q, kc, vc, scale):
            return h1r_ops.paged_attention_prefill(q, kc, vc, bt, seq_lens, cu, scale=scale)

        def mix(i, mamba, z, xBC, dt):
            st = LayerCache(None, None, self.states.conv[i, slot : slot + 1], self.states.ssm[i, slot : slot + 1])
            return mamba.forward_fused(z, xBC, dt, 1, l, cache=st)

        x = self._layers_fused(x, torch.arange(l, device=x.device)[None], l, slots, attend, mix)
        return self._final_norm(x[-1:].contiguous())

    def _layers_fused(self, x, pos_ids, max_pos: int, slot_mapping, attend, mix) -> torch.Tensor:
        """The decoder layers on the model's fused inference path (``fuse_projections``), shared by prefill and
        decode: per layer one GEMM for [mixer in | q | k | v], RoPE in place through the cached cos/sin tables,
        the paged K/V write (rows to ``slot_mapping``), ``attend(i, q, key_cache, value_cache, scale)``, the
        mixer ``mix(i, mamba, z, xBC, dt)``, and the output projections + MLP accumulated into the residual.
        x (n, hidden) embedded tokens at positions ``pos_ids`` (batch, len) (n = batch * len), all below
        ``max_pos``; returns the last layer's residual stream (n, hidden)."""
        m = self.model
        cos, sin = m.rope_tables(max_pos, x.dtype)
        for i, layer in enumerate(m.model.layers):
            z, xBC, dt, q, k, v = layer.project_fused(x)   # q (n, heads, d), k, v (n, kv_heads, d): row views
            # (batch, len, heads, d) seen as (batch, heads, len, d): rotary's layout, rotated in place in the
            # GEMM output
            torch.ops.h1r.rotary_(q.unflatten(0, pos_ids.shape).transpose(1, 2),
                                  k.unflatten(0, pos_ids.shape).transpose(1, 2), cos, sin, pos_ids, False)
            kc, vc = self.kv[i, 0], self.kv[i, 1]
            h1r_ops.reshape_and_cache(k, v, kc, vc, slot_mapping)
            o = attend(i, q, kc, vc, layer.self_attn.scale)
            x = layer.output_fused(x, mix(i, layer.mamba, z, xBC, dt), o.view(x.shape[0], -1))
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.model.model.final_layernorm
        return torch.ops.h1r.rms_norm_fwd(x, ln.weight, ln.eps, None)[0]

    @torch.no_grad()
    def _decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """One token for each sequence (its last sampled token, at position table.num_tokens); (b, vocab)."""
        m, b, dev, bs = self.model, len(seqs), self.device, self.block_size
        pos, slot_mapping, dirty = [], [], []
        for s in seqs:
            p = s.table.num_tokens
            slot = s.table.append_slots(1, self._copy_block)[0]
            pos.append(p)
            slot_mapping.append(slot)
            if p // bs >= s.bt_cols or slot // bs != s.bt_last:   # a new page, or a copied shared one
                dirty.append((s.slot, p // bs, slot // bs))
                s.bt_cols, s.bt_last = p // bs + 1, slot // bs
        # one host -> device transfer of this step's small per-trace inputs
        ints = torch.tensor([pos, slot_mapping, [s.slot for s in seqs], [s.tokens[-1] for s in seqs]],
                            dtype=torch.int64).to(dev)
        if dirty:
            d = torch.tensor(dirty, dtype=torch.int64).to(dev)
            self.block_tables[d[:, 0], d[:, 1]] = d[:, 2].to(torch.int32)
        state_idx = ints[2].to(torch.int32)
        bt = self.block_tables[:, : max(pos) // bs + 1].index_select(0, ints[2])
        seq_lens = (ints[0] + 1).to(torch.int32)
        slot_mapping = ints[1]
        x = m._embed(ints[3])
        if m.fused_ready(dev):
            return self._logits(self._decode_fused(x, ints[0], max(pos) + 1, slot_mapping, state_idx, bt, seq_lens))
        cos, sin = m.rotary_cos_sin(ints[0][:, None], x.dtype)
        for i, layer in enumerate(m.model.layers):
            h = layer.input_layernorm(x)
            mx = self._mixer_step(layer.mamba, h, i, state_idx)
            attn = layer.self_attn
            q, k, v = attn._qkv(h[:, None] * self.cfg.attention_in_multiplier, cos, sin)   # (b, heads, 1, d)
            kc, vc = self.kv[i, 0], self.kv[i, 1]
            h1r_ops.reshape_and_cache(k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), kc, vc, slot_mapping)
            o = h1r_ops.paged_attention_decode(q[:, :, 0].contiguous(), kc, vc, bt, seq_lens, scale=attn.scale)
            x = layer._mix(x, mx, attn.o_proj(o.reshape(b, -1)))
        return self._logits(m.model.final_layernorm(x))

    def _decode_fused(self, x, pos, max_pos: int, slot_mapping, state_idx, bt, seq_lens) -> torch.Tensor:
        """The decode step's layers on the model's fused inference path (``_layers_fused``): paged decode
        attention and the mixer's state step over the slot pool. x (b, hidden) embedded tokens at positions
        ``pos`` (b,) int64, all below ``max_pos``; returns the final-normed hidden states (b, hidden)."""

        def attend(i, q, kc, vc, scale):
            # q goes as the row view of the projection output: the op reads it in place
            return h1r_ops.paged_attention_decode(q, kc, vc, bt, seq_lens, scale=scale)

        def mix(i, mamba, z, xBC, dt):
            return mamba.step_fused(z, xBC, dt, self.states.conv[i], self.states.ssm[i], state_idx)

        return self._final_norm(self._layers_fused(x, pos[:, None].contiguous(), max_pos, slot_mapping, attend, mix))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (b, vocab) of final hidden states h (b, hidden) in the model dtype, the model's own
        ``logits`` written into workspace memory (no fresh (b, vocab) tensor per step)."""
        w = self.model.lm_head_weight
        return self.model.logits(h, out=self.ws.get("logits", (h.shape[0], w.shape[0]), w.dtype, h.device))

    def _set_block_row(self, s: _Seq) -> None:
        """Write a trace's whole block table into its row of ``block_tables`` (a fork or a fresh prefill)."""
        n = len(s.table.blocks)
        if n:
            self.block_tables[s.slot, :n] = torch.tensor(s.table.blocks, dtype=torch.int32).to(self.device)
        s.bt_cols, s.bt_last = n, (s.table.blocks[-1] if n else -1)

    def _mixer_step(self, mix, h, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """The Mamba2 mixer's decode step over the slot pool (rows ``idx``)."""
        b = h.shape[0]
        z, xBC, dt = mix._project(h)
        xBC = h1r_ops.causal_conv1d_update(xBC, self.states.conv[layer], mix.conv1d.weight.squeeze(1), mix.conv1d.bias,
                                           activation="silu", conv_state_indices=idx)
        x, B, C = xBC.split([mix.d_ssm, mix.G * mix.N, mix.G * mix.N], dim=-1)
        y = h1r_ops.selective_state_update(
            self.states.ssm[layer], x.reshape(b, mix.H, mix.P), dt, -torch.exp(mix.A_log.float()),
            B.reshape(b, mix.G, mix.N), C.reshape(b, mix.G, mix.N), D=mix.D,
            z=None if mix.norm is not None else z.reshape(b, mix.H, mix.P), dt_bias=mix.dt_bias, dt_softplus=True,
            state_batch_indices=idx)
        return mix._gate_out(y.reshape(b, mix.d_ssm), z)

    # -- sampling and retiring ----------------------------------------------------------------------------
    def _fused_sampler(self, params: list[SamplingParams]) -> bool:
        """Whether ``h1r_ops.sample_top_p`` (one fused pass per row) serves these rows: a kernel for the device
        and no top-k / min-p filter (greedy, temperature and top-p: DeepConf's setting)."""
        if self._has_sampler is None:
            self._has_sampler = h1r_ops.has_kernel("sample_top_p", self.device.type)
        return self._has_sampler and all(p.top_k <= 0 and p.min_p == 0 for p in params)

    def _sample(self, params: list[SamplingParams], gens: list[torch.Generator], logits: torch.Tensor):
        """Tokens (b,), top-k raw log-probs (b, k) and their ids, and the drawn tokens' log-probs (b,), with k
        the largest ``logprobs`` of the rows; one uniform per row from its own generator either way, so the
        fused kernel and the torch sampler draw the same tokens."""
        k = min(max(p.logprobs for p in params), logits.shape[-1])
        u = draw_uniforms(params, gens, logits.device)
        if self._fused_sampler(params):
            temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=logits.device)
            return torch.ops.h1r.sample_top_p(logits, temp, top_p, u, k)
        if logits.dtype != torch.float32:
            logits = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).copy_(logits)
        kk = max(1, k)
        parts = []
        # rows in chunks: the few streaming passes of sampling and log-probs over a chunk's (rows, vocab)
        # scratch stay in cache instead of going to memory once per pass
        for a in range(0, len(params), self.SAMPLE_CHUNK):
            sl = slice(a, a + self.SAMPLE_CHUNK)
            lg = logits[sl]
            top = lg.topk(kk, dim=-1)                    # DeepConf's top-k; its first is the row max
            t = sample_rows(lg, params[sl], gens[sl], self.ws, BatchParams(params[sl], lg.device), row_max=top[0][:, 0],
                            uniform=u[sl])
            parts.append((t, *raw_logprobs(lg, k, t, self.ws, top)))
        return tuple(torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts))

    def _accept(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample the next token of each sequence from its logits (b, vocab) and check its stop rules."""
        params = [s.req.params for s in seqs]
        k = max(p.logprobs for p in params)
        toks, top_v, top_i, chosen = self._sample(params, [s.generator for s in seqs], logits)
        same_k = all(p.logprobs == k for p in params)
        # one host transfer for the step's per-trace numbers
        toks_l = toks.tolist()
        if same_k:
            confs, chosen = torch.stack([token_confidence(top_v), chosen]).tolist()
        else:
            confs, chosen = None, chosen.tolist()
        for j, s in enumerate(seqs):
            p = s.req.params
            c = confs[j] if confs is not None else float(token_confidence(top_v[j : j + 1, : p.logprobs])[0])
            s.tokens.append(toks_l[j])
            s.confs.append(c)
            s.logprobs.append(chosen[j])
            if p.keep_logprobs:
                s.top = s.top or []
                s.top.append(list(zip(top_i[j, : p.logprobs].tolist(), top_v[j, : p.logprobs].tolist())))
            self._check_stop(s, toks_l[j])

    def _check_stop(self, s: _Seq, tok: int) -> None:
        p = s.req.params
        if p.conf_threshold is not None:
            if s.stopper is None:
                s.stopper = WindowStop(p.conf_threshold, p.conf_window)
            if s.stopper.push(s.confs[-1]):
                s.finish = "pruned"
                return
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            s.finish, s.stop_reason = "stop", tok
            return
        if p.stop:
            tail = decode(self.tokenizer, s.tokens[-(8 + max(len(x) for x in p.stop)):])
            for x in p.stop:
                if x in tail:
                    s.finish, s.stop_reason = "stop", x
                    return
        if len(s.tokens) >= p.max_tokens:
            s.finish = "length"

    def _retire(self, s: _Seq) -> TraceOutput:
        if s.table is not None:
            s.table.release()
        if s.slot is not None:
            self.states.free(s.slot)
        s.table = s.slot = None
        text = None
        if self.tokenizer is not None:
            text = decode(self.tokenizer, s.tokens)
            if isinstance(s.stop_reason, str) and s.stop_reason in text:
                text = text[: text.index(s.stop_reason)]
        return TraceOutput(s.req.id, s.index, s.req.prompt_ids, s.tokens, s.finish, s.confs, text, s.stop_reason,
                           s.top, s.seed, s.logprobs)

    def _release_prefix(self, r: _Request) -> None:
        if r.prefix is not None:
            r.prefix.release()
            self.states.free(r.prefix_slot)
        r.prefix = r.prefix_slot = r.prefix_logits = None

    # -- scheduling ------------------------------------------------------------------------------------
    def _room(self) -> bool:
        """A new trace may start: a free seat, and a free page per live trace for the next step."""
        return len(self.running) < self.max_num_seqs and self.allocator.num_free > len(self.running) + 1

    def _start_traces(self, finished: list[TraceOutput]) -> None:
        while self.preempted and self._room() and self.states.num_free > 0:
            s = self.preempted[0]   # recompute: prompt + tokens fed so far, then continue
            need = -(-(len(s.req.prompt_ids) + len(s.tokens) - 1) // self.block_size)
            if self.allocator.num_free < need + len(self.running) + 1:
                break
            self.preempted.popleft()
            s.table, s.slot = BlockTable(self.allocator), self.states.allocate()
            self._prefill(s.req.prompt_ids + s.tokens[:-1], s.table, s.slot)
            self._set_block_row(s)
            self.running.append(s)
        if self.preempted:
            return
        new, rows = [], []
        while self._room():
            if not self.prefixed:
                if not self.waiting or self.states.num_free == 0:
                    break
                need = -(-len(self.waiting[0].prompt_ids) // self.block_size)
                if self.allocator.num_free < need + len(self.running) + 1:
                    break
                r = self.waiting.popleft()
                r.prefix, r.prefix_slot = BlockTable(self.allocator), self.states.allocate()
                r.prefix_logits = self._prefill(r.prompt_ids, r.prefix, r.prefix_slot)
                self.prefixed.append(r)
            r = self.prefixed[0]
            if self.states.num_free == 0:
                break
            p = r.params
            seed = None if p.seed is None else p.seed + r.next_trace
            s = _Seq(r, r.next_trace, make_generator(seed, self.device), seed)
            r.next_trace += 1
            s.table, s.slot = r.prefix.fork(), self.states.allocate()
            self.states.copy(r.prefix_slot, s.slot)
            self._set_block_row(s)
            new.append(s)
            rows.append(r.prefix_logits)
            self.running.append(s)
            if r.next_trace == p.n:
                self._release_prefix(r)
                self.prefixed.popleft()
        self._first_tokens(new, rows, finished)

    def _first_tokens(self, new: list[_Seq], rows: list[torch.Tensor], finished: list[TraceOutput]) -> None:
        """Sample the first token of the traces just started (from their prompts' last logits), together."""
        if not new:
            return
        self._accept(new, torch.stack(rows))
        for s in new:
            if s.finish is not None:
                finished.append(self._retire(s))
        self.running = [s for s in self.running if s.finish is None]

    def _preempt_for(self, need: int) -> None:
        while self.allocator.num_free < sum(s.table.blocks_needed(1) for s in self.running):
            if len(self.running) <= 1:
                raise RuntimeError(f"out of KV pages with one trace live: raise num_blocks ({self.allocator.num_blocks})")
            s = self.running.pop()
            s.table.release()
            self.states.free(s.slot)
            s.table = s.slot = None
            self.preempted.appendleft(s)
            self.stats["preemptions"] += 1

    def step(self) -> list[TraceOutput]:
        """Start what fits, decode one token for every live trace, retire the finished; returns them."""
        finished: list[TraceOutput] = []
        self._start_traces(finished)
        if self.running:
            self._preempt_for(1)
            t0 = time.perf_counter()
            logits = self._decode(self.running)
            self._accept(self.running, logits)
            self.stats["decode_time"] += time.perf_counter() - t0
            self.stats["decode_steps"] += 1
            self.stats["decode_tokens"] += len(self.running)
            done = [s for s in self.running if s.finish is not None]
            self.running = [s for s in self.running if s.finish is None]
            finished.extend(self._retire(s) for s in done)
        return finished

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[list[TraceOutput]]:
        """Generate ``params.n`` traces for each prompt (text or token ids); returns, per prompt, its traces
        in index order."""
        if isinstance(prompts, (str, torch.Tensor)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[int, list[TraceOutput]] = {i: [] for i in ids}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(sp.n for sp in plist), desc="traces", unit="trace")
        while self.has_unfinished():
            for o in self.step():
                if o.request_id not in results:   # a request queued earlier through add_request
                    self.orphans.append(o)
                    continue
                results[o.request_id].append(o)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [sorted(results[i], key=lambda o: o.index) for i in ids]
