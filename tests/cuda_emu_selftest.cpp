// Kernels that check the emulator itself against CUDA's documented semantics (tests/test_cuda_emulated.py
// computes the expected values): shuffles with sub-warp widths, votes, atomics, the 16-bit float
// conversions, and the detection of divergent barriers. Compiled as one emulator translation unit.
#include "common.cuh"

namespace h1r::emu_selftest {

using namespace h1r::cuda;

// out (7, blockDim.x): rows xor(5), down(3), up(2), idx(7) of the value 10 * tid, ballot(tid % 3 == 0),
// any(tid == 40), all(tid < 64), with shuffle width `width`.
__global__ void collectives_kernel(int* out, int width) {
  const int tid = threadIdx.x, n = blockDim.x;
  out[0 * n + tid] = __shfl_xor_sync(kFullMask, 10 * tid, 5, width);
  out[1 * n + tid] = __shfl_down_sync(kFullMask, 10 * tid, 3, width);
  out[2 * n + tid] = __shfl_up_sync(kFullMask, 10 * tid, 2, width);
  out[3 * n + tid] = __shfl_sync(kFullMask, 10 * tid, 7, width);
  out[4 * n + tid] = int(__ballot_sync(kFullMask, tid % 3 == 0));
  out[5 * n + tid] = __any_sync(kFullMask, tid == 40);
  out[6 * n + tid] = __all_sync(kFullMask, tid < 64);
}

__global__ void atomics_kernel(float* sum, int* max_id) {
  const int id = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(sum, 1.0f);
  atomicMax(max_id, id);
}

// Block reduction with a dynamic shared scratch: out[block] = sum of in over the block's threads.
__global__ void block_sum_kernel(const float* in, float* out) {
  H1R_DYNAMIC_SHARED(float, scratch);
  const float s = block_reduce<false>(in[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Half of each warp waits at __syncthreads, the other half at a shuffle: a hang (or undefined behaviour)
// on a GPU, an error here. (A whole warp exiting instead of reaching __syncthreads is legal since Volta.)
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 32 < 16)
    __syncthreads();
  else
    out[threadIdx.x] = warp_sum(1.0f);
}

const char* launch_collectives(int* out, int threads, int width) {
  return launch(collectives_kernel, dim3(1), dim3(threads), 0, nullptr, out, width);
}
const char* launch_atomics(float* sum, int* max_id, int blocks, int threads) {
  return launch(atomics_kernel, dim3(blocks), dim3(threads), 0, nullptr, sum, max_id);
}
const char* launch_block_sum(const float* in, float* out, int blocks, int threads) {
  return launch(block_sum_kernel, dim3(blocks), dim3(threads), (threads / 32) * sizeof(float), nullptr, in, out);
}
const char* launch_divergent_barrier(float* out) {
  return launch(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr, out);
}
const char* launch_too_many_threads() { return launch(atomics_kernel, dim3(1), dim3(2048), 0, nullptr, nullptr, nullptr); }

void convert(const float* in, uint16_t* half_bits, uint16_t* bf16_bits, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    half_bits[i] = __float2half_rn(in[i]).bits;
    bf16_bits[i] = __float2bfloat16_rn(in[i]).bits;
  }
}
void widen(const uint16_t* bits, float* from_half, float* from_bf16, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    from_half[i] = __half2float(__half{bits[i]});
    from_bf16[i] = __bfloat162float(__nv_bfloat16{bits[i]});
  }
}

}  // namespace h1r::emu_selftest
