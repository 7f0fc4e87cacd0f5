// Torch-facing glue of the Mamba2 chunked scan kernels (selective_scan.cu, selective_scan_bwd.cu): checks,
// allocation, stream, and the CUDA registration of h1r::selective_scan_fwd and h1r::selective_scan_bwd.
#include "selective_scan.h"

#include <torch/library.h>

#include <cmath>

#include "api.h"
#include "glue.h"

namespace h1r::cuda {

namespace {

// The argument checks shared by the forward and the backward (shapes, devices, dtypes).
void check_scan_args(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, int64_t chunk_size, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
                     const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx) {
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
  check_index(seq_idx, "seq_idx", {b, l});
  check_devices({{"x", x}, {"dt", dt}, {"A", A}, {"B", B}, {"C", C}, {"D", D}, {"z", z}, {"dt_bias", dt_bias},
                 {"initial_states", initial_states}, {"seq_idx", seq_idx}});
  check_float(x, "x");
  for (auto [t, name] : {std::pair{&B, "B"}, {&C, "C"}}) check_dtype(*t, name, x.scalar_type());
  if (z) check_dtype(*z, "z", x.scalar_type());
}

// The inputs as the kernels read them: x, B, C, z contiguous in x's dtype, the small ones in fp32.
struct ScanInputs {
  at::Tensor x, B, C, dt, A;
  std::optional<at::Tensor> z, D, dt_bias, initial_states, seq_idx;

  ScanInputs(const at::Tensor& x_, const at::Tensor& dt_, const at::Tensor& A_, const at::Tensor& B_,
             const at::Tensor& C_, const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
             const std::optional<at::Tensor>& dt_bias_, const std::optional<at::Tensor>& initial_states_,
             const std::optional<at::Tensor>& seq_idx_)
      : x(x_.contiguous()), B(B_.contiguous()), C(C_.contiguous()), dt(as_f32(dt_)), A(as_f32(A_)),
        z(contiguous(z_)), D(per_channel_D(D_, x_.size(2), x_.size(3))), dt_bias(as_f32(dt_bias_)),
        initial_states(as_f32(initial_states_)), seq_idx(contiguous(seq_idx_)) {}

  void fill(SelectiveScanInputs& prm, bool dt_softplus, double dt_min, double dt_max) const {
    prm.x = x.data_ptr();
    prm.B = B.data_ptr();
    prm.C = C.data_ptr();
    prm.z = z ? z->data_ptr() : nullptr;
    prm.dtype = dtype_of(x, "x");
    prm.dt = dt.data_ptr<float>();
    prm.A = A.data_ptr<float>();
    prm.D = ptr_or_null<float>(D);
    prm.dt_bias = ptr_or_null<float>(dt_bias);
    prm.initial_states = ptr_or_null<float>(initial_states);
    prm.seq_idx = ptr_or_null<int32_t>(seq_idx);
    prm.batch = x.size(0);
    prm.seqlen = x.size(1);
    prm.nheads = x.size(2);
    prm.dim = x.size(3);
    prm.ngroups = B.size(2);
    prm.dstate = B.size(3);
    prm.dt_softplus = dt_softplus;
    prm.dt_clamp = dt_min > 0.0 || !std::isinf(dt_max);  // (0, inf) is "no limit", as in mamba_ssm
    prm.dt_min = static_cast<float>(dt_min);
    prm.dt_max = static_cast<float>(dt_max);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    int64_t chunk_size, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx, bool dt_softplus, double dt_min, double dt_max) {
  check_scan_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx);
  const int64_t b = x.size(0), h = x.size(2), p = x.size(3), n = B.size(3);

  KernelContext ctx(x);
  const ScanInputs in(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx);
  at::Tensor out = at::empty_like(in.x);
  at::Tensor final_states = at::empty({b, h, p, n}, x.options().dtype(at::kFloat));

  SelectiveScanFwdParams prm{};
  in.fill(prm, dt_softplus, dt_min, dt_max);
  prm.out = out.data_ptr();
  prm.final_states = final_states.data_ptr<float>();
  if (b > 0 && h > 0 && p > 0) {
    if (n == 0) final_states.zero_();
    check_launch(launch_selective_scan_fwd(prm, ctx.stream()), "selective_scan_fwd");
  }
  return {out, final_states};
}

// Gradients of selective_scan_fwd for every input, in each input's dtype (empty where it was absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd(const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_states, const at::Tensor& x,
                   const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                   int64_t chunk_size, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                   const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
                   const std::optional<at::Tensor>& seq_idx, bool dt_softplus, double dt_min, double dt_max) {
  check_scan_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx);
  const int64_t b = x.size(0), l = x.size(1), h = x.size(2), p = x.size(3), g = B.size(2), n = B.size(3);
  check_shape(dout, "dout", {b, l, h, p});
  check_device(dout, "dout");
  check_float(dout, "dout");
  const bool has_dfinal = dfinal_states && dfinal_states->numel() > 0;
  if (has_dfinal) {
    check_shape(*dfinal_states, "dfinal_states", {b, h, p, n});
    check_device(*dfinal_states, "dfinal_states");
    check_float(*dfinal_states, "dfinal_states");
  }

  KernelContext ctx(x);
  const ScanInputs in(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx);
  const at::Tensor doutc = dout.to(x.scalar_type()).contiguous();
  std::optional<at::Tensor> dfinf;
  if (has_dfinal) dfinf = as_f32(*dfinal_states);
  const auto f32 = x.options().dtype(at::kFloat);

  SelectiveScanBwdParams prm{};
  in.fill(prm, dt_softplus, dt_min, dt_max);
  const int64_t ntiles = selective_scan_bwd_row_tiles(prm), slots = selective_scan_bwd_state_slots(prm);
  prm.window_tokens = selective_scan_bwd_window_tokens(prm);
  at::Tensor dx = at::empty_like(in.x), ddt = at::empty({b, l, h}, f32);
  at::Tensor dB = at::empty({b, l, g, n}, f32), dC = at::empty({b, l, g, n}, f32);
  at::Tensor dA_partial = at::zeros({b, h, ntiles}, f32);
  at::Tensor dD_partial = D ? at::zeros({b, h, p}, f32) : at::Tensor();
  at::Tensor dz = z ? at::empty_like(*in.z) : at::Tensor();
  at::Tensor dinit = initial_states ? at::empty({b, h, p, n}, f32) : at::Tensor();

  prm.dout = doutc.data_ptr();
  prm.dfinal_states = ptr_or_null<float>(dfinf);
  prm.dx = dx.data_ptr();
  prm.dz = dz.defined() ? dz.data_ptr() : nullptr;
  prm.ddt = ddt.data_ptr<float>();
  prm.dB = dB.data_ptr<float>();
  prm.dC = dC.data_ptr<float>();
  prm.dA_partial = dA_partial.data_ptr<float>();
  prm.dD_partial = dD_partial.defined() ? dD_partial.data_ptr<float>() : nullptr;
  prm.dinitial_states = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
  if (b > 0 && h > 0 && p > 0 && l > 0) {
    const at::Tensor states = at::empty({b, h, slots, p, n}, f32);
    const at::Tensor dBC_partial = at::empty({2, ntiles, b, prm.window_tokens, h, n}, f32);
    const at::Tensor ddt_partial = at::empty({ntiles, b, l, h}, f32);
    prm.chunk_states = states.data_ptr<float>();
    prm.dB_partial = dBC_partial[0].data_ptr<float>();
    prm.dC_partial = dBC_partial[1].data_ptr<float>();
    prm.ddt_partial = ddt_partial.data_ptr<float>();
    check_launch(launch_selective_scan_bwd(prm, ctx.stream()), "selective_scan_bwd");
  } else {  // nothing flows through the scan: the state gradient passes to the initial state
    ddt.zero_();
    dB.zero_();
    dC.zero_();
    if (dinit.defined()) {
      if (dfinf && l == 0) dinit.copy_(*dfinf);
      else dinit.zero_();
    }
  }
  const auto empty = [&] { return at::empty({0}, f32); };
  at::Tensor dD = D ? dD_partial.sum(0) : empty();
  if (D && D->dim() == 1) dD = dD.sum(1);
  return {dx,
          ddt.to(dt.scalar_type()),
          dA_partial.sum({0, 2}).to(A.scalar_type()),
          dB.to(B.scalar_type()),
          dC.to(C.scalar_type()),
          D ? dD.to(D->scalar_type()) : empty(),
          z ? dz : empty(),
          dt_bias ? ddt.sum({0, 1}).to(dt_bias->scalar_type()) : empty(),
          initial_states ? dinit.to(initial_states->scalar_type()) : empty()};
}

}  // namespace h1r::cuda

#if !defined(H1R_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(h1r, CUDA, m) {
  m.impl("selective_scan_fwd", &h1r::cuda::selective_scan_fwd);
  m.impl("selective_scan_bwd", &h1r::cuda::selective_scan_bwd);
}
#endif
