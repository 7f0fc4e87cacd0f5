// Device helpers shared by the kernels: warp / block reductions, activations, dtype dispatch.
#pragma once

#include "launch.h"
#include "portability.h"

namespace h1r::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Butterfly reductions: every lane ends with the result.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum / max for a block of whole warps; every thread gets the result. `scratch` holds one
// float per warp. The first barrier publishes the warp partials, the second lets the caller reuse
// `scratch` (and whatever it wrote to shared memory before the call is visible to all threads after it).
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const float identity = kMax ? -INFINITY : 0.0f;
  v = lane < nwarps ? scratch[lane] : identity;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }
// d silu(x) / dx = sigmoid(x) (1 + x (1 - sigmoid(x))).
__device__ __forceinline__ float silu_grad(float x) {
  const float s = 1.0f / (1.0f + __expf(-x));
  return s * (1.0f + x * (1.0f - s));
}
// torch.nn.functional.softplus (beta 1, threshold 20).
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

// Calls f(T{}) with T the kernel element type of `d`; returns what f returns (an error message or null).
template <typename F>
inline const char* dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::f32: return f(float{});
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f16: return f(__half{});
  }
  return "h1r: unsupported dtype";
}

}  // namespace h1r::cuda
