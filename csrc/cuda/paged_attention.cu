// Paged attention for decode: KV pages written by reshape_and_cache, one query per sequence attending
// to its whole context through its block table, with grouped-query heads (query head h reads kv head
// h / (hq / hk)). Caches are (num_blocks, block_size, hk, hd): a token's head row is hd contiguous
// elements. Scores, softmax and the weighted sum are fp32; the caches are T.
#include "common.cuh"
#include "paged_attention.h"

namespace h1r::cuda {
namespace {

// ---- reshape_and_cache ---------------------------------------------------------------------------------
// grid (tokens), threads over the token's hk * hd elements: one coalesced row copy per token and cache.
constexpr int kCacheThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kCacheThreads) reshape_and_cache_kernel(ReshapeAndCacheParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= p.num_slots) return;  // padding token
  const T* k = static_cast<const T*>(p.key) + token * p.key_stride;
  const T* v = static_cast<const T*>(p.value) + token * p.value_stride;
  T* kc = static_cast<T*>(p.key_cache) + slot * p.row_elems;
  T* vc = static_cast<T*>(p.value_cache) + slot * p.row_elems;
  for (int64_t i = threadIdx.x; i < p.row_elems; i += blockDim.x) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

// The keys sequence b attends to: seq_lens[b], clamped to its block table (never read past the table).
__device__ __forceinline__ int64_t context_len(const PagedAttentionDecodeParams& p, int64_t b) {
  const int64_t n = p.seq_lens[b], cap = p.max_blocks * p.block_size;
  return n < 0 ? 0 : (n < cap ? n : cap);
}

// ---- decode, one partition ---------------------------------------------------------------------------
// grid (num_partitions, hq, b), kWarps warps. Three phases over the partition's tokens:
//  1. logits: warp w takes tokens w, w + kWarps, ...; its lanes split the head dim (a coalesced read of
//     the key row) and a warp reduction gives q.k, stored in shared memory;
//  2. softmax: block max and sum of exp over the stored logits;
//  3. weighted sum: again a token per warp, lanes over the head dim accumulating p * v in registers
//     (kMaxHeadDim / 32 per lane); the warps' partial sums are added through shared memory.
constexpr int kWarps = 4, kThreads = kWarps * 32, kDimsPerLane = kMaxHeadDim / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) paged_attention_decode_kernel(PagedAttentionDecodeParams p) {
  __shared__ float q_s[kMaxHeadDim];
  __shared__ float logits[kPartitionTokens];
  __shared__ float partial[kWarps][kMaxHeadDim];
  __shared__ float scratch[kWarps];
  const int64_t part = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t kvh = h / (p.hq / p.hk);
  const int64_t bh = b * p.hq + h;
  const int64_t seq_len = context_len(p, b);
  const int64_t start = part * kPartitionTokens;
  const int64_t end = start + kPartitionTokens < seq_len ? start + kPartitionTokens : seq_len;
  if (start >= end) {  // partition past the context (uniform over the block)
    if (p.num_partitions == 1)
      for (int64_t i = threadIdx.x; i < p.hd; i += blockDim.x) p.out[bh * p.hd + i] = 0.0f;
    return;  // the merge kernel skips partitions past the context
  }
  const int32_t* table = p.block_tables + b * p.max_blocks;
  const int64_t head_stride = p.hk * p.hd, page_stride = p.block_size * head_stride;
  auto row = [&](const void* cache, int64_t t) {  // head kvh of token t
    return static_cast<const T*>(cache) + table[t / p.block_size] * page_stride + (t % p.block_size) * head_stride +
           kvh * p.hd;
  };

  for (int64_t i = threadIdx.x; i < p.hd; i += blockDim.x) q_s[i] = p.q[bh * p.hd + i] * p.scale;
  __syncthreads();

  // 1. logits
  for (int64_t t = start + warp; t < end; t += kWarps) {  // warp-uniform
    const T* k = row(p.key_cache, t);
    float dot = 0.0f;
    for (int64_t i = lane; i < p.hd; i += 32) dot += q_s[i] * to_float(k[i]);
    dot = warp_sum(dot);
    if (lane == 0) logits[t - start] = dot;
  }
  __syncthreads();

  // 2. softmax statistics (block_reduce's barriers also publish the exp'd logits)
  const int64_t n = end - start;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, logits[i]);
  m = block_reduce<true>(m, scratch);
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = __expf(logits[i] - m);
    logits[i] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, scratch);

  // 3. weighted sum of the values
  float acc[kDimsPerLane];
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) acc[j] = 0.0f;
  for (int64_t t = start + warp; t < end; t += kWarps) {
    const T* v = row(p.value_cache, t);
    const float w = logits[t - start];
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < p.hd) acc[j] += w * to_float(v[i]);
    }
  }
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < p.hd) partial[warp][i] = acc[j];
  }
  __syncthreads();
  const float inv_sum = 1.0f / sum;
  for (int64_t i = threadIdx.x; i < p.hd; i += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += partial[w][i];
    if (p.num_partitions == 1)
      p.out[bh * p.hd + i] = o * inv_sum;
    else
      p.partial_out[(bh * p.num_partitions + part) * p.hd + i] = o * inv_sum;
  }
  if (p.num_partitions > 1 && threadIdx.x == 0) {
    p.max_logits[bh * p.num_partitions + part] = m;
    p.exp_sums[bh * p.num_partitions + part] = sum;
  }
}

// ---- decode, merge of the partitions -------------------------------------------------------------------
// grid (hq, b), threads over the head dim. With M the largest partition max, partition i weighs
// exp_sums[i] * exp(max_logits[i] - M); out = sum_i weight_i * partial_i / sum_i weight_i (each
// partial already normalized by its own exp sum). Every thread recomputes the few weights itself.
__global__ void __launch_bounds__(kThreads) paged_attention_merge_kernel(PagedAttentionDecodeParams p) {
  const int64_t h = blockIdx.x, b = blockIdx.y, bh = b * p.hq + h;
  const int64_t parts = ceil_div(context_len(p, b), kPartitionTokens);  // the partitions that ran
  const float* ml = p.max_logits + bh * p.num_partitions;
  const float* es = p.exp_sums + bh * p.num_partitions;
  float M = -INFINITY;
  for (int64_t i = 0; i < parts; ++i) M = fmaxf(M, ml[i]);
  float total = 0.0f;
  for (int64_t i = 0; i < parts; ++i) total += es[i] * __expf(ml[i] - M);
  const float inv_total = parts > 0 ? 1.0f / total : 0.0f;
  for (int64_t d = threadIdx.x; d < p.hd; d += blockDim.x) {
    float o = 0.0f;
    for (int64_t i = 0; i < parts; ++i)
      o += es[i] * __expf(ml[i] - M) * p.partial_out[(bh * p.num_partitions + i) * p.hd + d];
    p.out[bh * p.hd + d] = o * inv_total;
  }
}

// ---- prefill / chunked prefill -------------------------------------------------------------------------
// grid (ceil(total_q / kWarps), hq), one warp per (query row, head): the row finds its sequence in
// cu_seqlens_q and attends causally to keys 0 .. its position with an online softmax, 32 keys at a
// time: lane k scores key k (a dot over the head dim), the warp takes the max and sum of the 32 with
// shuffles and parks the 32 weights in shared memory, then the lanes switch to the head dim and add
// the 32 weighted value rows (coalesced reads). Warps are independent: no block barrier.
template <typename T>
__global__ void __launch_bounds__(kThreads) paged_attention_prefill_kernel(PagedAttentionPrefillParams p) {
  __shared__ float q_s[kWarps][kMaxHeadDim];
  __shared__ float w_s[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp, h = blockIdx.y;
  if (row >= p.total_q) return;  // the whole warp
  // The sequence of this row: the last i with cu_seqlens_q[i] <= row.
  int64_t lo = 0, hi = p.batch - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.cu_seqlens_q[mid] <= row) lo = mid; else hi = mid - 1;
  }
  const int64_t seq = lo, q_len = p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq];
  const int64_t cap = p.max_blocks * p.block_size, seq_len = p.seq_lens[seq] < cap ? p.seq_lens[seq] : cap;
  const int64_t n_keys = seq_len - q_len + (row - p.cu_seqlens_q[seq]) + 1;  // keys 0 .. position
  const int64_t kvh = h / (p.hq / p.hk);
  const int32_t* table = p.block_tables + seq * p.max_blocks;
  const int64_t head_stride = p.hk * p.hd, page_stride = p.block_size * head_stride;
  auto key_row = [&](const void* cache, int64_t t) {
    return static_cast<const T*>(cache) + table[t / p.block_size] * page_stride + (t % p.block_size) * head_stride +
           kvh * p.hd;
  };
  float* q = q_s[warp];
  for (int64_t i = lane; i < p.hd; i += 32) q[i] = p.q[(row * p.hq + h) * p.hd + i] * p.scale;
  __syncwarp();

  float m = -INFINITY, sum = 0.0f, acc[kDimsPerLane];
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) acc[j] = 0.0f;
  for (int64_t k0 = 0; k0 < n_keys; k0 += 32) {
    const int64_t t = k0 + lane;
    float s = -INFINITY;
    if (t < n_keys) {
      const T* k = key_row(p.key_cache, t);
      s = 0.0f;
      for (int64_t i = 0; i < p.hd; ++i) s += q[i] * to_float(k[i]);
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float w = t < n_keys ? __expf(s - m_new) : 0.0f;
    const float alpha = __expf(m - m_new);  // 0 on the first block (m = -inf)
    sum = sum * alpha + warp_sum(w);
    m = m_new;
    w_s[warp][lane] = w;
    __syncwarp();
    const int64_t n = n_keys - k0 < 32 ? n_keys - k0 : 32;
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) acc[j] *= alpha;
    for (int64_t kk = 0; kk < n; ++kk) {
      const T* v = key_row(p.value_cache, k0 + kk);
      const float wk = w_s[warp][kk];
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j) {
        const int64_t i = lane + 32 * j;
        if (i < p.hd) acc[j] += wk * to_float(v[i]);
      }
    }
    __syncwarp();  // w_s is rewritten by the next block of keys
  }
  const float inv = n_keys > 0 ? 1.0f / sum : 0.0f;
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < p.hd) p.out[(row * p.hq + h) * p.hd + i] = acc[j] * inv;
  }
}

}  // namespace

const char* launch_reshape_and_cache(const ReshapeAndCacheParams& p, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(reshape_and_cache_kernel<T>, dim3(unsigned(p.tokens)), dim3(kCacheThreads), 0,
                  static_cast<cudaStream_t>(stream), p);
  });
}

const char* launch_paged_attention_decode(const PagedAttentionDecodeParams& p, void* stream) {
  if (p.hd > kMaxHeadDim) return "paged_attention_decode: head_dim above 256";
  auto s = static_cast<cudaStream_t>(stream);
  const char* err = dispatch_dtype(p.cache_dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(paged_attention_decode_kernel<T>,
                  dim3(unsigned(p.num_partitions), unsigned(p.hq), unsigned(p.batch)), dim3(kThreads), 0, s, p);
  });
  if (err || p.num_partitions == 1) return err;
  return launch(paged_attention_merge_kernel, dim3(unsigned(p.hq), unsigned(p.batch)), dim3(kThreads), 0, s, p);
}

}  // namespace h1r::cuda

namespace h1r::cuda {

const char* launch_paged_attention_prefill(const PagedAttentionPrefillParams& p, void* stream) {
  if (p.hd > kMaxHeadDim) return "paged_attention_prefill: head_dim above 256";
  return dispatch_dtype(p.cache_dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(paged_attention_prefill_kernel<T>, dim3(unsigned(ceil_div(p.total_q, kWarps)), unsigned(p.hq)),
                  dim3(kThreads), 0, static_cast<cudaStream_t>(stream), p);
  });
}

}  // namespace h1r::cuda
