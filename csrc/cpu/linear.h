// Raw-pointer arguments of the small-row linear kernel (csrc/cpu/linear_kernels.cpp), shared with its
// glue (csrc/cpu/linear.cpp).
#pragma once

#include <cstdint>

#include "cpu/float_io.h"

namespace h1r::cpu {

// y = x @ weight^T (m, n) with an fp32 epilogue per output element:
//   v = y * scale[j] + bias[j]                      (scale, bias optional, fp32)
//   a = swiglu ? silu(v[j]) * v[n/2 + j] : v[j]     (the output has n/2 columns with swiglu)
//   out = alpha * a (+ residual)
// x, residual and out share one dtype with weight; rows may be strided, the last dimension is dense.
struct LinearParams {
  const void* x;
  int64_t x_stride;          // elements between rows of x (m, k)
  const void* weight;
  int64_t w_stride;          // elements between rows of weight (n, k)
  const float* scale;        // (n,) or null
  const float* bias;         // (n,) or null
  const void* residual;      // (m, n_out) or null
  int64_t res_stride;
  void* out;                 // (m, n_out)
  int64_t out_stride;
  int64_t m, n, k;
  float alpha;
  bool swiglu;
  bool bf16_dot;             // the CPU has AVX512-BF16 (dot products of bf16 pairs) and it may be used
  bool amx;                  // bf16 on AMX tiles (amx_usable(), k % 32 == 0, n_out % 16 == 0, many rows)
  FloatType dtype;
};

// Rows of x from which h1r::linear runs on AMX tiles when it may (fewer rows: the weight-streaming dot
// product kernel, which is memory-bound there anyway).
constexpr int64_t kLinearAmxMinRows = 5;

// out[i, j] = silu(x[i, j] * gate_scale) * x[i, width + j] for j < width: the SwiGLU of a [gate | up]
// GEMM output (m, 2 * width) in fp32 with one rounding; rows may be strided.
struct SwigluParams {
  const void* x;
  int64_t x_stride;
  void* out;
  int64_t out_stride;
  int64_t m, width;
  float gate_scale;
  FloatType dtype;
};

}  // namespace h1r::cpu
