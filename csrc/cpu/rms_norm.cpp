// CPU glue for the RMSNorm family: argument checks, allocation, and the per-ISA kernel call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/glue.h"
#include "cpu/rms_norm.h"

H1R_DECLARE_CPU_KERNEL(void, rms_norm_fwd_kernel, const h1r::cpu::RmsNormFwdParams&);
H1R_DECLARE_CPU_KERNEL(void, rms_norm_bwd_kernel, const h1r::cpu::RmsNormBwdParams&);
H1R_DECLARE_CPU_KERNEL(void, gated_rms_norm_fwd_kernel, const h1r::cpu::GatedRmsNormFwdParams&);
H1R_DECLARE_CPU_KERNEL(void, gated_rms_norm_bwd_kernel, const h1r::cpu::GatedRmsNormBwdParams&);

namespace h1r {
namespace {

using at::Tensor;
using cpu::FloatType;
using cpu::float_type;

const void* ptr_or_null(const std::optional<Tensor>& t) { return t ? t->data_ptr() : nullptr; }

// x (..., d): a floating, contiguous tensor with d >= 1. Returns d.
int64_t check_rows(const Tensor& x, const char* name) {
  check_float(x, name);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "argument '", name,
                    "': expected shape (..., d) with d >= 1, got ", shape_str(x.sizes()));
  check_contiguous(x, name);
  return x.size(-1);
}

// A tensor of exactly ref's shape, dtype and device, contiguous.
void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "argument '", name, "': expected shape ", shape_str(ref.sizes()),
                    " (that of '", ref_name, "'), got ", shape_str(t.sizes()));
  check_dtype(t, name, ref.scalar_type());
  check_same_device(t, name, ref, ref_name);
  check_contiguous(t, name);
}

void check_weight(const Tensor& weight, int64_t d, const Tensor& x) {
  check_float(weight, "weight");
  check_input(weight, "weight", {d}, x, "x");
}

void check_rstd(const Tensor& rstd, int64_t n, const Tensor& x) {
  check_dtype(rstd, "rstd", at::kFloat);
  TORCH_CHECK_VALUE(rstd.numel() == n, "argument 'rstd': expected ", n, " elements, got ", rstd.numel());
  check_same_device(rstd, "rstd", x, "x");
  check_contiguous(rstd, "rstd");
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const Tensor& weight, double eps,
                                                const std::optional<Tensor>& residual) {
  const int64_t d = check_rows(x, "x");
  const int64_t rows = x.numel() / d;
  check_weight(weight, d, x);
  if (residual) check_like(*residual, "residual", x, "x");
  Tensor out = at::empty_like(x);
  Tensor residual_out = residual ? at::empty_like(x) : empty_like_none(x);
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, residual_out, rstd};
  cpu::RmsNormFwdParams p{x.data_ptr(), ptr_or_null(residual), weight.data_ptr(), out.data_ptr(),
                          residual ? residual_out.data_ptr() : nullptr, rstd.data_ptr<float>(), rows, d,
                          static_cast<float>(eps), float_type(x), float_type(weight),
                          cpu::cpu_has_avx512_bf16()};
  H1R_CPU_DISPATCH(rms_norm_fwd_kernel, p);
  return {out, residual_out, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dout, const std::optional<Tensor>& dresidual_out,
                                        const Tensor& h, const Tensor& weight, const Tensor& rstd) {
  const int64_t d = check_rows(h, "h");
  const int64_t rows = h.numel() / d;
  check_like(dout, "dout", h, "h");
  if (dresidual_out) check_like(*dresidual_out, "dresidual_out", h, "h");
  check_weight(weight, d, h);
  check_rstd(rstd, rows, h);
  Tensor dh = at::empty_like(h);
  Tensor dweight = at::zeros({d}, h.options().dtype(at::kFloat));
  if (rows == 0) return {dh, dweight};
  const int64_t nblocks = std::min(rows, cpu::kDweightBlocks);
  Tensor partial = at::empty({nblocks, d}, dweight.options());
  cpu::RmsNormBwdParams p{dout.data_ptr(), ptr_or_null(dresidual_out), h.data_ptr(), weight.data_ptr(),
                          rstd.data_ptr<float>(), dh.data_ptr(), partial.data_ptr<float>(),
                          dweight.data_ptr<float>(), rows, d, nblocks, float_type(h), float_type(weight),
                          cpu::cpu_has_avx512_bf16()};
  H1R_CPU_DISPATCH(rms_norm_bwd_kernel, p);
  return {dh, dweight};
}

int64_t check_groups(int64_t d, int64_t group_size) {
  TORCH_CHECK_VALUE(group_size >= 1 && d % group_size == 0, "argument 'group_size': expected a positive divisor of d = ",
                    d, ", got ", group_size);
  return d / group_size;
}

std::tuple<Tensor, Tensor> gated_rms_norm_fwd(const Tensor& x, const std::optional<Tensor>& z, const Tensor& weight,
                                              double eps, int64_t group_size, bool norm_before_gate) {
  const int64_t d = check_rows(x, "x");
  const int64_t rows = x.numel() / d;
  const int64_t ngroups = check_groups(d, group_size);
  // z: x's shape, dtype and device; its rows may be strided (a column slice of a wider buffer, as the fused
  // model's in-projection output): read in place when they are, else one contiguous copy
  Tensor zr;
  if (z) {
    TORCH_CHECK_VALUE(z->sizes() == x.sizes(), "argument 'z': expected shape ", shape_str(x.sizes()),
                      " (that of 'x'), got ", shape_str(z->sizes()));
    check_dtype(*z, "z", x.scalar_type());
    check_same_device(*z, "z", x, "x");
    zr = z->reshape({rows, d});
    if (d > 1 && zr.stride(1) != 1) zr = zr.contiguous();
  }
  check_weight(weight, d, x);
  Tensor out = at::empty_like(x);
  Tensor rstd = at::empty({rows, ngroups}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, rstd};
  const int64_t z_stride = zr.defined() && rows > 1 ? zr.stride(0) : d;
  cpu::GatedRmsNormFwdParams p{x.data_ptr(), zr.defined() ? zr.data_ptr() : nullptr, z_stride, weight.data_ptr(), out.data_ptr(),
                               rstd.data_ptr<float>(), rows, d, group_size, static_cast<float>(eps),
                               norm_before_gate, float_type(x), float_type(weight), cpu::cpu_has_avx512_bf16()};
  H1R_CPU_DISPATCH(gated_rms_norm_fwd_kernel, p);
  return {out, rstd};
}

std::tuple<Tensor, Tensor, Tensor> gated_rms_norm_bwd(const Tensor& dout, const Tensor& x,
                                                      const std::optional<Tensor>& z, const Tensor& weight,
                                                      const Tensor& rstd, double /*eps*/, int64_t group_size,
                                                      bool norm_before_gate) {
  const int64_t d = check_rows(x, "x");
  const int64_t rows = x.numel() / d;
  const int64_t ngroups = check_groups(d, group_size);
  check_like(dout, "dout", x, "x");
  if (z) check_like(*z, "z", x, "x");
  check_weight(weight, d, x);
  check_rstd(rstd, rows * ngroups, x);
  Tensor dx = at::empty_like(x);
  Tensor dz = z ? at::empty_like(x) : empty_like_none(x);
  Tensor dweight = at::zeros({d}, x.options().dtype(at::kFloat));
  if (rows == 0) return {dx, dz, dweight};
  const int64_t nblocks = std::min(rows, cpu::kDweightBlocks);
  Tensor partial = at::empty({nblocks, d}, dweight.options());
  cpu::GatedRmsNormBwdParams p{dout.data_ptr(), x.data_ptr(), ptr_or_null(z), weight.data_ptr(),
                               rstd.data_ptr<float>(), dx.data_ptr(), z ? dz.data_ptr() : nullptr,
                               partial.data_ptr<float>(), dweight.data_ptr<float>(), rows, d, group_size,
                               nblocks, norm_before_gate, float_type(x), float_type(weight),
                               cpu::cpu_has_avx512_bf16()};
  H1R_CPU_DISPATCH(gated_rms_norm_bwd_kernel, p);
  return {dx, dz, dweight};
}

}  // namespace
}  // namespace h1r

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("rms_norm_fwd", &h1r::rms_norm_fwd);
  m.impl("rms_norm_bwd", &h1r::rms_norm_bwd);
  m.impl("gated_rms_norm_fwd", &h1r::gated_rms_norm_fwd);
  m.impl("gated_rms_norm_bwd", &h1r::gated_rms_norm_bwd);
}
