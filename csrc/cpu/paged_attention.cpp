// Torch-facing glue of the paged-attention CPU kernels: argument checks (including the page tables'
// values, so that a direct torch.ops.h1r.* call can never read outside the cache), allocation and dispatch
// to the ISA kernels in paged_attention_kernels.cpp. The kernels read q in its own dtype and layout (rows
// of any token stride, widened to fp32 per tile) and write the output in q's dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/amx.h"
#include "cpu/isa.h"
#include "cpu/paged_attention_params.h"

H1R_DECLARE_CPU_KERNEL(void, paged_attention_decode_kernel, const h1r::cpu::PagedAttentionParams&);
H1R_DECLARE_CPU_KERNEL(void, paged_attention_prefill_kernel, const h1r::cpu::PagedAttentionParams&);
H1R_DECLARE_CPU_KERNEL(void, reshape_and_cache_kernel, const void*, const void*, void*, void*, const int64_t*,
                       int64_t, int64_t, int64_t, int64_t);

namespace h1r {
namespace {

using cpu::CacheDtype;
using cpu::PagedAttentionParams;

CacheDtype cache_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return CacheDtype::f32;
    case at::kBFloat16: return CacheDtype::bf16;
    default: return CacheDtype::f16;
  }
}

void check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK_VALUE(key_cache.dim() == 4, "argument 'key_cache': expected 4 dimensions (num_blocks, block_size, ",
                    "num_kv_heads, head_dim), got shape ", shape_str(key_cache.sizes()));
  check_float(key_cache, "key_cache");
  check_contiguous(key_cache, "key_cache");
  check_shape(value_cache, "value_cache", {key_cache.size(0), key_cache.size(1), key_cache.size(2), key_cache.size(3)});
  check_dtype(value_cache, "value_cache", key_cache.scalar_type());
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
}

// Shapes, dtypes and the values of the page tables: every used entry (the first ceil(seq_len / block_size)
// of a row) must name a block of the cache, and seq_len must fit in the row.
PagedAttentionParams attention_params(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                      const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3, "argument 'q': expected 3 dimensions (tokens, num_heads, head_dim), got shape ",
                    shape_str(q.sizes()));
  check_float(q, "q");
  check_caches(key_cache, value_cache);
  check_same_device(key_cache, "key_cache", q, "q");
  const int64_t hq = q.size(1), hd = q.size(2), hk = key_cache.size(2), bs = key_cache.size(1);
  TORCH_CHECK_VALUE(key_cache.size(3) == hd, "argument 'key_cache': expected head_dim ", hd, " (that of q), got ",
                    key_cache.size(3));
  TORCH_CHECK_VALUE(hk > 0 && hq % hk == 0, "argument 'q': num_heads ", hq,
                    " must be a multiple of num_kv_heads ", hk, " (key_cache.size(2))");
  TORCH_CHECK_VALUE(bs > 0 && hd > 0, "argument 'key_cache': block_size and head_dim must be positive, got shape ",
                    shape_str(key_cache.sizes()));
  TORCH_CHECK_VALUE(block_tables.dim() == 2, "argument 'block_tables': expected 2 dimensions (batch, max_blocks), ",
                    "got shape ", shape_str(block_tables.sizes()));
  const int64_t B = block_tables.size(0), max_blocks = block_tables.size(1), nb = key_cache.size(0);
  check_dtype(block_tables, "block_tables", at::kInt);
  check_contiguous(block_tables, "block_tables");
  check_shape(seq_lens, "seq_lens", {B});
  check_dtype(seq_lens, "seq_lens", at::kInt);
  check_contiguous(seq_lens, "seq_lens");
  check_same_device(block_tables, "block_tables", q, "q");
  check_same_device(seq_lens, "seq_lens", q, "q");
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(sl[i] >= 0 && sl[i] <= max_blocks * bs, "argument 'seq_lens': seq_lens[", i, "] = ", sl[i],
                      " is outside [0, max_blocks * block_size = ", max_blocks * bs, "]");
    for (int64_t j = 0; j < (sl[i] + bs - 1) / bs; ++j)
      TORCH_CHECK_VALUE(bt[i * max_blocks + j] >= 0 && bt[i * max_blocks + j] < nb, "argument 'block_tables': ",
                        "block_tables[", i, ", ", j, "] = ", bt[i * max_blocks + j], " is not a block of the cache ",
                        "(num_blocks = ", nb, ")");
  }
  PagedAttentionParams p{};
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.cache_dtype = cache_dtype(key_cache);
  p.block_tables = bt;
  p.seq_lens = sl;
  p.batch = B, p.max_blocks = max_blocks, p.num_blocks = nb, p.block_size = bs;
  p.hq = hq, p.hk = hk, p.hd = hd;
  p.scale = static_cast<float>(scale);
  return p;
}

// q as the kernels read it: in place when each token's (num_heads, head_dim) row is contiguous (the
// decoder's row views of its projection output: any token stride), else a contiguous copy; its dtype is
// the output's. Sets p.q, p.q_dtype, p.q_stride; returns the tensor that owns the data.
at::Tensor query_rows(const at::Tensor& q, PagedAttentionParams& p) {
  const bool rows = (q.size(2) == 1 || q.stride(2) == 1) && (q.size(1) == 1 || q.stride(1) == q.size(2));
  at::Tensor r = rows ? q : q.contiguous();
  p.q = r.data_ptr();
  p.q_dtype = cache_dtype(r);
  p.q_stride = r.size(0) > 1 ? r.stride(0) : 0;
  return r;
}

at::Tensor paged_attention_decode_cpu(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                      const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  PagedAttentionParams p = attention_params(q, key_cache, value_cache, block_tables, seq_lens, scale);
  TORCH_CHECK_VALUE(q.size(0) == p.batch, "argument 'q': expected one query per sequence, q.size(0) = ", p.batch,
                    " (block_tables.size(0)), got ", q.size(0));
  const at::Tensor qr = query_rows(q, p);
  at::Tensor out = at::empty(q.sizes(), q.options());
  p.out = out.data_ptr();
  if (out.numel() > 0) H1R_CPU_DISPATCH(paged_attention_decode_kernel, p);
  return out;
}

at::Tensor paged_attention_prefill_cpu(const at::Tensor& q, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q, double scale) {
  PagedAttentionParams p = attention_params(q, key_cache, value_cache, block_tables, seq_lens, scale);
  check_shape(cu_seqlens_q, "cu_seqlens_q", {p.batch + 1});
  check_dtype(cu_seqlens_q, "cu_seqlens_q", at::kInt);
  check_contiguous(cu_seqlens_q, "cu_seqlens_q");
  check_same_device(cu_seqlens_q, "cu_seqlens_q", q, "q");
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu[0] == 0 && cu[p.batch] == q.size(0), "argument 'cu_seqlens_q': expected cu_seqlens_q[0] = 0 ",
                    "and cu_seqlens_q[-1] = q.size(0) = ", q.size(0), ", got ", cu[0], " and ", cu[p.batch]);
  for (int64_t i = 0; i < p.batch; ++i) {
    const int64_t q_len = cu[i + 1] - cu[i];
    TORCH_CHECK_VALUE(q_len >= 0 && q_len <= p.seq_lens[i], "argument 'cu_seqlens_q': sequence ", i, " has ", q_len,
                      " queries, expected between 0 and its seq_lens = ", p.seq_lens[i]);
  }
  p.cu_seqlens_q = cu;
  const at::Tensor qr = query_rows(q, p);
  // bf16 q and cache: S = Q K^T and P V on AMX tiles where the CPU has them (P rounded to bf16 by
  // vcvtne2ps2bf16: AVX512-BF16 too, which every AMX CPU has; H1R_CPU_NO_AVX512_BF16 turns the path off)
  p.amx = q.scalar_type() == at::kBFloat16 && key_cache.scalar_type() == at::kBFloat16 && p.hd % 32 == 0 &&
          p.hd <= cpu::kAmxMaxHeadDim && cpu::amx_usable() && cpu::cpu_has_avx512_bf16();
  at::Tensor out = at::empty(q.sizes(), q.options());
  p.out = out.data_ptr();
  if (out.numel() > 0) H1R_CPU_DISPATCH(paged_attention_prefill_kernel, p);
  return out;
}

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_caches(key_cache, value_cache);
  const int64_t hk = key_cache.size(2), hd = key_cache.size(3), num_slots = key_cache.size(0) * key_cache.size(1);
  TORCH_CHECK_VALUE(key.dim() == 3, "argument 'key': expected 3 dimensions (tokens, num_kv_heads, head_dim), ",
                    "got shape ", shape_str(key.sizes()));
  check_float(key, "key");
  check_shape(key, "key", {-1, hk, hd});
  check_same_device(key, "key", key_cache, "key_cache");
  const int64_t tokens = key.size(0);
  check_shape(value, "value", {tokens, hk, hd});
  check_float(value, "value");
  check_same_device(value, "value", key_cache, "key_cache");
  check_shape(slot_mapping, "slot_mapping", {tokens});
  check_dtype(slot_mapping, "slot_mapping", at::kLong);
  check_contiguous(slot_mapping, "slot_mapping");
  check_same_device(slot_mapping, "slot_mapping", key_cache, "key_cache");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK_VALUE(slots[t] < num_slots, "argument 'slot_mapping': slot_mapping[", t, "] = ", slots[t],
                      " is past the cache (num_blocks * block_size = ", num_slots, ")");
  // in the cache's dtype, each token's (num_kv_heads, head_dim) row contiguous: the decoder's row views of
  // its projection output are read in place (any token stride)
  auto token_rows = [&](const at::Tensor& t) {
    at::Tensor r = t.to(key_cache.scalar_type());
    const bool rows = (hd == 1 || r.stride(2) == 1) && (hk == 1 || r.stride(1) == hd);
    return rows ? r : r.contiguous();
  };
  const at::Tensor k = token_rows(key), v = token_rows(value);
  if (tokens == 0 || hk * hd == 0) return;
  const int64_t es = key_cache.element_size();
  H1R_CPU_DISPATCH(reshape_and_cache_kernel, k.data_ptr(), v.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                   slots, tokens, hk * hd * es, k.stride(0) * es, v.stride(0) * es);
}

}  // namespace
}  // namespace h1r

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("reshape_and_cache", &h1r::reshape_and_cache_cpu);
  m.impl("paged_attention_decode", &h1r::paged_attention_decode_cpu);
  m.impl("paged_attention_prefill", &h1r::paged_attention_prefill_cpu);
}
