// CPU glue of the selective-scan family: argument checks, allocation, dispatch to the per-ISA kernels
// (csrc/cpu/selective_scan_kernels.cpp). Schemas: csrc/registration.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>
#include <tuple>

#include "checks.h"
#include "cpu/amx.h"
#include "cpu/isa.h"
#include "cpu/selective_scan_params.h"

using h1r::cpu::ScanDtype;
using h1r::cpu::ScanParams;
using h1r::cpu::StateUpdateParams;

H1R_DECLARE_CPU_KERNEL(void, selective_scan_fwd_kernel, const h1r::cpu::ScanParams&);
H1R_DECLARE_CPU_KERNEL(void, selective_scan_bwd_kernel, const h1r::cpu::ScanParams&);
H1R_DECLARE_CPU_KERNEL(void, selective_state_update_kernel, const h1r::cpu::StateUpdateParams&);

namespace {

using at::Tensor;
using c10::optional;

ScanDtype scan_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScanDtype::f32;
    case at::kBFloat16: return ScanDtype::bf16;
    default: return ScanDtype::f16;
  }
}

// An optional fp32 parameter of fixed shape (A, D, dt_bias, initial states): checked, made fp32 contiguous.
optional<Tensor> fp32_param(const optional<Tensor>& t, const char* name, std::initializer_list<int64_t> shape,
                            const Tensor& ref) {
  if (!t.has_value()) return c10::nullopt;
  h1r::check_shape(*t, name, shape);
  h1r::check_same_device(*t, name, ref, "x");
  h1r::check_float(*t, name);
  return t->to(at::kFloat).contiguous();
}

// An optional input in x's dtype: checked for shape, dtype and device, made contiguous.
optional<Tensor> like_x(const optional<Tensor>& t, const char* name, std::initializer_list<int64_t> shape,
                        const Tensor& x) {
  if (!t.has_value()) return c10::nullopt;
  h1r::check_shape(*t, name, shape);
  h1r::check_same_device(*t, name, x, "x");
  h1r::check_dtype(*t, name, x.scalar_type());
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}
const void* vptr_or_null(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// The checked, normalized arguments of a scan call and the kernel parameters pointing into them.
struct ScanArgs {
  Tensor x, dt, B, C;
  optional<Tensor> A, D, z, dt_bias, init, seq;
  ScanParams prm{};

  ScanArgs(const Tensor& x_, const Tensor& dt_, const Tensor& A_, const Tensor& B_, const Tensor& C_, int64_t chunk,
           const optional<Tensor>& D_, const optional<Tensor>& z_, const optional<Tensor>& dt_bias_,
           const optional<Tensor>& init_, const optional<Tensor>& seq_, bool softplus, double dt_min, double dt_max) {
    h1r::check_float(x_, "x");
    TORCH_CHECK_VALUE(x_.dim() == 4, "argument 'x': expected shape (b, l, h, p), got ", h1r::shape_str(x_.sizes()));
    const int64_t b = x_.size(0), l = x_.size(1), h = x_.size(2), p = x_.size(3);
    TORCH_CHECK_VALUE(B_.dim() == 4, "argument 'B': expected shape (b, l, g, n), got ", h1r::shape_str(B_.sizes()));
    const int64_t g = B_.size(2), n = B_.size(3);
    TORCH_CHECK_VALUE(g > 0 && h % g == 0, "argument 'B': the number of groups ", g, " must divide nheads ", h);
    TORCH_CHECK_VALUE(chunk > 0, "argument 'chunk_size': expected a positive integer, got ", chunk);
    x = x_.contiguous();
    dt = *like_x(dt_, "dt", {b, l, h}, x);
    B = *like_x(B_, "B", {b, l, g, n}, x);
    C = *like_x(C_, "C", {b, l, g, n}, x);
    A = fp32_param(A_, "A", {h}, x);
    D = fp32_param(D_, "D", {h, p}, x);
    z = like_x(z_, "z", {b, l, h, p}, x);
    dt_bias = fp32_param(dt_bias_, "dt_bias", {h}, x);
    init = fp32_param(init_, "initial_states", {b, h, p, n}, x);
    if (seq_.has_value()) {
      h1r::check_shape(*seq_, "seq_idx", {b, l});
      h1r::check_same_device(*seq_, "seq_idx", x, "x");
      h1r::check_dtype(*seq_, "seq_idx", at::kInt);
      seq = seq_->contiguous();
    }
    prm.batch = b; prm.seqlen = l; prm.nheads = h; prm.headdim = p; prm.ngroups = g; prm.dstate = n;
    prm.chunk = chunk;
    prm.dtype = scan_dtype(x);
    prm.x = x.data_ptr(); prm.dt = dt.data_ptr(); prm.A = A->data_ptr<float>();
    prm.B = B.data_ptr(); prm.C = C.data_ptr();
    prm.D = ptr_or_null<float>(D); prm.z = vptr_or_null(z); prm.dt_bias = ptr_or_null<float>(dt_bias);
    prm.initial_states = ptr_or_null<float>(init); prm.seq_idx = ptr_or_null<int32_t>(seq);
    prm.dt_softplus = softplus;
    prm.dt_min = static_cast<float>(dt_min);
    prm.dt_max = dt_max >= (double)std::numeric_limits<float>::max() ? std::numeric_limits<float>::infinity()
                                                                    : static_cast<float>(dt_max);
  }
  int64_t nchunks() const { return (prm.seqlen + prm.chunk - 1) / prm.chunk; }
  // Whether the forward's bf16 chunk products may run on AMX tiles: whole 32-step blocks of the chunk (the
  // last chunk is zero-padded) and of the state, whole 16-column tiles of the head (other shapes: fp32).
  bool scan_amx() const {
    return prm.dtype == ScanDtype::bf16 && prm.chunk % 32 == 0 && prm.dstate % 32 == 0 && prm.headdim % 16 == 0 &&
           h1r::cpu::amx_usable();
  }
  // Scratch of the "bmm" stage: CB per (batch, group, chunk), and fp32 copies of B, C for 16-bit inputs
  // (not read by the AMX path, which multiplies the bf16 inputs themselves).
  std::vector<Tensor> scratch() {
    const auto f32 = x.options().dtype(at::kFloat);
    std::vector<Tensor> t{at::empty({prm.batch, prm.ngroups, nchunks(), prm.chunk, prm.chunk}, f32)};
    prm.cb = t[0].data_ptr<float>();
    if (prm.dtype != ScanDtype::f32 && !prm.amx) {
      t.push_back(at::empty(B.sizes(), f32));
      t.push_back(at::empty(C.sizes(), f32));
      prm.B32 = t[1].data_ptr<float>();
      prm.C32 = t[2].data_ptr<float>();
    }
    return t;
  }
};

std::tuple<Tensor, Tensor> selective_scan_fwd_cpu(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                                                  const Tensor& C, int64_t chunk_size, const optional<Tensor>& D,
                                                  const optional<Tensor>& z, const optional<Tensor>& dt_bias,
                                                  const optional<Tensor>& initial_states,
                                                  const optional<Tensor>& seq_idx, bool dt_softplus, double dt_min,
                                                  double dt_max) {
  ScanArgs a(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max);
  const auto& p = a.prm;
  Tensor out = at::empty_like(a.x);
  Tensor final_states = at::empty({p.batch, p.nheads, p.headdim, p.dstate}, a.x.options().dtype(at::kFloat));
  if (p.seqlen == 0) {
    if (a.init.has_value()) final_states.copy_(*a.init); else final_states.zero_();
    return {out, final_states};
  }
  a.prm.amx = a.scan_amx();
  auto scratch = a.scratch();
  a.prm.out = out.data_ptr();
  a.prm.final_states = final_states.data_ptr<float>();
  H1R_CPU_DISPATCH(selective_scan_fwd_kernel, a.prm);
  return {out, final_states};
}

// Gradients for every input, in each input's dtype (empty where the input was absent).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cpu(
    const Tensor& dout, const optional<Tensor>& dfinal_states, const Tensor& x, const Tensor& dt, const Tensor& A,
    const Tensor& B, const Tensor& C, int64_t chunk_size, const optional<Tensor>& D, const optional<Tensor>& z,
    const optional<Tensor>& dt_bias, const optional<Tensor>& initial_states, const optional<Tensor>& seq_idx,
    bool dt_softplus, double dt_min, double dt_max) {
  ScanArgs a(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max);
  auto& p = a.prm;
  const int64_t b = p.batch, l = p.seqlen, h = p.nheads, hp = p.headdim, g = p.ngroups, n = p.dstate;
  Tensor dout_c = *like_x(dout, "dout", {b, l, h, hp}, a.x);
  auto dfin = fp32_param(dfinal_states, "dfinal_states", {b, h, hp, n}, a.x);
  const auto f32 = a.x.options().dtype(at::kFloat);
  Tensor dx = at::zeros({b, l, h, hp}, f32), ddt = at::zeros({b, l, h}, f32);
  Tensor dA = at::zeros({b, h}, f32), dBh = at::zeros({b, l, h, n}, f32), dCh = at::zeros({b, l, h, n}, f32);
  Tensor dD = a.D.has_value() ? at::zeros({b, h, hp}, f32) : Tensor();
  Tensor dz = a.z.has_value() ? at::zeros({b, l, h, hp}, f32) : Tensor();
  Tensor dbias = a.dt_bias.has_value() ? at::zeros({b, h}, f32) : Tensor();
  Tensor dinit = a.init.has_value() ? at::zeros({b, h, hp, n}, f32) : Tensor();
  if (l > 0) {
    auto scratch = a.scratch();
    Tensor states = at::empty({b, h, a.nchunks(), n, hp}, f32);
    p.chunk_states = states.data_ptr<float>();
    p.dout = dout_c.data_ptr();
    p.dfinal_states = ptr_or_null<float>(dfin);
    p.dx = dx.data_ptr<float>(); p.ddt = ddt.data_ptr<float>(); p.dA = dA.data_ptr<float>();
    p.dB = dBh.data_ptr<float>(); p.dC = dCh.data_ptr<float>();
    p.dD = dD.defined() ? dD.data_ptr<float>() : nullptr;
    p.dz = dz.defined() ? dz.data_ptr<float>() : nullptr;
    p.ddt_bias = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
    p.dinitial_states = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
    H1R_CPU_DISPATCH(selective_scan_bwd_kernel, p);
  } else if (dinit.defined() && dfin.has_value()) {
    dinit.copy_(*dfin);
  }
  // Per-head dB, dC summed over the heads of each group; per-batch partial sums of the parameters.
  auto like = [&](const Tensor& grad, const c10::optional<Tensor>& input) {
    return input.has_value() ? grad.to(input->scalar_type()) : at::empty({0}, f32);
  };
  return {dx.to(x.scalar_type()),
          ddt.to(dt.scalar_type()),
          dA.sum(0).to(A.scalar_type()),
          dBh.view({b, l, g, h / g, n}).sum(3).to(B.scalar_type()),
          dCh.view({b, l, g, h / g, n}).sum(3).to(C.scalar_type()),
          D.has_value() ? dD.sum(0).to(D->scalar_type()) : at::empty({0}, f32),
          like(dz, z),
          dt_bias.has_value() ? dbias.sum(0).to(dt_bias->scalar_type()) : at::empty({0}, f32),
          like(dinit, initial_states)};
}

// Whether t's dimensions after the first (the batch) are contiguous: the decode step's kernel takes any
// batch stride (row views of a projection's output), so only other layouts are copied.
bool rows_contiguous(const Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// A decode-step input in dtype `dtype` with contiguous rows (any batch stride), copied only where needed.
Tensor with_contiguous_rows(const Tensor& t, at::ScalarType dtype) {
  Tensor r = t.to(dtype);
  return rows_contiguous(r) ? r : r.contiguous();
}

// A decode-step input converted to x's dtype (the public API's normalization, done here so that its fast
// path can call this glue directly): checked for shape, float dtype and device, rows made contiguous.
optional<Tensor> in_x_dtype(const optional<Tensor>& t, const char* name, std::initializer_list<int64_t> shape,
                            const Tensor& x) {
  if (!t.has_value()) return c10::nullopt;
  h1r::check_shape(*t, name, shape);
  h1r::check_same_device(*t, name, x, "x");
  h1r::check_float(*t, name);
  return with_contiguous_rows(*t, x.scalar_type());
}

// Elements between batch rows of a (rows-contiguous) decode-step input; 0 for a batch of one row.
int64_t batch_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; }

// The decode step. Accepts what the public API does for the per-head (Mamba2) form without a Python-side
// copy: x, dt, B, C, z in any float dtype (converted to x's) and strides, D (h,) or (h, p),
// state_batch_indices int32 or int64. mamba_ssm's head-tied expansions (dt (b, h, p), A (h, p, n), ...)
// are sliced to that form by the public API.
Tensor selective_state_update_cpu(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                                  const Tensor& C, const optional<Tensor>& D, const optional<Tensor>& z,
                                  const optional<Tensor>& dt_bias, bool dt_softplus,
                                  const optional<Tensor>& state_batch_indices) {
  h1r::check_float(state, "state");
  h1r::check_float(x, "x");
  TORCH_CHECK_VALUE(state.dim() == 4, "argument 'state': expected shape (S, h, p, n), got ",
                    h1r::shape_str(state.sizes()));
  h1r::check_contiguous(state, "state");
  const int64_t S = state.size(0), h = state.size(1), p = state.size(2), n = state.size(3);
  TORCH_CHECK_VALUE(x.dim() == 3, "argument 'x': expected shape (b, h, p), got ", h1r::shape_str(x.sizes()));
  const int64_t b = x.size(0);
  h1r::check_shape(x, "x", {b, h, p});
  h1r::check_same_device(x, "x", state, "state");
  TORCH_CHECK_VALUE(B.dim() == 3, "argument 'B': expected shape (b, g, n), got ", h1r::shape_str(B.sizes()));
  const int64_t g = B.size(1);
  TORCH_CHECK_VALUE(g > 0 && h % g == 0, "argument 'B': the number of groups ", g, " must divide nheads ", h);
  Tensor xc = with_contiguous_rows(x, x.scalar_type());
  Tensor dtc = *in_x_dtype(dt, "dt", {b, h}, xc);
  Tensor Bc = *in_x_dtype(B, "B", {b, g, n}, xc);
  Tensor Cc = *in_x_dtype(C, "C", {b, g, n}, xc);
  auto Af = fp32_param(A, "A", {h}, xc);
  optional<Tensor> Df;
  if (D.has_value() && D->dim() == 1) Df = fp32_param(D, "D", {h}, xc)->unsqueeze(1).expand({h, p}).contiguous();
  else Df = fp32_param(D, "D", {h, p}, xc);
  auto zc = in_x_dtype(z, "z", {b, h, p}, xc);
  auto biasf = fp32_param(dt_bias, "dt_bias", {h}, xc);
  optional<Tensor> idx;
  if (state_batch_indices.has_value()) {
    h1r::check_shape(*state_batch_indices, "state_batch_indices", {b});
    TORCH_CHECK_VALUE(state_batch_indices->scalar_type() == at::kInt || state_batch_indices->scalar_type() == at::kLong,
                      "argument 'state_batch_indices': expected dtype int32 or int64, got ",
                      state_batch_indices->scalar_type());
    h1r::check_same_device(*state_batch_indices, "state_batch_indices", state, "state");
    // checked before the int32 conversion, so that no int64 index wraps into range (a loop on the host:
    // no reduction op per decode step)
    const Tensor& si = *state_batch_indices;
    const bool i64 = si.scalar_type() == at::kLong;
    for (int64_t i = 0; i < b; ++i) {
      const int64_t row = i64 ? si.data_ptr<int64_t>()[i * si.stride(0)] : si.data_ptr<int32_t>()[i * si.stride(0)];
      TORCH_CHECK_VALUE(row < S, "argument 'state_batch_indices': index ", row, " out of range for ", S,
                        " state rows");
    }
    idx = si.to(at::kInt).contiguous();
  } else {
    TORCH_CHECK_VALUE(b <= S, "argument 'state': expected at least b = ", b, " rows, got ", S);
  }
  Tensor out = at::empty({b, h, p}, xc.options());
  StateUpdateParams prm{};
  prm.batch = b; prm.nheads = h; prm.headdim = p; prm.ngroups = g; prm.dstate = n;
  prm.dtype = scan_dtype(xc); prm.state_dtype = scan_dtype(state);
  prm.state = state.data_ptr(); prm.x = xc.data_ptr(); prm.dt = dtc.data_ptr(); prm.A = Af->data_ptr<float>();
  prm.B = Bc.data_ptr(); prm.C = Cc.data_ptr(); prm.D = ptr_or_null<float>(Df); prm.z = vptr_or_null(zc);
  prm.dt_bias = ptr_or_null<float>(biasf); prm.dt_softplus = dt_softplus;
  prm.state_batch_indices = ptr_or_null<int32_t>(idx); prm.out = out.data_ptr();
  prm.x_bstride = batch_stride(xc); prm.dt_bstride = batch_stride(dtc);
  prm.B_bstride = batch_stride(Bc); prm.C_bstride = batch_stride(Cc);
  prm.z_bstride = zc.has_value() ? batch_stride(*zc) : 0;
  prm.hw_bf16 = h1r::cpu::cpu_has_avx512_bf16();
  if (b > 0) H1R_CPU_DISPATCH(selective_state_update_kernel, prm);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
  m.impl("selective_state_update", &selective_state_update_cpu);
}
