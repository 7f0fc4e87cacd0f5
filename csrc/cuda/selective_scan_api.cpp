// Torch-facing glue of the Mamba2 chunked scan forward kernel (selective_scan.cu): checks, allocation,
// stream, and the CUDA registration of h1r::selective_scan_fwd.
#include "selective_scan.h"

#include <torch/library.h>

#include <cmath>

#include "api.h"
#include "glue.h"

namespace h1r::cuda {

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    int64_t chunk_size, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx, bool dt_softplus, double dt_min, double dt_max) {
  check_shape(x, "x", {-1, -1, -1, -1});
  const int64_t b = x.size(0), l = x.size(1), h = x.size(2), p = x.size(3);
  check_shape(B, "B", {b, l, -1, -1});
  const int64_t g = B.size(2), n = B.size(3);
  TORCH_CHECK_VALUE(g > 0 && h % g == 0, "argument 'B': the number of groups ", g, " must divide the heads ", h);
  TORCH_CHECK_VALUE(n <= kScanMaxDState, "argument 'B': d_state ", n, " above the supported ", kScanMaxDState);
  TORCH_CHECK_VALUE(chunk_size > 0, "argument 'chunk_size': expected a positive chunk size, got ", chunk_size);
  check_shape(C, "C", {b, l, g, n});
  check_shape(dt, "dt", {b, l, h});
  check_shape(A, "A", {h});
  if (D && D->dim() == 1) check_shape(*D, "D", {h});
  if (D && D->dim() != 1) check_shape(*D, "D", {h, p});
  if (z) check_shape(*z, "z", {b, l, h, p});
  if (dt_bias) check_shape(*dt_bias, "dt_bias", {h});
  if (initial_states) check_shape(*initial_states, "initial_states", {b, h, p, n});
  if (seq_idx) {
    check_shape(*seq_idx, "seq_idx", {b, l});
    check_dtype(*seq_idx, "seq_idx", at::kInt);
  }
  for (auto [t, name] : {std::pair{&x, "x"}, {&dt, "dt"}, {&A, "A"}, {&B, "B"}, {&C, "C"}}) check_device(*t, name);
  for (auto [t, name] : {std::pair{&D, "D"}, {&z, "z"}, {&dt_bias, "dt_bias"}, {&initial_states, "initial_states"},
                         {&seq_idx, "seq_idx"}})
    if (*t) check_device(**t, name);
  const DType dtype = dtype_of(x, "x");
  for (auto [t, name] : {std::pair{&B, "B"}, {&C, "C"}}) check_dtype(*t, name, x.scalar_type());
  if (z) check_dtype(*z, "z", x.scalar_type());

  KernelContext ctx(x);
  const at::Tensor xc = x.contiguous(), Bc = B.contiguous(), Cc = C.contiguous();
  const auto zc = contiguous(z);
  const at::Tensor dtf = as_f32(dt), Af = as_f32(A);
  const auto Df = per_channel_D(D, h, p);
  const auto dt_biasf = as_f32(dt_bias), initf = as_f32(initial_states);
  const auto seq = contiguous(seq_idx);
  at::Tensor out = at::empty_like(xc);
  at::Tensor final_states = at::empty({b, h, p, n}, x.options().dtype(at::kFloat));

  SelectiveScanFwdParams prm{};
  prm.x = xc.data_ptr();
  prm.B = Bc.data_ptr();
  prm.C = Cc.data_ptr();
  prm.z = zc ? zc->data_ptr() : nullptr;
  prm.out = out.data_ptr();
  prm.dtype = dtype;
  prm.dt = dtf.data_ptr<float>();
  prm.A = Af.data_ptr<float>();
  prm.D = ptr_or_null<float>(Df);
  prm.dt_bias = ptr_or_null<float>(dt_biasf);
  prm.initial_states = ptr_or_null<float>(initf);
  prm.seq_idx = ptr_or_null<int32_t>(seq);
  prm.final_states = final_states.data_ptr<float>();
  prm.batch = b;
  prm.seqlen = l;
  prm.nheads = h;
  prm.dim = p;
  prm.ngroups = g;
  prm.dstate = n;
  prm.dt_softplus = dt_softplus;
  prm.dt_clamp = dt_min > 0.0 || !std::isinf(dt_max);  // (0, inf) is "no limit", as in mamba_ssm
  prm.dt_min = static_cast<float>(dt_min);
  prm.dt_max = static_cast<float>(dt_max);
  if (b > 0 && h > 0 && p > 0) {
    if (n == 0) final_states.zero_();
    check_launch(launch_selective_scan_fwd(prm, ctx.stream()), "selective_scan_fwd");
  }
  return {out, final_states};
}

}  // namespace h1r::cuda

#if !defined(H1R_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(h1r, CUDA, m) { m.impl("selective_scan_fwd", &h1r::cuda::selective_scan_fwd); }
#endif
