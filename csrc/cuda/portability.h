// The CUDA surface our kernels are written against: plain CUDA under nvcc, a CPU emulator under g++.
//
// Kernels in csrc/cuda/*.cu include this header and nothing from torch. They may use: __global__ /
// __device__ functions, dim3 / threadIdx / blockIdx / blockDim / gridDim, static `__shared__` arrays and
// dynamic shared memory through H1R_DYNAMIC_SHARED, __syncthreads, the warp collectives
// __shfl_sync / __shfl_xor_sync / __shfl_down_sync / __shfl_up_sync / __syncwarp / __ballot_sync /
// __any_sync / __all_sync, atomicAdd / atomicMax / atomicCAS, the fast math intrinsics (__expf, __logf,
// rsqrtf, __fdividef, ...) and __half / __nv_bfloat16 with their explicit conversions. Launch through
// h1r::cuda::launch(kernel, grid, block, dynamic_smem_bytes, stream, args...), which returns nullptr or
// an error message. No cub, no inline PTX, no implicit half conversions: then the same source runs
// in both modes.
//
// Modes:
//   * nvcc (__CUDACC__): this header maps straight onto CUDA.
//   * g++ with -DH1R_CUDA_EMULATOR: emu/emulator.h supplies the same names on the CPU. A launch runs
//     its blocks one after another; the threads of a block are fibers (one small stack each) that a
//     scheduler runs in turn, each until it reaches __syncthreads, a warp collective or its end. A
//     barrier is real: no fiber passes it until every live thread of its block (or warp, for the
//     collectives) has arrived, so a kernel that forgot a barrier reads data its peers have not written
//     yet and gives a wrong result. The order in which the fibers run between two barriers is
//     selectable (forward, reverse, seeded random) so that tests can expose both kinds of missing
//     barrier (readers running before writers in one order or the other). Warp shuffles exchange through
//     a per-warp buffer; a barrier the threads of a block reach divergently (some at __syncthreads, some
//     at a warp collective) is reported as a deadlock instead of hanging. See emu/emulator.h for details.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// extern dynamic shared memory of the launch, typed.
#define H1R_DYNAMIC_SHARED(type, name) \
  extern __shared__ unsigned char h1r_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(h1r_dynamic_smem_)

namespace h1r::cuda {

// Launch `kernel` on `stream`; returns nullptr on success, else CUDA's error message.
template <typename... Params, typename... Args>
inline const char* launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem,
                          cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return nullptr;  // nothing to do
  if (dynamic_smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(dynamic_smem));
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  kernel<<<grid, block, dynamic_smem, stream>>>(static_cast<Params>(args)...);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace h1r::cuda

#elif defined(H1R_CUDA_EMULATOR)

#include "emu/emulator.h"

#else
#error "csrc/cuda kernels build with nvcc, or with g++ -DH1R_CUDA_EMULATOR (the CPU emulator used by the tests)"
#endif

namespace h1r::cuda {

// Element types of kernel I/O; all arithmetic is in fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace h1r::cuda
