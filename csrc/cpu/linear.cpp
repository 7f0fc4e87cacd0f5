// CPU glue of the small-row linear layer (csrc/cpu/linear_kernels.cpp): checks, fp32 side vectors,
// allocation, and the per-ISA kernel call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/glue.h"
#include "cpu/amx.h"
#include "cpu/isa.h"
#include "cpu/linear.h"

H1R_DECLARE_CPU_KERNEL(void, linear_kernel, const h1r::cpu::LinearParams&);
H1R_DECLARE_CPU_KERNEL(void, swiglu_kernel, const h1r::cpu::SwigluParams&);

namespace h1r {
namespace {

using at::Tensor;

// A 2-D floating tensor with a dense last dimension (rows may be strided).
void check_rows(const Tensor& t, const char* name, const char* shape) {
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, "argument '", name, "': expected shape ", shape, ", got ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) <= 1, "argument '", name,
                    "': expected a unit stride on the last dimension, got strides ", shape_str(t.strides()));
  TORCH_CHECK_VALUE(t.stride(0) >= 0, "argument '", name, "': expected non-negative strides, got ",
                    shape_str(t.strides()));
}

// An optional (n,) per-output-row vector, as fp32 contiguous.
std::optional<Tensor> channel_vector(const std::optional<Tensor>& t, const char* name, int64_t n, const Tensor& x) {
  if (!t) return std::nullopt;
  check_float(*t, name);
  check_shape(*t, name, {n});
  check_same_device(*t, name, x, "x");
  return t->to(at::kFloat).contiguous();
}

// Many bf16 rows go to the AMX tiles where the shapes fit them whole (k in steps of 32, n_out of 16).
bool use_amx(const Tensor& x, int64_t m, int64_t k, int64_t n_out) {
  return x.scalar_type() == at::kBFloat16 && m >= cpu::kLinearAmxMinRows && k % 32 == 0 && n_out % 16 == 0 &&
         cpu::amx_usable();
}

Tensor linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                  const std::optional<Tensor>& scale, double alpha, const std::optional<Tensor>& residual,
                  bool swiglu) {
  check_rows(x, "x", "(m, k)");
  check_rows(weight, "weight", "(n, k)");
  check_same_device(weight, "weight", x, "x");
  check_dtype(weight, "weight", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, "argument 'weight': expected shape (n, ", k, ") (k of 'x'), got ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(!swiglu || n % 2 == 0, "argument 'weight': with swiglu, expected an even number of rows ",
                    "[gate | up], got ", n);
  const int64_t n_out = swiglu ? n / 2 : n;
  auto bias32 = channel_vector(bias, "bias", n, x);
  auto scale32 = channel_vector(scale, "scale", n, x);
  if (residual) {
    check_rows(*residual, "residual", "(m, n_out)");
    check_shape(*residual, "residual", {m, n_out});
    check_dtype(*residual, "residual", x.scalar_type());
    check_same_device(*residual, "residual", x, "x");
  }
  Tensor out = at::empty({m, n_out}, x.options());
  if (m == 0 || n_out == 0) return out;
  cpu::LinearParams p{x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
                      scale32 ? scale32->data_ptr<float>() : nullptr, bias32 ? bias32->data_ptr<float>() : nullptr,
                      residual ? residual->data_ptr() : nullptr, residual ? residual->stride(0) : 0,
                      out.data_ptr(), out.stride(0), m, n, k, static_cast<float>(alpha), swiglu,
                      cpu::cpu_has_avx512_bf16(), use_amx(x, m, k, n_out), cpu::float_type(x)};
  H1R_CPU_DISPATCH(linear_kernel, p);
  return out;
}

Tensor swiglu_cpu(const Tensor& x, double gate_scale) {
  check_rows(x, "x", "(m, 2 * width)");
  TORCH_CHECK_VALUE(x.size(1) % 2 == 0, "argument 'x': expected an even number of columns [gate | up], got ",
                    x.size(1));
  const int64_t m = x.size(0), width = x.size(1) / 2;
  Tensor out = at::empty({m, width}, x.options());
  if (m == 0 || width == 0) return out;
  cpu::SwigluParams p{x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), m, width,
                      static_cast<float>(gate_scale), cpu::float_type(x)};
  H1R_CPU_DISPATCH(swiglu_kernel, p);
  return out;
}

}  // namespace
}  // namespace h1r

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("linear", &h1r::linear_cpu);
  m.impl("swiglu", &h1r::swiglu_cpu);
}
