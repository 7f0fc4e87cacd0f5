// Launchers of the depthwise causal conv1d kernels (csrc/cuda/causal_conv1d.cu); plain C++ for the glue.
#pragma once

#include "launch.h"

namespace h1r::cuda {

// The inputs of the forward, which the backward reads too.
struct CausalConv1dInputs {
  const void* x;  // (b, d, l) with element strides x_stride_*
  DType dtype;    // of x and of the (b, d, l) outputs (and final_states)
  int64_t batch, dim, seqlen, width;  // 2 <= width <= 4
  int64_t x_stride_b, x_stride_d, x_stride_l;
  const float* weight;          // (d, w)
  const float* bias;            // (d,) or null
  const int32_t* seq_idx;       // (b, l) or null
  const float* initial_states;  // (b, d, w-1) or null
  bool silu;
  bool channel_last;  // x_stride_d == 1: use the kernel that walks time with threads over channels
};

struct CausalConv1dFwdParams : CausalConv1dInputs {
  void* out;  // same shape as x, strides out_stride_*
  int64_t out_stride_b, out_stride_d, out_stride_l;
  void* final_states;  // (b, d, w-1) or null
};

struct CausalConv1dUpdateParams {
  const void* x;  // (b, d, l) contiguous (l new steps)
  void* out;      // (b, d, l)
  DType dtype;
  void* conv_state;  // (S, d, state_len) contiguous, shifted in place
  DType state_dtype;
  int64_t batch, dim, seqlen, width, state_len, state_rows;
  const float* weight;  // (d, w)
  const float* bias;    // (d,) or null
  const int32_t* conv_state_indices;  // (b,) or null; a row outside [0, S) is padding: out = 0
  bool silu;
};

// Backward of the forward above. dout and dx share x's layout (strides given); dweight / dbias are
// reduced without atomics: every block writes its sums to its own slot of `partials`
// (causal_conv1d_bwd_partials(p) slots of (w + 1) x d floats: taps, then bias), and a second kernel
// adds the slots in a fixed order (deterministic).
struct CausalConv1dBwdParams : CausalConv1dInputs {
  const void* dout;  // (b, d, l), in dtype
  void* dx;          // (b, d, l)
  int64_t dout_stride_b, dout_stride_d, dout_stride_l, dx_stride_b, dx_stride_d, dx_stride_l;
  const float* dfinal_states;   // (b, d, w-1) or null
  float* dinitial_states;       // (b, d, w-1) or null
  float* partials;              // (causal_conv1d_bwd_partials(p), w + 1, d) scratch
  float* dweight;               // (d, w)
  float* dbias;                 // (d,) or null
};

const char* launch_causal_conv1d_fwd(const CausalConv1dFwdParams& p, void* stream);
const char* launch_causal_conv1d_update(const CausalConv1dUpdateParams& p, void* stream);
int64_t causal_conv1d_bwd_partials(const CausalConv1dBwdParams& p);
const char* launch_causal_conv1d_bwd(const CausalConv1dBwdParams& p, void* stream);

}  // namespace h1r::cuda
