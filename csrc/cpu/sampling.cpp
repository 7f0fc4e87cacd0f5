// CPU glue for the sampling family: argument checks, allocation, and the per-ISA kernel call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/glue.h"
#include "cpu/isa.h"
#include "cpu/sampling_params.h"

H1R_DECLARE_CPU_KERNEL(void, sample_top_p_kernel, const h1r::cpu::SampleTopPParams&);

namespace h1r {
namespace {

using at::Tensor;

void check_row_param(const Tensor& t, const char* name, int64_t rows, const Tensor& logits) {
  check_dtype(t, name, at::kFloat);
  check_input(t, name, {rows}, logits, "logits");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sample_top_p_cpu(const Tensor& logits, const Tensor& temperature,
                                                            const Tensor& top_p, const Tensor& uniform,
                                                            int64_t num_logprobs) {
  check_float(logits, "logits");
  check_shape(logits, "logits", {-1, -1});
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.stride(1) == 1, "argument 'logits': expected (b, vocab) with ",
                    "vocab >= 1 and unit column stride, got shape ", shape_str(logits.sizes()), " strides ",
                    shape_str(logits.strides()));
  const int64_t b = logits.size(0), V = logits.size(1);
  check_row_param(temperature, "temperature", b, logits);
  check_row_param(top_p, "top_p", b, logits);
  check_row_param(uniform, "uniform", b, logits);
  TORCH_CHECK_VALUE(num_logprobs >= 0 && num_logprobs <= V, "argument 'num_logprobs': expected in [0, vocab = ", V,
                    "], got ", num_logprobs);
  auto i64 = logits.options().dtype(at::kLong);
  auto f32 = logits.options().dtype(at::kFloat);
  Tensor tokens = at::empty({b}, i64), top_lp = at::empty({b, num_logprobs}, f32);
  Tensor top_ids = at::empty({b, num_logprobs}, i64), token_lp = at::empty({b}, f32);
  if (b == 0) return {tokens, top_lp, top_ids, token_lp};
  cpu::SampleTopPParams p{logits.data_ptr(), cpu::float_type(logits), b, V, logits.stride(0),
                          temperature.data_ptr<float>(), top_p.data_ptr<float>(), uniform.data_ptr<float>(),
                          num_logprobs, tokens.data_ptr<int64_t>(), top_lp.data_ptr<float>(),
                          top_ids.data_ptr<int64_t>(), token_lp.data_ptr<float>()};
  H1R_CPU_DISPATCH(sample_top_p_kernel, p);
  return {tokens, top_lp, top_ids, token_lp};
}

}  // namespace

TORCH_LIBRARY_IMPL(h1r, CPU, m) { m.impl("sample_top_p", &sample_top_p_cpu); }

}  // namespace h1r
