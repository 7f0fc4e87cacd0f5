// Raw-pointer parameter blocks shared by the RMSNorm glue (rms_norm.cpp) and its per-ISA kernels
// (rms_norm_kernels.cpp). All tensors are contiguous, rows x d, row-major.
#pragma once

#include <cstdint>

#include "cpu/float_io.h"

namespace h1r::cpu {

// h = x (+ residual, rounded to the input type); rstd = rsqrt(mean(h^2) + eps);
// out = T(w * T(h * rstd)) (FalconH1RMSNorm: normalize in fp32, cast, then scale).
struct RmsNormFwdParams {
  const void* x;
  const void* residual;  // nullable
  const void* weight;
  void* out;
  void* residual_out;  // = h; nullable (only with residual)
  float* rstd;         // (rows,)
  int64_t rows, d;
  float eps;
  FloatType dtype, wdtype;  // of x / residual / out, and of weight
  bool hw_bf16;             // bf16 may be narrowed by AVX512-BF16 (cpu_has_avx512_bf16())
};

// dh = rstd * (g - xn * mean(g * xn)) (+ dresidual_out), g = dout * w, xn = h * rstd;
// dweight = sum_rows dout * T(xn), summed per block of rows into dweight_partial (nblocks, d) and then
// over the blocks in order: deterministic whatever the thread count.
struct RmsNormBwdParams {
  const void* dout;
  const void* dresidual_out;  // nullable
  const void* h;
  const void* weight;
  const float* rstd;
  void* dh;
  float* dweight_partial;  // (nblocks, d) scratch
  float* dweight;          // (d,)
  int64_t rows, d, nblocks;
  FloatType dtype, wdtype;
  bool hw_bf16;  // as in RmsNormFwdParams
};

// Mamba2 gated norm, statistics per group of group_size channels, all in fp32, one cast at the end.
// norm_before_gate: out = x * rstd * w * silu(z); else u = x * silu(z), out = u * rstd * w. No z: x * rstd * w.
struct GatedRmsNormFwdParams {
  const void* x;
  const void* z;  // nullable
  int64_t z_stride;  // elements between z's rows (d when contiguous; the fused model passes a column slice)
  const void* weight;
  void* out;
  float* rstd;  // (rows, d / group_size)
  int64_t rows, d, group_size;
  float eps;
  bool norm_before_gate;
  FloatType dtype, wdtype;
  bool hw_bf16;  // as in RmsNormFwdParams
};

struct GatedRmsNormBwdParams {
  const void* dout;
  const void* x;
  const void* z;  // nullable
  const void* weight;
  const float* rstd;
  void* dx;
  void* dz;                // nullable (with z)
  float* dweight_partial;  // (nblocks, d) scratch
  float* dweight;          // (d,)
  int64_t rows, d, group_size, nblocks;
  bool norm_before_gate;
  FloatType dtype, wdtype;
  bool hw_bf16;  // as in RmsNormFwdParams
};

// Rows are split into this many blocks (at most) for the deterministic dweight reduction.
constexpr int64_t kDweightBlocks = 64;

}  // namespace h1r::cpu
