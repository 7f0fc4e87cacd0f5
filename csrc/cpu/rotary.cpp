// CPU glue for the rotary embedding: argument checks (strides, shapes, position range), allocation, and
// the per-ISA kernel call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/glue.h"
#include "cpu/rotary.h"

H1R_DECLARE_CPU_KERNEL(void, rotary_kernel, const h1r::cpu::RotaryParams&);

namespace h1r {
namespace {

using at::Tensor;
using cpu::FloatType;
using cpu::float_type;

// q or k: (b, heads, s, hd) floating with a unit last stride, matching q in b, s, hd and dtype.
void check_head_tensor(const Tensor& t, const char* name, const Tensor& q) {
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() == 4, "argument '", name, "': expected shape (b, heads, s, hd), got ",
                    shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) <= 1, "argument '", name,
                    "': expected a unit stride on the last dimension, got strides ", shape_str(t.strides()));
  TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(2) == q.size(2) && t.size(3) == q.size(3), "argument '",
                    name, "': expected shape (", q.size(0), ", heads, ", q.size(2), ", ", q.size(3),
                    ") (b, s, hd of 'q'), got ", shape_str(t.sizes()));
  check_dtype(t, name, q.scalar_type());
  check_same_device(t, name, q, "q");
}

cpu::RotaryTensor head_tensor(const Tensor& in, const Tensor& out) {
  return {in.data_ptr(), out.data_ptr(), in.size(1), {in.stride(0), in.stride(1), in.stride(2)},
          {out.stride(0), out.stride(1), out.stride(2)}};
}

cpu::RotaryParams make_params(const Tensor& q, const Tensor& k, const Tensor& q_out, const Tensor& k_out,
                              const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& position_ids,
                              bool inverse) {
  check_head_tensor(q, "q", q);
  check_head_tensor(k, "k", q);
  const int64_t b = q.size(0), s = q.size(2), hd = q.size(3);
  check_float(cos, "cos");
  check_same_device(cos, "cos", q, "q");
  check_contiguous(cos, "cos");
  const int64_t rd = cos.size(-1);
  int64_t cos_batch_stride = 0;
  if (position_ids) {
    const Tensor& pos = *position_ids;
    check_dtype(pos, "position_ids", at::kLong);
    check_input(pos, "position_ids", {b, s}, q, "q");
    TORCH_CHECK_VALUE(cos.dim() == 2, "argument 'cos': with position_ids, expected a table (max_pos, rd), got ",
                      shape_str(cos.sizes()));
    if (pos.numel() > 0) {
      auto [lo, hi] = at::aminmax(pos);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < cos.size(0), "argument 'position_ids': ",
                        "expected values in [0, ", cos.size(0), ") (rows of 'cos'), got [", lo.item<int64_t>(),
                        ", ", hi.item<int64_t>(), "]");
    }
  } else {
    TORCH_CHECK_VALUE(cos.dim() == 3 && (cos.size(0) == 1 || cos.size(0) == b) && cos.size(1) == s,
                      "argument 'cos': expected shape (1 or ", b, ", ", s, ", rd), got ", shape_str(cos.sizes()));
    cos_batch_stride = cos.size(0) == 1 ? 0 : s * rd;
  }
  TORCH_CHECK_VALUE(rd >= 2 && rd % 2 == 0 && rd <= hd, "argument 'cos': expected an even rotary width rd with 2 <= rd <= ",
                    "head_dim = ", hd, ", got ", rd);
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "argument 'sin': expected shape ", shape_str(cos.sizes()),
                    " (that of 'cos'), got ", shape_str(sin.sizes()));
  check_dtype(sin, "sin", cos.scalar_type());
  check_same_device(sin, "sin", q, "q");
  check_contiguous(sin, "sin");
  return {head_tensor(q, q_out), head_tensor(k, k_out), b, s, hd, rd, cos.data_ptr(), sin.data_ptr(),
          cos_batch_stride, position_ids ? position_ids->data_ptr<int64_t>() : nullptr, inverse,
          float_type(q), float_type(cos), cpu::cpu_has_avx512_bf16()};
}

void run(const cpu::RotaryParams& p) {
  if (p.batch * p.seqlen > 0) H1R_CPU_DISPATCH(rotary_kernel, p);
}

std::tuple<Tensor, Tensor> rotary(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                  const std::optional<Tensor>& position_ids, bool inverse) {
  // empty_like keeps a dense permuted layout (e.g. HF's (b, s, h, hd) storage seen as (b, h, s, hd)).
  Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  run(make_params(q, k, q_out, k_out, cos, sin, position_ids, inverse));
  return {q_out, k_out};
}

void rotary_(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
             const std::optional<Tensor>& position_ids, bool inverse) {
  run(make_params(q, k, q, k, cos, sin, position_ids, inverse));
}

}  // namespace
}  // namespace h1r

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("rotary", &h1r::rotary);
  m.impl("rotary_", &h1r::rotary_);
}
