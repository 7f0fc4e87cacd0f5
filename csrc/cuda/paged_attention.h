// Launchers of the paged-attention kernels (csrc/cuda/paged_attention.cu); plain C++ for the glue.
#pragma once

#include "launch.h"

namespace h1r::cuda {

struct ReshapeAndCacheParams {
  const void* key;    // (tokens, hk, hd), rows key_stride apart, inner dims contiguous
  const void* value;  // (tokens, hk, hd), rows value_stride apart
  void* key_cache;    // (num_blocks, block_size, hk, hd) contiguous
  void* value_cache;
  DType dtype;  // of the caches (key / value are converted to it by the glue)
  const int64_t* slot_mapping;  // (tokens,); slot = block * block_size + offset, negative = skip
  int64_t tokens, row_elems /* hk * hd */, key_stride, value_stride, num_slots;
};

// Decode attention splits each context into partitions of kPartitionTokens keys (vLLM v2 style): one
// block per (partition, query head, sequence) computes a partial softmax-weighted sum, and a second
// kernel merges the partitions with their max logits and exp sums. A single partition writes out
// directly.
constexpr int kPartitionTokens = 512;
constexpr int kMaxHeadDim = 256;

// What decode and prefill share: the queries, the paged caches and their tables.
struct PagedAttentionArgs {
  const float* q;  // (tokens, hq, hd) fp32: b tokens for decode, total_q for prefill
  float* out;      // (tokens, hq, hd) fp32
  const void* key_cache;    // (num_blocks, block_size, hk, hd)
  const void* value_cache;  // (num_blocks, block_size, hk, hd)
  DType cache_dtype;
  const int32_t* block_tables;  // (b, max_blocks)
  const int32_t* seq_lens;      // (b,)
  int64_t batch, max_blocks, block_size, hq, hk, hd;
  float scale;
};

struct PagedAttentionDecodeParams : PagedAttentionArgs {
  int64_t num_partitions;  // ceil(max_blocks * block_size / kPartitionTokens): no host sync on seq_lens
  float* partial_out;      // (b, hq, num_partitions, hd) when num_partitions > 1
  float* max_logits;       // (b, hq, num_partitions)
  float* exp_sums;         // (b, hq, num_partitions)
};

struct PagedAttentionPrefillParams : PagedAttentionArgs {
  const int32_t* cu_seqlens_q;  // (b + 1,)
  int64_t total_q;
};

const char* launch_reshape_and_cache(const ReshapeAndCacheParams& p, void* stream);
const char* launch_paged_attention_decode(const PagedAttentionDecodeParams& p, void* stream);
const char* launch_paged_attention_prefill(const PagedAttentionPrefillParams& p, void* stream);

}  // namespace h1r::cuda
