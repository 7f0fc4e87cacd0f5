// Mamba2 decode step: one token through the SSM recurrence, the state updated in place.
//
//   dt' = softplus?(dt + dt_bias)                      per (batch, head)
//   state[p, n] = exp(dt' A) state[p, n] + dt' x[p] B[n]
//   y[p] = sum_n state[p, n] C[n] + D[p] x[p];  out = y * silu(z) when z is given
//
// Layout: grid (ceil(p / kRowsPerBlock), h, b), kWarps warps per block. The (p, n) state matrix of one
// (batch, head) is row-major with n contiguous, so a warp takes one row p at a time and its lanes stride
// over n: every state load and store is a coalesced 32-lane access, and y[p] is a warp reduction
// (shuffles, no shared memory). B and C of the head's group are the same for every row: the block
// stages them once in shared memory. The step is memory bound (the state is read and written once);
// several blocks per head keep enough loads in flight when b * h is small.
#include "common.cuh"
#include "selective_state_update.h"

namespace h1r::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;

template <typename T, typename TS>
__global__ void __launch_bounds__(kWarps * 32) selective_state_update_kernel(SelectiveStateUpdateParams p) {
  H1R_DYNAMIC_SHARED(float, bc);  // B[0:n], C[n:2n]
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t g = h / (p.nheads / p.ngroups);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = b * p.nheads + h;
  const T* x = static_cast<const T*>(p.x) + bh * p.dim;
  const T* z = p.z ? static_cast<const T*>(p.z) + bh * p.dim : nullptr;
  T* out = static_cast<T*>(p.out) + bh * p.dim;

  const int64_t row = p.state_batch_indices ? p.state_batch_indices[b] : b;
  if (row < 0 || row >= p.state_rows) {  // padding: no state to update (uniform over the block)
    for (int64_t i = blockIdx.x * kRowsPerBlock + threadIdx.x; i < p.dim && i < (blockIdx.x + 1) * kRowsPerBlock;
         i += blockDim.x)
      out[i] = from_float<T>(0.0f);
    return;
  }

  const float* Bg = p.B + (b * p.ngroups + g) * p.dstate;
  const float* Cg = p.C + (b * p.ngroups + g) * p.dstate;
  for (int64_t i = threadIdx.x; i < p.dstate; i += blockDim.x) {
    bc[i] = Bg[i];
    bc[p.dstate + i] = Cg[i];
  }
  __syncthreads();

  float dt = p.dt[bh] + (p.dt_bias ? p.dt_bias[h] : 0.0f);
  if (p.dt_softplus) dt = softplus(dt);
  const float decay = __expf(dt * p.A[h]);

  TS* state = static_cast<TS*>(p.state) + (row * p.nheads + h) * p.dim * p.dstate;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = blockIdx.x * kRowsPerBlock + r * kWarps + warp;  // warp-uniform
    if (i >= p.dim) break;
    const float xv = to_float(x[i]);
    const float dtx = dt * xv;
    TS* srow = state + i * p.dstate;
    float acc = 0.0f;
    for (int64_t n = lane; n < p.dstate; n += 32) {
      const float s = to_float(srow[n]) * decay + dtx * bc[n];
      srow[n] = from_float<TS>(s);
      acc += s * bc[p.dstate + n];
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      float y = acc + (p.D ? p.D[h * p.dim + i] * xv : 0.0f);
      if (z) y *= silu(to_float(z[i]));
      out[i] = from_float<T>(y);
    }
  }
}

}  // namespace

const char* launch_selective_state_update(const SelectiveStateUpdateParams& p, void* stream) {
  const dim3 grid(unsigned(ceil_div(p.dim, kRowsPerBlock)), unsigned(p.nheads), unsigned(p.batch));
  const size_t smem = 2 * size_t(p.dstate) * sizeof(float);
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_dtype(p.state_dtype, [&](auto ts) {
      using TS = decltype(ts);
      return launch(selective_state_update_kernel<T, TS>, grid, dim3(kWarps * 32), smem,
                    static_cast<cudaStream_t>(stream), p);
    });
  });
}

}  // namespace h1r::cuda
