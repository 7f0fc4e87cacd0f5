// Depthwise causal conv1d (the Mamba short convolution): forward, backward and decode update.
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
#include <utility>

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

// ---- backward ----------------------------------------------------------------------------------------
// With H = w - 1, g[t] = dout[t] act'(pre[t]) and M_k[t] = [tap k of output t lies in t's document]:
//   dX[s]      = sum_k weight[k] g[s + H - k] M_k[s + H - k]     (s = -H .. l-1; s < 0 is dinitial_states)
//                + dfinal_states[s - (l - H)] on the last H steps (where they are in the last document)
//   dweight[k] = sum_t g[t] X[t - H + k] M_k[t],   dbias = sum_t g[t]
// A block (or thread) owning outputs [t0, t1) recomputes g on [t0, t1 + H) (pre from x, an H-step halo on
// both sides), so dX of its own steps needs nothing from its neighbours; its dweight / dbias sums go to
// its own slot of p.partials, added up by causal_conv1d_bwd_reduce_kernel.

// The document test of tap k (distance H - k) between the steps at xs-indices i and j.
__device__ __forceinline__ bool same_doc(const int* docs, int i, int j) { return docs[i] == docs[j]; }

// dX at time s (history step if s < 0) plus the final-state gradient, stored to dx or dinitial_states.
template <typename T>
__device__ __forceinline__ void store_dX(const CausalConv1dBwdParams& p, int64_t b, int64_t c, int64_t s, float acc,
                                         bool final_kept) {
  const int64_t H = p.width - 1;
  if (p.dfinal_states && s >= p.seqlen - H && final_kept)
    acc += p.dfinal_states[(b * p.dim + c) * H + s - (p.seqlen - H)];
  if (s >= 0) {
    static_cast<T*>(p.dx)[b * p.dx_stride_b + c * p.dx_stride_d + s * p.dx_stride_l] = from_float<T>(acc);
  } else if (p.dinitial_states) {
    p.dinitial_states[(b * p.dim + c) * H + H + s] = acc;
  }
}

// Channel-first: grid (ceil(l / kFirstTile), d, b), kFirstThreads threads. The block stages x on
// [t0 - H, t0 + kFirstTile + H) in shared memory (coalesced along time), computes g on
// [t0, t0 + kFirstTile + H) into shared memory, then dX of its kFirstTile steps (and of the H history
// steps in the first tile). Its dweight / dbias sums are block reductions.
template <typename T, int W>
__global__ void __launch_bounds__(kFirstThreads) causal_conv1d_bwd_channel_first_kernel(CausalConv1dBwdParams p) {
  constexpr int H = W - 1;
  __shared__ float xs[kFirstTile + 2 * H];  // xs[i]: x at time t0 - H + i
  __shared__ int docs[kFirstTile + 2 * H];
  __shared__ float gs[kFirstTile + H];      // gs[i]: g at time t0 + i (zero past the end)
  __shared__ float scratch[kFirstThreads / 32];
  const int64_t b = blockIdx.z, c = blockIdx.y, t0 = int64_t(blockIdx.x) * kFirstTile, l = p.seqlen;
  const T* xrow = static_cast<const T*>(p.x) + b * p.x_stride_b + c * p.x_stride_d;
  const T* drow = static_cast<const T*>(p.dout) + b * p.dout_stride_b + c * p.dout_stride_d;
  const float* init = p.initial_states ? p.initial_states + (b * p.dim + c) * H : nullptr;
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * l : nullptr;
  for (int i = threadIdx.x; i < kFirstTile + 2 * H; i += blockDim.x) {
    const int64_t t = t0 - H + i;
    xs[i] = t < 0 ? (init ? init[H + t] : 0.0f) : (t < l ? to_float(xrow[t * p.x_stride_l]) : 0.0f);
    docs[i] = seq ? conv_doc(seq, l, t) : 0;
  }
  __syncthreads();

  float w[W];
  for (int k = 0; k < W; ++k) w[k] = p.weight[c * W + k];
  const float bias = p.bias ? p.bias[c] : 0.0f;
  float dw[W + 1] = {};  // taps, then bias
  for (int i = threadIdx.x; i < kFirstTile + H; i += blockDim.x) {  // output time t0 + i reads xs[i .. i + H]
    const int64_t t = t0 + i;
    float g = 0.0f;
    if (t < l) {
      float taps[W], pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        taps[k] = (!seq || same_doc(docs, i + k, i + H)) ? xs[i + k] : 0.0f;
        pre += w[k] * taps[k];
      }
      g = to_float(drow[t * p.dout_stride_l]);
      if (p.silu) g *= silu_grad(pre);
      if (i < kFirstTile) {
#pragma unroll
        for (int k = 0; k < W; ++k) dw[k] += g * taps[k];
        dw[W] += g;
      }
    }
    gs[i] = g;
  }
  __syncthreads();

  // dX[s], s = t0 + i: tap k of output s + H - k (gs index i + H - k, xs index i + 2H - k) reads s (xs index
  // i + H). The first tile also does the history steps s = -H .. -1.
  const int64_t last_doc = seq ? seq[l - 1] : 0;
  const int lo = blockIdx.x == 0 ? -H : 0;
  for (int i = lo + int(threadIdx.x); i < kFirstTile; i += blockDim.x) {
    const int64_t s = t0 + i;
    if (s >= l) break;
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const int gi = i + H - k;
      if (gi >= 0 && (!seq || same_doc(docs, i + H, i + 2 * H - k))) acc += w[k] * gs[gi];
    }
    store_dX<T>(p, b, c, s, acc, !seq || docs[i + H] == last_doc);
  }

  float* slot = p.partials + (b * gridDim.x + blockIdx.x) * (W + 1) * p.dim + c;
  for (int k = 0; k <= W; ++k) {
    const float v = block_reduce<false>(dw[k], scratch);
    if (threadIdx.x == 0) slot[k * p.dim] = v;
  }
}

// Channel-last: grid (ceil(d / kLastThreads), ceil(l / kLastChunk), b); a thread walks time t over
// [t0, t1 + H) for its channel with register windows of the last W inputs, documents and g values: at
// step t it computes g[t] (dweight / dbias for t < t1), then dX at s = t - H, whose taps read g[s .. t].
// The first chunk starts its dX at s = -H (the history). No shared memory, no barrier.
template <typename T, int W>
__global__ void __launch_bounds__(kLastThreads) causal_conv1d_bwd_channel_last_kernel(CausalConv1dBwdParams p) {
  constexpr int H = W - 1;
  const int64_t c = int64_t(blockIdx.x) * kLastThreads + threadIdx.x, b = blockIdx.z, l = p.seqlen;
  if (c >= p.dim) return;
  const int64_t t0 = int64_t(blockIdx.y) * kLastChunk, t1 = t0 + kLastChunk < l ? t0 + kLastChunk : l;
  const T* xrow = static_cast<const T*>(p.x) + b * p.x_stride_b + c * p.x_stride_d;
  const T* drow = static_cast<const T*>(p.dout) + b * p.dout_stride_b + c * p.dout_stride_d;
  const float* init = p.initial_states ? p.initial_states + (b * p.dim + c) * H : nullptr;
  const int32_t* seq = p.seq_idx ? p.seq_idx + b * l : nullptr;
  const int64_t last_doc = seq ? seq[l - 1] : 0;
  float w[W];
  for (int k = 0; k < W; ++k) w[k] = p.weight[c * W + k];
  const float bias = p.bias ? p.bias[c] : 0.0f;

  float win[W], gw[W] = {}, dw[W + 1] = {};  // x, g at times t - H + k
  int doc[W];
  for (int k = 0; k < H; ++k) {
    const int64_t t = t0 - H + k;
    win[k + 1] = t < 0 ? (init ? init[H + t] : 0.0f) : to_float(xrow[t * p.x_stride_l]);
    doc[k + 1] = seq ? conv_doc(seq, l, t) : 0;
  }
  for (int64_t t = t0; t < t1 + H; ++t) {
#pragma unroll
    for (int k = 0; k < H; ++k) {
      win[k] = win[k + 1];
      doc[k] = doc[k + 1];
      gw[k] = gw[k + 1];
    }
    win[H] = t < l ? to_float(xrow[t * p.x_stride_l]) : 0.0f;
    doc[H] = seq ? conv_doc(seq, l, t) : 0;
    float g = 0.0f;
    if (t < l) {
      float taps[W], pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        taps[k] = doc[k] == doc[H] ? win[k] : 0.0f;
        pre += w[k] * taps[k];
      }
      g = to_float(drow[t * p.dout_stride_l]);
      if (p.silu) g *= silu_grad(pre);
      if (t < t1) {
#pragma unroll
        for (int k = 0; k < W; ++k) dw[k] += g * taps[k];
        dw[W] += g;
      }
    }
    gw[H] = g;
    const int64_t s = t - H;  // tap k of output t - k (g gw[H - k], document doc[H - k]) reads s (doc[0])
    if ((s < t0 && t0 > 0) || s >= l) continue;
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < W; ++k)
      if (doc[0] == doc[H - k]) acc += w[k] * gw[H - k];
    store_dX<T>(p, b, c, s, acc, doc[0] == last_doc);
  }
  float* slot = p.partials + (b * gridDim.y + blockIdx.y) * (W + 1) * p.dim + c;
  for (int k = 0; k <= W; ++k) slot[k * p.dim] = dw[k];
}

// dweight[c, k] / dbias[c] = sum over the slots, in slot order. One thread per (k, c), coalesced along c.
__global__ void __launch_bounds__(kUpdateThreads) causal_conv1d_bwd_reduce_kernel(CausalConv1dBwdParams p,
                                                                                  int64_t slots) {
  const int64_t W = p.width, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= (W + 1) * p.dim) return;
  const int64_t k = i / p.dim, c = i % p.dim;
  float acc = 0.0f;
  for (int64_t s = 0; s < slots; ++s) acc += p.partials[s * (W + 1) * p.dim + i];
  if (k < W) p.dweight[c * W + k] = acc;
  else if (p.dbias) p.dbias[c] = acc;
}

// Calls kernels(T{}, std::integral_constant<int, W>{}) for the element type and width of p, which returns
// the (channel-last, channel-first) kernel pair, and launches the one of p's layout over its grid.
template <typename Params, typename Kernels>
const char* launch_conv(const Params& p, void* stream, Kernels kernels) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> const char* {
    auto go = [&](auto width) -> const char* {
      const auto [last, first] = kernels(tag, width);
      if (p.channel_last)
        return launch(last,
                      dim3(unsigned(ceil_div(p.dim, kLastThreads)), unsigned(ceil_div(p.seqlen, kLastChunk)),
                           unsigned(p.batch)),
                      dim3(kLastThreads), 0, s, p);
      return launch(first, dim3(unsigned(ceil_div(p.seqlen, kFirstTile)), unsigned(p.dim), unsigned(p.batch)),
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

const char* launch_causal_conv1d_fwd(const CausalConv1dFwdParams& p, void* stream) {
  return launch_conv(p, stream, [](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int W = decltype(width)::value;
    return std::pair{&causal_conv1d_fwd_channel_last_kernel<T, W>, &causal_conv1d_fwd_channel_first_kernel<T, W>};
  });
}

int64_t causal_conv1d_bwd_partials(const CausalConv1dBwdParams& p) {
  return p.batch * (p.channel_last ? ceil_div(p.seqlen, kLastChunk) : ceil_div(p.seqlen, kFirstTile));
}

const char* launch_causal_conv1d_bwd(const CausalConv1dBwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const char* err = launch_conv(p, stream, [](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int W = decltype(width)::value;
    return std::pair{&causal_conv1d_bwd_channel_last_kernel<T, W>, &causal_conv1d_bwd_channel_first_kernel<T, W>};
  });
  if (err) return err;
  return launch(causal_conv1d_bwd_reduce_kernel, dim3(unsigned(ceil_div((p.width + 1) * p.dim, kUpdateThreads))),
                dim3(kUpdateThreads), 0, s, p, causal_conv1d_bwd_partials(p));
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
