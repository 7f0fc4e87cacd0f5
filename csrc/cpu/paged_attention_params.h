// Plain-data arguments of the paged-attention CPU kernels (shared by the glue and the per-ISA kernel
// files; standard library only, so the SIMD translation units stay free of torch headers).
#pragma once

#include <cstdint>

namespace h1r::cpu {

enum class CacheDtype : int { f32 = 0, bf16 = 1, f16 = 2 };

struct PagedAttentionParams {
  // q (total_q, hq, hd) of dtype q_dtype, token rows q_stride elements apart (each row contiguous: the
  // decoder passes row views of its projection output), and out (total_q, hq, hd) contiguous, of q's
  // dtype. For decode total_q = batch.
  const void* q;
  void* out;
  CacheDtype q_dtype;
  int64_t q_stride;
  // key_cache, value_cache (num_blocks, block_size, hk, hd) contiguous, of dtype cache_dtype.
  const void* key_cache;
  const void* value_cache;
  CacheDtype cache_dtype;
  const int32_t* block_tables;  // (batch, max_blocks)
  const int32_t* seq_lens;      // (batch,)
  const int32_t* cu_seqlens_q;  // (batch + 1,) for prefill; nullptr for decode (one query per sequence)
  int64_t batch, max_blocks, num_blocks, block_size, hq, hk, hd;
  float scale;
  // prefill only: run the bf16 tile path (q and caches bf16, hd % 32 == 0, hd <= kAmxMaxHeadDim, AMX usable;
  // set by the glue, read by the avx512 build)
  bool amx;
};

constexpr int64_t kAmxMaxHeadDim = 256;

}  // namespace h1r::cpu
