// Torch-facing glue of the Mamba2 decode step kernel (selective_state_update.cu): checks, allocation,
// stream, and the CUDA registration of h1r::selective_state_update.
#include "selective_state_update.h"

#include <torch/library.h>

#include "api.h"
#include "glue.h"

namespace h1r::cuda {

at::Tensor selective_state_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const std::optional<at::Tensor>& state_batch_indices) {
  check_shape(x, "x", {-1, -1, -1});
  const int64_t b = x.size(0), h = x.size(1), p = x.size(2);
  check_shape(B, "B", {b, -1, -1});
  const int64_t g = B.size(1), n = B.size(2);
  TORCH_CHECK_VALUE(g > 0 && h % g == 0, "argument 'B': the number of groups ", g, " must divide the heads ", h);
  check_shape(state, "state", {-1, h, p, n});
  check_shape(dt, "dt", {b, h});
  check_shape(A, "A", {h});
  check_shape(C, "C", {b, g, n});
  if (D && D->dim() != 1) check_shape(*D, "D", {h, p});
  if (D && D->dim() == 1) check_shape(*D, "D", {h});  // per head, broadcast over p
  if (z) check_shape(*z, "z", {b, h, p});
  if (dt_bias) check_shape(*dt_bias, "dt_bias", {h});
  check_state_cache(state, "state", state_batch_indices, "state_batch_indices", b);
  check_devices({{"state", state}, {"x", x}, {"dt", dt}, {"A", A}, {"B", B}, {"C", C}, {"D", D}, {"z", z},
                 {"dt_bias", dt_bias}, {"state_batch_indices", state_batch_indices}});
  const DType dtype = dtype_of(x, "x");
  if (z) check_dtype(*z, "z", x.scalar_type());

  KernelContext ctx(x);
  const at::Tensor xc = x.contiguous();
  const std::optional<at::Tensor> zc = contiguous(z);
  const at::Tensor dtf = as_f32(dt), Af = as_f32(A), Bf = as_f32(B), Cf = as_f32(C);
  const auto Df = per_channel_D(D, h, p);
  const auto dt_biasf = as_f32(dt_bias);
  const auto idx = contiguous(state_batch_indices);
  at::Tensor out = at::empty_like(xc);

  SelectiveStateUpdateParams prm{};
  prm.state = state.data_ptr();
  prm.state_dtype = dtype_of(state, "state");
  prm.x = xc.data_ptr();
  prm.z = zc ? zc->data_ptr() : nullptr;
  prm.out = out.data_ptr();
  prm.dtype = dtype;
  prm.dt = dtf.data_ptr<float>();
  prm.A = Af.data_ptr<float>();
  prm.B = Bf.data_ptr<float>();
  prm.C = Cf.data_ptr<float>();
  prm.D = ptr_or_null<float>(Df);
  prm.dt_bias = ptr_or_null<float>(dt_biasf);
  prm.state_batch_indices = ptr_or_null<int32_t>(idx);
  prm.batch = b;
  prm.nheads = h;
  prm.dim = p;
  prm.dstate = n;
  prm.ngroups = g;
  prm.state_rows = state.size(0);
  prm.dt_softplus = dt_softplus;
  if (b > 0 && p > 0) check_launch(launch_selective_state_update(prm, ctx.stream()), "selective_state_update");
  return out;
}

}  // namespace h1r::cuda

#if !defined(H1R_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(h1r, CUDA, m) { m.impl("selective_state_update", &h1r::cuda::selective_state_update); }
#endif
