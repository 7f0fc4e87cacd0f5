// Kernel parameters of the causal_conv1d family, shared by the torch-facing glue (causal_conv1d.cpp)
// and the per-ISA SIMD kernels (causal_conv1d_kernels.cpp). Plain pointers, sizes and strides (in
// elements); no torch header, so the kernel files stay free of ATen beyond at::vec.
#pragma once

#include <cstdint>

namespace h1r::cpu {

enum class ConvDtype : int { f32 = 0, bf16 = 1, f16 = 2 };

// x (b, d, l) and out / dout / dx share one layout: channel-first (stride_t == 1) or channel-last
// (stride_c == 1). weight (d, w) fp32, bias (d,) fp32, initial_states / final_states /
// dinitial_states / dfinal_states (b, d, w-1) fp32, seq_idx (b, l) int32: all contiguous.
struct CausalConv1dParams {
  ConvDtype dtype;          // of x, out, dout and dx
  int64_t batch, dim, seqlen, width;
  bool channel_last;
  bool silu;
  const void* x;
  int64_t x_stride_b, x_stride_c, x_stride_t;
  void* out;                // forward output (x's layout), or dx in the backward
  int64_t out_stride_b, out_stride_c, out_stride_t;
  const void* dout;         // backward only, same strides as out
  int64_t dout_stride_b, dout_stride_c, dout_stride_t;
  const float* weight;
  const float* bias;        // nullable
  const int32_t* seq_idx;   // nullable
  const float* initial_states;  // nullable
  float* final_states;      // forward: nullable (not requested)
  const float* dfinal_states;   // backward: nullable
  float* dweight;           // backward: (d, w)
  float* dbias;             // backward: nullable
  float* dinitial_states;   // backward: nullable
};

// x (b, d, l) any strides; conv_state (S, d, state_len) any strides, updated in place; out (b, d, l)
// contiguous; weight (d, w) and bias (d,) contiguous, both fp32 or both in x's dtype (params_f32), so
// that a bf16 model's parameters are read as they are, without a conversion per call;
// conv_state_indices (b,) int32 or int64 with a stride, or null (row i of the batch uses state row i);
// a negative index marks a padded row (zero output, state untouched).
struct CausalConv1dUpdateParams {
  ConvDtype dtype;          // of x, out and conv_state
  bool params_f32;          // weight / bias are fp32 (else x's dtype)
  int64_t batch, dim, seqlen, width, state_len, num_states;
  bool silu;
  const void* x;
  int64_t x_stride_b, x_stride_c, x_stride_t;
  void* out;
  void* conv_state;
  int64_t state_stride_b, state_stride_c, state_stride_t;
  const void* weight;
  const void* bias;         // nullable
  const void* conv_state_indices;  // nullable
  bool indices_i64;
  int64_t indices_stride;
};

}  // namespace h1r::cpu
