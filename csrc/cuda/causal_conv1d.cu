// Depthwise causal conv1d (the Mamba short convolution), forward and decode update.
//
//   pre[b, c, t] = bias[c] + sum_{k < w} weight[c, k] x[b, c, t - (w-1) + k];  out = silu?(pre)
//
// Taps before t = 0 read initial_states (or zero); with seq_idx a tap reads zero unless it lies in the
// same document as t (the steps before t = 0 belong to the first document). final_states are the last
// w-1 inputs (zero where they are not in the last document), the state a decode step continues from.
// Weights, bias and initial states come in fp32; x / out in T; accumulation in fp32.
#include "causal_conv1d.h"
#include "common.cuh"

#include <type_traits>

namespace h1r::cuda {

// x at time t of one (batch, channel) row; history before t = 0 from initial_states or zero.
template <typename T>
__device__ __forceinline__ float conv_input(const CausalConv1dFwdParams& p, const T* xrow, const float* init,
                                            int64_t t) {
  if (t >= 0) return t < p.seqlen ? to_float(xrow[t * p.x_stride_l]) : 0.0f;
  return init ? init[p.width - 1 + t] : 0.0f;
}
// Document id of time t (history steps belong to the first document); -1 past the end.
__device__ __forceinline__ int conv_doc(const int32_t* seq, int64_t seqlen, int64_t t) {
  return t < 0 ? seq[0] : (t < seqlen ? seq[t] : -1);
}

// The last w-1 inputs of a row (masked to the last document), written by one thread.
template <typename T>
__device__ void write_final_states(const CausalConv1dFwdParams& p, int64_t b, int64_t c, const T* xrow,
                                   const float* init, const int32_t* seq) {
  T* fin = static_cast<T*>(p.final_states) + (b * p.dim + c) * (p.width - 1);
  for (int64_t k = 0; k < p.width - 1; ++k) {
    const int64_t t = p.seqlen - (p.width - 1) + k;
    const bool keep = !seq || conv_doc(seq, p.seqlen, t) == seq[p.seqlen - 1];
    fin[k] = from_float<T>(keep ? conv_input(p, xrow, init, t) : 0.0f);
  }
}

// ---- forward, channel-first (time contiguous) --------------------------------------------------------
// grid (ceil(l / kTile), d, b), kThreads threads. A block stages a tile of kTile time steps of one
// channel plus the w-1 steps of history before it in shared memory (coalesced loads along time), then
// each thread computes kElems consecutive outputs from it: every input is read from global memory once.
// kBarrier exists only for the emulator test that shows a missing barrier is caught; always true here.
constexpr int kFirstThreads = 128, kFirstElems = 4, kFirstTile = kFirstThreads * kFirstElems;

template <typename T, int W, bool kBarrier = true>
__global__ void __launch_bounds__(kFirstThreads) causal_conv1d_fwd_channel_first_kernel(CausalConv1dFwdParams p) {
  __shared__ float xs[kFirstTile + W - 1];
  __shared__ int docs[kFirstTile + W - 1];
  const int64_t b = blockIdx.z, c = blockIdx.y, t0 = int64_t(blockIdx.x) * kFirstTile;
  const T* xrow = static_cast<const T*>(p.x) + b * p.x_stride_b + c * p.x_stride_d;
  const float* init = p.initial_states ? p.initial_states + (b * p.dim + c) * (W - 1) : nullptr;
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.seqlen : nullptr;

  for (int i = threadIdx.x; i < kFirstTile + W - 1; i += blockDim.x) {  // xs[i] is time t0 - (W-1) + i
    const int64_t t = t0 - (W - 1) + i;
    xs[i] = conv_input(p, xrow, init, t);
    if (seq) docs[i] = conv_doc(seq, p.seqlen, t);
  }
  if (kBarrier) __syncthreads();

  float w[W];
  for (int k = 0; k < W; ++k) w[k] = p.weight[c * W + k];
  const float bias = p.bias ? p.bias[c] : 0.0f;
  T* orow = static_cast<T*>(p.out) + b * p.out_stride_b + c * p.out_stride_d;
  for (int e = 0; e < kFirstElems; ++e) {
    const int i = threadIdx.x * kFirstElems + e;  // output time t0 + i reads xs[i .. i + W-1]
    if (t0 + i >= p.seqlen) break;
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k)
      if (!seq || docs[i + k] == docs[i + W - 1]) acc += w[k] * xs[i + k];
    orow[(t0 + i) * p.out_stride_l] = from_float<T>(p.silu ? silu(acc) : acc);
  }
  if (p.final_states && threadIdx.x == 0 && blockIdx.x == gridDim.x - 1) write_final_states(p, b, c, xrow, init, seq);
}

// ---- forward, channel-last (channels contiguous) -----------------------------------------------------
// grid (ceil(d / kLastThreads), ceil(l / kLastChunk), b). Threads run over channels, so each time step
// is one coalesced row access; a thread walks kLastChunk steps of its channel keeping the last w-1
// inputs (and their document ids) in registers: no shared memory, no barrier.
constexpr int kLastThreads = 128, kLastChunk = 64;

template <typename T, int W>
__global__ void __launch_bounds__(kLastThreads) causal_conv1d_fwd_channel_last_kernel(CausalConv1dFwdParams p) {
  const int64_t c = int64_t(blockIdx.x) * kLastThreads + threadIdx.x, b = blockIdx.z;
  if (c >= p.dim) return;
  const int64_t t0 = int64_t(blockIdx.y) * kLastChunk, t1 = t0 + kLastChunk < p.seqlen ? t0 + kLastChunk : p.seqlen;
  const T* xrow = static_cast<const T*>(p.x) + b * p.x_stride_b + c * p.x_stride_d;
  const float* init = p.initial_states ? p.initial_states + (b * p.dim + c) * (W - 1) : nullptr;
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * p.seqlen : nullptr;
  float w[W];
  for (int k = 0; k < W; ++k) w[k] = p.weight[c * W + k];
  const float bias = p.bias ? p.bias[c] : 0.0f;

  float win[W];  // win[k] = x at time t - (W-1) + k
  int doc[W];
  for (int k = 0; k < W - 1; ++k) {
    win[k + 1] = conv_input(p, xrow, init, t0 - (W - 1) + k);
    doc[k + 1] = seq ? conv_doc(seq, p.seqlen, t0 - (W - 1) + k) : 0;
  }
  T* orow = static_cast<T*>(p.out) + b * p.out_stride_b + c * p.out_stride_d;
  for (int64_t t = t0; t < t1; ++t) {
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
      win[k] = win[k + 1];
      doc[k] = doc[k + 1];
    }
    win[W - 1] = to_float(xrow[t * p.x_stride_l]);
    doc[W - 1] = seq ? seq[t] : 0;
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k)
      if (doc[k] == doc[W - 1]) acc += w[k] * win[k];
    orow[t * p.out_stride_l] = from_float<T>(p.silu ? silu(acc) : acc);
  }
  if (p.final_states && blockIdx.y == gridDim.y - 1) write_final_states(p, b, c, xrow, init, seq);
}

// ---- decode update -----------------------------------------------------------------------------------
// grid (ceil(d / kUpdateThreads), b), one thread per (batch, channel): it reads the last w-1 state
// steps into a register window, produces the l new outputs, then shifts the state row by l in place
// (state[j] = (state ++ x)[j + l], reading ahead of what it writes).
constexpr int kUpdateThreads = 128;

template <typename T, typename TS>
__global__ void __launch_bounds__(kUpdateThreads) causal_conv1d_update_kernel(CausalConv1dUpdateParams p) {
  const int64_t c = int64_t(blockIdx.x) * kUpdateThreads + threadIdx.x, b = blockIdx.y;
  if (c >= p.dim) return;
  const T* x = static_cast<const T*>(p.x) + (b * p.dim + c) * p.seqlen;
  T* out = static_cast<T*>(p.out) + (b * p.dim + c) * p.seqlen;
  const int64_t row = p.conv_state_indices ? p.conv_state_indices[b] : b;
  if (row < 0 || row >= p.state_rows) {  // padding row
    for (int64_t t = 0; t < p.seqlen; ++t) out[t] = from_float<T>(0.0f);
    return;
  }
  TS* state = static_cast<TS*>(p.conv_state) + (row * p.dim + c) * p.state_len;
  const float* w = p.weight + c * p.width;
  const float bias = p.bias ? p.bias[c] : 0.0f;
  const int64_t W = p.width;

  float win[4];  // the last W-1 inputs before the current step
  for (int64_t k = 0; k < W - 1; ++k) win[k] = to_float(state[p.state_len - (W - 1) + k]);
  for (int64_t t = 0; t < p.seqlen; ++t) {
    const float xt = to_float(x[t]);
    float acc = bias + w[W - 1] * xt;
    for (int64_t k = 0; k < W - 1; ++k) acc += w[k] * win[k];
    for (int64_t k = 0; k + 1 < W - 1; ++k) win[k] = win[k + 1];
    if (W > 1) win[W - 2] = xt;
    out[t] = from_float<T>(p.silu ? silu(acc) : acc);
  }
  for (int64_t j = 0; j < p.state_len; ++j) {
    const int64_t src = j + p.seqlen;  // index into (state ++ x)
    state[j] = from_float<TS>(src < p.state_len ? to_float(state[src]) : to_float(x[src - p.state_len]));
  }
}

const char* launch_causal_conv1d_fwd(const CausalConv1dFwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    auto go = [&](auto width) -> const char* {
      constexpr int W = decltype(width)::value;
      if (p.channel_last)
        return launch(causal_conv1d_fwd_channel_last_kernel<T, W>,
                      dim3(unsigned(ceil_div(p.dim, kLastThreads)), unsigned(ceil_div(p.seqlen, kLastChunk)),
                           unsigned(p.batch)),
                      dim3(kLastThreads), 0, s, p);
      return launch(causal_conv1d_fwd_channel_first_kernel<T, W>,
                    dim3(unsigned(ceil_div(p.seqlen, kFirstTile)), unsigned(p.dim), unsigned(p.batch)),
                    dim3(kFirstThreads), 0, s, p);
    };
    switch (p.width) {
      case 2: return go(std::integral_constant<int, 2>{});
      case 3: return go(std::integral_constant<int, 3>{});
      case 4: return go(std::integral_constant<int, 4>{});
    }
    return "causal_conv1d: width must be 2, 3 or 4";
  });
}

const char* launch_causal_conv1d_update(const CausalConv1dUpdateParams& p, void* stream) {
  if (p.width < 2 || p.width > 4) return "causal_conv1d_update: width must be 2, 3 or 4";
  const dim3 grid(unsigned(ceil_div(p.dim, kUpdateThreads)), unsigned(p.batch));
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_dtype(p.state_dtype, [&](auto ts) {
      using TS = decltype(ts);
      return launch(causal_conv1d_update_kernel<T, TS>, grid, dim3(kUpdateThreads), 0,
                    static_cast<cudaStream_t>(stream), p);
    });
  });
}

}  // namespace h1r::cuda
