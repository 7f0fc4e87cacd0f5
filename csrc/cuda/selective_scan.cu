// Mamba2 selective scan forward (SSD), chunked, in one kernel per (batch, head, tile of p rows).
//
//   dt'_t = clamp?(softplus?(dt_t + dt_bias)); a_t = dt'_t A
//   state_t = exp(a_t) state_{t-1} + dt'_t x_t B_t^T      (reset where seq_idx changes)
//   y_t = state_t C_t + D x_t;  out_t = y_t * silu(z_t)
//
// Chunked form over chunks of kChunk tokens, with cs_t the cumulative sum of a within the chunk and
// S the state entering the chunk:
//   y_t   = exp(cs_t) [doc_t == doc(S)] C_t . S                                  (inter-chunk)
//         + sum_{s <= t, doc_s == doc_t} (C_t . B_s) exp(cs_t - cs_s) dt'_s x_s   (intra-chunk, quadratic)
//   S'    = exp(cs_end) [doc_end == doc(S)] S + sum_{s, doc_s == doc_end} exp(cs_end - cs_s) dt'_s x_s B_s^T
// The chunk size is the kernel's own choice (the result does not depend on it but for rounding); the
// op's chunk_size argument only matters to the other backends.
//
// Layout: grid (ceil(p / kRows), h, b), 256 threads. The block walks the sequence chunk by chunk and
// keeps its kRows x n slice of the state in registers: row r = tid / 16 belongs to a half-warp, whose 16
// lanes hold n / 16 entries each, so C_t . S[r] is a 16-lane shuffle reduction. Per chunk: stage B, C,
// dt', dt' x in shared memory; a 16-lane shuffle scan gives cs; the (kChunk x kChunk) masked, decayed
// C B^T matrix is one entry per thread; the outputs (kChunk x kRows) are one per thread, coalesced
// along p; the state update is kChunk rank-1 updates of the registers. Plain fp32 FMAs: this is the
// portable kernel, not a tensor-core one.
#include "common.cuh"
#include "selective_scan.h"

namespace h1r::cuda {
namespace {

constexpr int kChunk = 16, kRows = 16, kThreads = kChunk * kRows, kLanesPerRow = 16;
constexpr int kStatePerLane = kScanMaxDState / kLanesPerRow;
static_assert(kThreads == 256 && kRows * kLanesPerRow == kThreads, "thread layout");

template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(SelectiveScanFwdParams p) {
  __shared__ float Bs[kChunk][kScanMaxDState];
  __shared__ float Cs[kChunk][kScanMaxDState];
  __shared__ float xdt[kChunk][kRows];  // dt'_s x_s[p0 + r]
  __shared__ float L[kChunk][kChunk];   // masked, decayed C_t . B_s
  __shared__ float Y[kChunk][kRows];    // inter-chunk part of y
  __shared__ float dts[kChunk], as[kChunk], cs[kChunk];
  __shared__ int docs[kChunk];

  const int64_t b = blockIdx.z, h = blockIdx.y, p0 = int64_t(blockIdx.x) * kRows;
  const int64_t g = h / (p.nheads / p.ngroups), n = p.dstate;
  const int tid = threadIdx.x;
  const int row = tid / kLanesPerRow, sub = tid % kLanesPerRow;  // state layout
  const int ot = tid / kRows, orow = tid % kRows;                 // output layout (coalesced along p)
  const bool row_ok = p0 + row < p.dim;
  const float A = p.A[h];
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.seqlen : nullptr;
  const int64_t xstride_t = p.nheads * p.dim, bstride_t = p.ngroups * n;
  const T* x = static_cast<const T*>(p.x) + b * p.seqlen * xstride_t + h * p.dim + p0;
  const T* z = p.z ? static_cast<const T*>(p.z) + b * p.seqlen * xstride_t + h * p.dim + p0 : nullptr;
  T* out = static_cast<T*>(p.out) + b * p.seqlen * xstride_t + h * p.dim + p0;
  const T* Bg = static_cast<const T*>(p.B) + b * p.seqlen * bstride_t + g * n;
  const T* Cg = static_cast<const T*>(p.C) + b * p.seqlen * bstride_t + g * n;

  // The state slice: S[j] = state[p0 + row, sub + 16 j].
  float S[kStatePerLane];
  const int64_t state_off = ((b * p.nheads + h) * p.dim + p0 + row) * n;
#pragma unroll
  for (int j = 0; j < kStatePerLane; ++j) {
    const int64_t k = sub + kLanesPerRow * j;
    S[j] = (p.initial_states && row_ok && k < n) ? p.initial_states[state_off + k] : 0.0f;
  }
  int state_doc = seq ? seq[0] : 0;  // the initial state belongs to the first document

  for (int64_t t0 = 0; t0 < p.seqlen; t0 += kChunk) {
    // 1. dt' and the documents of the chunk; B and C staged in fp32. Past the end: no decay, no input.
    if (tid < kChunk) {
      const int64_t t = t0 + tid;
      float d = 0.0f;
      if (t < p.seqlen) {
        d = p.dt[(b * p.seqlen + t) * p.nheads + h] + (p.dt_bias ? p.dt_bias[h] : 0.0f);
        if (p.dt_softplus) d = softplus(d);
        if (p.dt_clamp) d = fminf(fmaxf(d, p.dt_min), p.dt_max);
      }
      dts[tid] = d;
      as[tid] = d * A;
      docs[tid] = seq ? seq[t < p.seqlen ? t : p.seqlen - 1] : 0;
    }
    for (int i = tid; i < kChunk * n; i += kThreads) {
      const int s = i / n;
      const int64_t k = i % n, t = t0 + s;
      Bs[s][k] = t < p.seqlen ? to_float(Bg[t * bstride_t + k]) : 0.0f;
      Cs[s][k] = t < p.seqlen ? to_float(Cg[t * bstride_t + k]) : 0.0f;
    }
    __syncthreads();

    // 2. dt' x for the block's rows; the cumulative decay cs by a 16-lane shuffle scan in warp 0.
    {
      const int64_t t = t0 + ot;
      xdt[ot][orow] = (t < p.seqlen && p0 + orow < p.dim) ? dts[ot] * to_float(x[t * xstride_t + orow]) : 0.0f;
    }
    if (tid < 32) {
      float v = tid < kChunk ? as[tid] : 0.0f;
      for (int o = 1; o < kChunk; o <<= 1) {
        const float u = __shfl_up_sync(kFullMask, v, o, kChunk);
        if ((tid % kChunk) >= o) v += u;
      }
      if (tid < kChunk) cs[tid] = v;
    }
    __syncthreads();

    // 3. L[t][s] = (C_t . B_s) exp(cs_t - cs_s) for s <= t in the same document; and the inter-chunk
    //    part Y[t][r] = exp(cs_t) [doc_t == state_doc] C_t . S[r] (half-warp reductions over n).
    {
      const int t = tid / kChunk, s = tid % kChunk;
      float v = 0.0f;
      if (s <= t && docs[s] == docs[t]) {
        for (int64_t k = 0; k < n; ++k) v += Cs[t][k] * Bs[s][k];
        v *= __expf(cs[t] - cs[s]);
      }
      L[t][s] = v;
    }
    for (int t = 0; t < kChunk; ++t) {
      float v = 0.0f;
#pragma unroll
      for (int j = 0; j < kStatePerLane; ++j) {
        const int64_t k = sub + kLanesPerRow * j;
        if (k < n) v += Cs[t][k] * S[j];
      }
      for (int o = kLanesPerRow / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o, kLanesPerRow);
      if (sub == 0) Y[t][row] = docs[t] == state_doc ? v * __expf(cs[t]) : 0.0f;
    }
    __syncthreads();

    // 4a. Outputs: y = Y + sum_{s <= t} L[t][s] dt'_s x_s, then D and the z gate.
    {
      const int64_t t = t0 + ot, r = p0 + orow;
      if (t < p.seqlen && r < p.dim) {
        float y = Y[ot][orow];
        for (int s = 0; s <= ot; ++s) y += L[ot][s] * xdt[s][orow];
        const float xv = to_float(x[t * xstride_t + orow]);
        if (p.D) y += p.D[h * p.dim + r] * xv;
        if (z) y *= silu(to_float(z[t * xstride_t + orow]));
        out[t * xstride_t + orow] = from_float<T>(y);
      }
    }
    // 4b. State to the end of the chunk.
    {
      const int last = kChunk - 1;
      const float carry = docs[last] == state_doc ? __expf(cs[last]) : 0.0f;
      float w[kChunk];
#pragma unroll
      for (int s = 0; s < kChunk; ++s) w[s] = docs[s] == docs[last] ? __expf(cs[last] - cs[s]) * xdt[s][row] : 0.0f;
#pragma unroll
      for (int j = 0; j < kStatePerLane; ++j) {
        const int64_t k = sub + kLanesPerRow * j;
        if (k >= n) continue;
        float v = carry * S[j];
#pragma unroll
        for (int s = 0; s < kChunk; ++s) v += w[s] * Bs[s][k];
        S[j] = v;
      }
      state_doc = docs[last];
    }
    __syncthreads();  // the next chunk overwrites the staged tiles
  }

  if (row_ok) {
#pragma unroll
    for (int j = 0; j < kStatePerLane; ++j) {
      const int64_t k = sub + kLanesPerRow * j;
      if (k < n) p.final_states[state_off + k] = S[j];
    }
  }
}

}  // namespace

const char* launch_selective_scan_fwd(const SelectiveScanFwdParams& p, void* stream) {
  if (p.dstate > kScanMaxDState) return "selective_scan_fwd: d_state above 256";
  const dim3 grid(unsigned(ceil_div(p.dim, kRows)), unsigned(p.nheads), unsigned(p.batch));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(selective_scan_fwd_kernel<T>, grid, dim3(kThreads), 0, static_cast<cudaStream_t>(stream), p);
  });
}

}  // namespace h1r::cuda
