// Torch-facing glue of the paged-attention kernels (paged_attention.cu): checks, allocation, stream,
// and the CUDA registration of h1r::reshape_and_cache, h1r::paged_attention_decode and
// h1r::paged_attention_prefill.
#include "paged_attention.h"

#include <torch/library.h>

#include <array>

#include "api.h"
#include "glue.h"

namespace h1r::cuda {

namespace {

// The caches (num_blocks, block_size, hk, hd): same shape and dtype, contiguous. Returns their shape.
std::array<int64_t, 4> check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_shape(key_cache, "key_cache", {-1, -1, -1, -1});
  const int64_t nb = key_cache.size(0), bs = key_cache.size(1), hk = key_cache.size(2), hd = key_cache.size(3);
  check_shape(value_cache, "value_cache", {nb, bs, hk, hd});
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_dtype(value_cache, "value_cache", key_cache.scalar_type());
  return {nb, bs, hk, hd};
}

// The checks shared by decode and prefill: q (tokens, hq, hd) against the caches, int32 tables (b, -1) and
// seq_lens (b,); b = -1 takes it from block_tables.
void check_attention_args(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t b) {
  const auto [nb, bs, hk, hd] = check_caches(key_cache, value_cache);
  check_shape(q, "q", {-1, -1, hd});
  const int64_t hq = q.size(1);
  TORCH_CHECK_VALUE(hk > 0 && hq % hk == 0, "argument 'q': the query heads ", hq,
                    " must be a multiple of the kv heads ", hk);
  TORCH_CHECK_VALUE(hd <= kMaxHeadDim, "argument 'q': head_dim ", hd, " above the supported ", kMaxHeadDim);
  check_shape(block_tables, "block_tables", {b, -1});
  check_shape(seq_lens, "seq_lens", {block_tables.size(0)});
  check_dtype(block_tables, "block_tables", at::kInt);
  check_dtype(seq_lens, "seq_lens", at::kInt);
  check_devices({{"q", q}, {"key_cache", key_cache}, {"value_cache", value_cache}, {"block_tables", block_tables},
                 {"seq_lens", seq_lens}});
  dtype_of(q, "q");
}

// q, tables and lengths as the kernels read them (fp32 q, contiguous int32 tables), and the fp32 output.
struct AttentionInputs {
  at::Tensor q, block_tables, seq_lens, out;

  AttentionInputs(const at::Tensor& q_, const at::Tensor& block_tables_, const at::Tensor& seq_lens_)
      : q(as_f32(q_)), block_tables(block_tables_.contiguous()), seq_lens(seq_lens_.contiguous()),
        out(at::empty(q_.sizes(), q_.options().dtype(at::kFloat))) {}

  void fill(PagedAttentionArgs& prm, const at::Tensor& key_cache, const at::Tensor& value_cache, double scale) const {
    prm.q = q.data_ptr<float>();
    prm.out = out.data_ptr<float>();
    prm.key_cache = key_cache.data_ptr();
    prm.value_cache = value_cache.data_ptr();
    prm.cache_dtype = dtype_of(key_cache, "key_cache");
    prm.block_tables = block_tables.data_ptr<int32_t>();
    prm.seq_lens = seq_lens.data_ptr<int32_t>();
    prm.batch = block_tables.size(0);
    prm.max_blocks = block_tables.size(1);
    prm.block_size = key_cache.size(1);
    prm.hq = q.size(1);
    prm.hk = key_cache.size(2);
    prm.hd = key_cache.size(3);
    prm.scale = static_cast<float>(scale);
  }
};

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const auto [nb, bs, hk, hd] = check_caches(key_cache, value_cache);
  check_shape(key, "key", {-1, hk, hd});
  const int64_t tokens = key.size(0);
  check_shape(value, "value", {tokens, hk, hd});
  check_shape(slot_mapping, "slot_mapping", {tokens});
  check_dtype(slot_mapping, "slot_mapping", at::kLong);
  check_devices({{"key", key}, {"value", value}, {"key_cache", key_cache}, {"value_cache", value_cache},
                 {"slot_mapping", slot_mapping}});
  const DType dtype = dtype_of(key_cache, "key_cache");
  dtype_of(key, "key");
  dtype_of(value, "value");

  KernelContext ctx(key);
  // Rows of (hk, hd) contiguous elements in the cache dtype; a strided token dim (a slice of a fused qkv
  // projection) is kept as is.
  auto rows = [&](const at::Tensor& t) {
    at::Tensor r = t.to(key_cache.scalar_type());
    return (r.stride(2) == 1 && r.stride(1) == hd) ? r : r.contiguous();
  };
  const at::Tensor k = rows(key), v = rows(value), slots = slot_mapping.contiguous();
  ReshapeAndCacheParams prm{};
  prm.key = k.data_ptr();
  prm.value = v.data_ptr();
  prm.key_cache = key_cache.data_ptr();
  prm.value_cache = value_cache.data_ptr();
  prm.dtype = dtype;
  prm.slot_mapping = slots.data_ptr<int64_t>();
  prm.tokens = tokens;
  prm.row_elems = hk * hd;
  prm.key_stride = k.stride(0);
  prm.value_stride = v.stride(0);
  prm.num_slots = nb * bs;
  if (tokens > 0 && hk * hd > 0) check_launch(launch_reshape_and_cache(prm, ctx.stream()), "reshape_and_cache");
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  check_shape(q, "q", {-1, -1, -1});
  check_attention_args(q, key_cache, value_cache, block_tables, seq_lens, q.size(0));
  const int64_t b = q.size(0), hq = q.size(1), hd = q.size(2), bs = key_cache.size(1);

  KernelContext ctx(q);
  const AttentionInputs in(q, block_tables, seq_lens);
  const at::Tensor& out = in.out;
  const int64_t max_blocks = block_tables.size(1);
  // Partitions cover the longest context the tables can describe: no device-to-host read of seq_lens.
  const int64_t parts = std::max<int64_t>(1, (max_blocks * bs + kPartitionTokens - 1) / kPartitionTokens);
  at::Tensor partial, stats;
  if (parts > 1) {
    partial = at::empty({b, hq, parts, hd}, out.options());
    stats = at::empty({2, b, hq, parts}, out.options());
  }
  PagedAttentionDecodeParams prm{};
  in.fill(prm, key_cache, value_cache, scale);
  prm.num_partitions = parts;
  if (parts > 1) {
    prm.partial_out = partial.data_ptr<float>();
    prm.max_logits = stats[0].data_ptr<float>();
    prm.exp_sums = stats[1].data_ptr<float>();
  }
  if (b > 0 && hq > 0 && hd > 0)
    check_launch(launch_paged_attention_decode(prm, ctx.stream()), "paged_attention_decode");
  return out.to(q.scalar_type());
}

at::Tensor paged_attention_prefill(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& cu_seqlens_q, double scale) {
  check_attention_args(q, key_cache, value_cache, block_tables, seq_lens, -1);
  const int64_t total_q = q.size(0), hq = q.size(1), hd = q.size(2), b = block_tables.size(0);
  check_index(cu_seqlens_q, "cu_seqlens_q", {b + 1});
  check_device(cu_seqlens_q, "cu_seqlens_q");

  KernelContext ctx(q);
  const AttentionInputs in(q, block_tables, seq_lens);
  const at::Tensor& out = in.out;
  const at::Tensor cu = cu_seqlens_q.contiguous();
  PagedAttentionPrefillParams prm{};
  in.fill(prm, key_cache, value_cache, scale);
  prm.cu_seqlens_q = cu.data_ptr<int32_t>();
  prm.total_q = total_q;
  if (total_q > 0 && hq > 0 && hd > 0 && b > 0)
    check_launch(launch_paged_attention_prefill(prm, ctx.stream()), "paged_attention_prefill");
  else
    out.zero_();
  return out.to(q.scalar_type());
}

}  // namespace h1r::cuda

#if !defined(H1R_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(h1r, CUDA, m) {
  m.impl("reshape_and_cache", &h1r::cuda::reshape_and_cache);
  m.impl("paged_attention_decode", &h1r::cuda::paged_attention_decode);
  m.impl("paged_attention_prefill", &h1r::cuda::paged_attention_prefill);
}
#endif
