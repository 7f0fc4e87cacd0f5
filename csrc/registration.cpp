// The h1r operator library: one schema per op, defined once here.
//
// Kernels register themselves per dispatch key next to their code:
//   csrc/cpu/<family>.cpp       TORCH_LIBRARY_IMPL(h1r, CPU, m)
//   csrc/cuda/<family>_api.cpp  TORCH_LIBRARY_IMPL(h1r, CUDA, m)   (torch-facing glue for csrc/cuda/<family>.cu)
// Autograd formulas and fake (meta) implementations are registered once, in Python
// (h1r_ops/_registry.py and the per-family modules), so they serve every backend.
//
// Conventions shared by all ops (the Python layer in h1r_ops/ normalizes user input to them):
//   * every tensor argument is contiguous unless the schema comment says otherwise;
//   * optional inputs are `Tensor?`; gradients of absent inputs come back as empty (numel 0) tensors;
//   * floating inputs are fp32, bf16 or fp16; all accumulation is fp32;
//   * index tensors (seq_idx, *_indices, block tables, positions) are int32 unless noted.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"
#include "cpu/amx.h"
#include "cpu/linear.h"

TORCH_LIBRARY(h1r, m) {
  // ---- Mamba2 selective scan (chunked SSD) -------------------------------------------------------
  // x (b, l, h, p); dt (b, l, h); A (h,) fp32; B, C (b, l, g, n) with g | h; D (h, p); z (b, l, h, p);
  // dt_bias (h,); initial_states (b, h, p, n); seq_idx (b, l) int32, non-decreasing along l.
  // dt' = clamp(softplus?(dt + dt_bias), dt_min, dt_max); state_t = exp(dt' A) state_{t-1} + dt' B_t x_t;
  // y_t = C_t . state_t + D x_t; out = y * silu(z) when z is given. The state resets where seq_idx changes.
  // Returns out (b, l, h, p) in x's dtype and final_states (b, h, p, n) fp32.
  m.def(
      "selective_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, bool dt_softplus, float dt_min, "
      "float dt_max) -> (Tensor out, Tensor final_states)");
  // Gradients for every input (empty where the input was absent); dfinal_states may be absent.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, int chunk_size, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, "
      "Tensor? seq_idx, bool dt_softplus, float dt_min, float dt_max) -> (Tensor dx, Tensor ddt, Tensor dA, "
      "Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddt_bias, Tensor dinitial_states)");
  // One decode step, state updated in place. state (S, h, p, n) (S >= b when state_batch_indices picks
  // rows); x (b, h, p); dt (b, h); A (h,) fp32; B, C (b, g, n); D (h, p); z (b, h, p); dt_bias (h,);
  // state_batch_indices (b,) int32. Returns out (b, h, p).
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices) -> Tensor");

  // ---- depthwise causal conv1d ---------------------------------------------------------------------
  // x (b, d, l) with either channel-first (stride(2) == 1) or channel-last (stride(1) == 1) strides;
  // weight (d, w), 2 <= w <= 4; bias (d,); seq_idx (b, l) int32; initial_states (b, d, w-1).
  // out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (w-1) + k]), taps outside the sequence
  // (or, with seq_idx, outside the current document) read zero (or initial_states before t = 0).
  // Returns out (same shape and layout as x) and final_states (b, d, w-1) (empty unless requested).
  m.def(
      "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states, "
      "bool return_final_states, bool silu) -> (Tensor out, Tensor final_states)");
  m.def(
      "causal_conv1d_bwd(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor? seq_idx, Tensor? initial_states, bool silu) -> (Tensor dx, Tensor dweight, Tensor dbias, "
      "Tensor dinitial_states)");
  // x (b, d) or (b, d, l); conv_state (S, d, state_len >= w-1) shifted in place; conv_state_indices (b,).
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, "
      "Tensor? conv_state_indices) -> Tensor");

  // ---- RMSNorm (optionally fused with the residual add) -------------------------------------------
  // x (..., d) viewed as (rows, d); weight (d,); residual like x. h = x (+ residual);
  // out = weight * cast_to_dtype(h * rstd), rstd = rsqrt(mean(h^2) + eps) in fp32 (FalconH1RMSNorm).
  // Returns out, residual_out (= h, empty when residual is absent) and rstd (rows,) fp32.
  m.def(
      "rms_norm_fwd(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor out, "
      "Tensor residual_out, Tensor rstd)");
  // h is the normalized input (x, or residual_out when fused). Returns dh (which is both dx and
  // dresidual when fused; dresidual_out is added in) and dweight (d,) fp32.
  m.def(
      "rms_norm_bwd(Tensor dout, Tensor? dresidual_out, Tensor h, Tensor weight, Tensor rstd) -> "
      "(Tensor dh, Tensor dweight)");
  // Mamba2 gated norm. x, z (rows, d); weight (d,); statistics per group of group_size channels.
  // norm_before_gate: out = rmsnorm(x) * w * silu(z); else out = rmsnorm(x * silu(z)) * w.
  // Returns out and rstd (rows, d / group_size) fp32.
  m.def(
      "gated_rms_norm_fwd(Tensor x, Tensor? z, Tensor weight, float eps, int group_size, "
      "bool norm_before_gate) -> (Tensor out, Tensor rstd)");
  m.def(
      "gated_rms_norm_bwd(Tensor dout, Tensor x, Tensor? z, Tensor weight, Tensor rstd, float eps, "
      "int group_size, bool norm_before_gate) -> (Tensor dx, Tensor dz, Tensor dweight)");

  // ---- rotary embedding (NeoX / rotate_half layout) ------------------------------------------------
  // q (b, hq, s, hd), k (b, hk, s, hd): any strides with a unit last stride. cos, sin: (1 or b, s, rd)
  // already gathered, or a table (max_pos, rd) gathered by position_ids (b, s) int64; rd <= hd rotates
  // the first rd channels. inverse rotates by -theta (that is the backward). Functional form:
  m.def(
      "rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool inverse) -> "
      "(Tensor q_out, Tensor k_out)");
  // In-place form, for inference.
  m.def(
      "rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids, bool inverse) -> ()");

  // ---- lm head fused with cross entropy / log-probs / entropy (chunked: never the full logits) ----
  // hidden (T, d); weight (V, d); target (T,) int64 in [0, V) or ignore_index; bias (V,); all of one
  // floating dtype. logits = (hidden @ weight^T + bias) * logit_scale; softmax statistics in fp32.
  // loss_t = (1 - eps) (lse_t - logit_t,y) + eps (lse_t - mean_j logit_tj) + z_loss_scale lse_t^2.
  // reduction: 0 none, 1 mean (over non-ignored tokens; 0 when there are none), 2 sum. When compute_grad,
  // the gradients of the reduced loss ('none': of the sum) w.r.t. hidden, weight and bias are computed in
  // the same pass (Liger style) and backward only scales them; otherwise they come back empty.
  // Returns loss (fp32 scalar, or (T,) for none), z_loss (same shape; the lse^2 term, already weighted
  // into loss), lse (T,) fp32 (0 for ignored tokens), grad_hidden, grad_weight, grad_bias.
  m.def(
      "fused_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "int ignore_index, float label_smoothing, float z_loss_scale, float logit_scale, int reduction, "
      "bool compute_grad) -> (Tensor loss, Tensor z_loss, Tensor lse, Tensor grad_hidden, "
      "Tensor grad_weight, Tensor grad_bias)");
  // Gradients for a per-token upstream gradient grad_loss (T,) fp32 (dL/dloss_t: reduction 'none' with a
  // non-uniform grad_output, or a forward run without compute_grad), recomputing the logits chunk by
  // chunk from the saved lse. grad_bias is empty when bias is absent.
  m.def(
      "fused_linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, "
      "Tensor? bias, Tensor lse, int ignore_index, float label_smoothing, float z_loss_scale, "
      "float logit_scale) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Per-token log p(target) and entropy of softmax(logits / temperature), both fp32 (T,), plus the
  // logsumexp of logits / temperature (T,) fp32 saved for the backward. Targets equal to ignore_index
  // give 0 (log-prob, entropy and lse).
  m.def(
      "fused_linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "float temperature, float logit_scale, int ignore_index) -> (Tensor logprobs, Tensor entropy, "
      "Tensor lse)");
  // Recomputes the logits chunk by chunk. dlogprobs, dentropy (T,) fp32 (either may be absent).
  m.def(
      "fused_linear_logprobs_bwd(Tensor? dlogprobs, Tensor? dentropy, Tensor hidden, Tensor weight, "
      "Tensor target, Tensor? bias, float temperature, float logit_scale, int ignore_index, Tensor lse) -> "
      "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // ---- paged attention -----------------------------------------------------------------------------
  // key_cache, value_cache (num_blocks, block_size, hk, hd); block_tables (b, max_blocks) int32;
  // seq_lens (b,) int32: the context length of each sequence, the new tokens included.
  // Write new keys/values: key, value (tokens, hk, hd); slot_mapping (tokens,) int64, slot =
  // block * block_size + offset, negative = skip (padding).
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  // Decode: q (b, hq, hd), one query per sequence at position seq_lens[i] - 1. Returns (b, hq, hd).
  m.def(
      "paged_attention_decode(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale) -> Tensor");
  // Prefill / chunked prefill: q (total_q, hq, hd) packed by cu_seqlens_q (b+1,) int32; the queries of
  // sequence i are its last (cu[i+1]-cu[i]) positions, attending causally over its seq_lens[i] keys.
  m.def(
      "paged_attention_prefill(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor cu_seqlens_q, float scale) -> Tensor");

  // ---- token sampling (the batched decoder's per-step sampler) --------------------------------------
  // logits (b, vocab) fp32 / bf16 / fp16 with a unit column stride (any row stride); temperature, top_p,
  // uniform (b,) fp32. Row i: temperature 0 is greedy (the first max); otherwise the exact top-p nucleus
  // of softmax(logits / temperature) (a token is kept iff the mass of the tokens ranked above it, ties
  // ranked lowest id first, is below top_p of the total; top_p = 1 keeps all) and the token is the first,
  // in vocabulary order, whose cumulative kept probability reaches uniform (in (0, 1]) times the kept
  // total. Log-probs are those of the raw distribution log_softmax(logits) (temperature 1).
  // Returns tokens (b,) int64, top_logprobs (b, num_logprobs) fp32 descending (ties lowest id first),
  // top_ids (b, num_logprobs) int64 and token_logprob (b,) fp32 (the log-prob of the drawn token).
  m.def(
      "sample_top_p(Tensor logits, Tensor temperature, Tensor top_p, Tensor uniform, int num_logprobs) -> "
      "(Tensor tokens, Tensor top_logprobs, Tensor top_ids, Tensor token_logprob)");
  // ---- linear layer for a few rows (decode; bf16 batches on AMX tiles) -------------------------------
  // x (m, k); weight (n, k) in x's dtype; bias, scale (n,) any float dtype; residual (m, n_out) in x's
  // dtype. y = x @ weight^T * scale + bias (fp32); with swiglu the weight holds [gate | up] rows and
  // a = silu(y[:, :n/2]) * y[:, n/2:] (n_out = n/2), else a = y (n_out = n); out = alpha * a + residual,
  // rounded once to x's dtype. Inference only (no backward op: the public API differentiates it in torch).
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? scale=None, float alpha=1.0, "
      "Tensor? residual=None, bool swiglu=False) -> Tensor");
  // The SwiGLU of a [gate | up] GEMM output x (m, 2 * width): silu(x[:, :width] * gate_scale) *
  // x[:, width:] (m, width) in fp32, one rounding to x's dtype (the many-row MLP, where the GEMM is the BLAS's).
  m.def("swiglu(Tensor x, float gate_scale=1.0) -> Tensor");
  // Whether h1r::linear multiplies bf16 x of 5 or more rows on AMX tiles on this machine (the CPU has
  // AMX-BF16, the OS grants the tile state, H1R_CPU_NO_AMX unset), for shapes with k % 32 == 0 and
  // n_out % 16 == 0: the weight read in its plain layout (no per-call reorder), the epilogue fused.
  m.def("linear_amx() -> bool", []() -> bool { return h1r::cpu::amx_usable(); });

  // ---- build introspection -------------------------------------------------------------------------
  // The CPU ISA the kernels were dispatched for at load time ("avx512", "avx2" or "scalar").
  m.def("cpu_isa() -> str", []() -> std::string { return h1r::cpu::cpu_isa_name(); });
  // Whether the CUDA kernels of csrc/cuda/ were compiled into this library (Triton kernels, registered
  // for the CUDA key from Python, do not count).
  m.def("built_with_cuda() -> bool", []() -> bool {
#ifdef H1R_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

// Importing h1r_ops._C runs the static registrations above; it defines no Python functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
