// Arguments of the CPU selective-scan kernels: raw pointers and sizes only (shared by the glue,
// csrc/cpu/selective_scan.cpp, and the per-ISA kernels, csrc/cpu/selective_scan_kernels.cpp).
#pragma once

#include <cstdint>

namespace h1r::cpu {

// Element type of the floating tensors whose dtype follows the input (x, dt, B, C, z, out, ...).
enum class ScanDtype : int { f32 = 0, bf16 = 1, f16 = 2 };

// Chunked SSD. All tensors contiguous. x, z, out (b, l, h, p) and dt (b, l, h), B, C (b, l, g, n) are in
// `dtype`; A (h,), D (h, p), dt_bias (h,), initial_states / final_states (b, h, p, n) and the CB
// scratch (b, g, nchunks, Q, Q) are fp32; seq_idx (b, l) int32. Optional pointers are null when absent.
struct ScanParams {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk;
  ScanDtype dtype;
  const void* x;
  const void* dt;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const void* z;
  const float* dt_bias;
  const float* initial_states;
  const int32_t* seq_idx;
  bool dt_softplus;
  float dt_min, dt_max;
  float* cb;  // scratch: C_c B_c^T per (batch, group, chunk)
  float* B32;  // scratch (b, l, g, n) fp32 copies of B and C when dtype is not fp32 (else null)
  float* C32;
  bool amx;  // bf16 chunk products on AMX tiles (the glue's scan_amx(): amx_usable() and the shapes fit the tiles)
  // forward outputs
  void* out;
  float* final_states;
  // backward inputs / outputs (fp32 gradients; dB, dC per head (b, l, h, n), summed over heads by the glue)
  const void* dout;
  const float* dfinal_states;
  float* dx;
  float* ddt;       // (b, l, h): gradient w.r.t. the raw dt
  float* dA;        // (b, h) partial sums, reduced by the glue
  float* dB;        // (b, l, h, n)
  float* dC;        // (b, l, h, n)
  float* dD;        // (b, h, p) partial sums
  float* dz;        // (b, l, h, p)
  float* ddt_bias;  // (b, h) partial sums
  float* dinitial_states;  // (b, h, p, n)
  float* chunk_states;     // scratch (b, h, nchunks, n, p): the state entering each chunk
};

// One decode step. state (S, h, p, n) in state_dtype; x, z, out (b, h, p), dt (b, h), B, C (b, g, n) in
// dtype; A, dt_bias (h,), D (h, p) fp32; state_batch_indices (b,) int32.
struct StateUpdateParams {
  int64_t batch, nheads, headdim, ngroups, dstate;
  ScanDtype dtype, state_dtype;
  void* state;
  const void* x;
  const void* dt;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const void* z;
  const float* dt_bias;
  bool dt_softplus;
  const int32_t* state_batch_indices;
  // elements between consecutive batch rows of x, dt, B, C, z (their other dimensions are contiguous:
  // the decode step takes row views of a projection's output without a copy)
  int64_t x_bstride, dt_bstride, B_bstride, C_bstride, z_bstride;
  void* out;
  bool hw_bf16;  // a bf16 state may be rounded by AVX512-BF16's vcvtneps2bf16 (cpu_has_avx512_bf16())
};

}  // namespace h1r::cpu
