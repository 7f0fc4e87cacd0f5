// Torch-facing glue of the CPU causal_conv1d kernels: argument checks (so that a direct torch.ops.h1r
// call can never read out of bounds), layout choice, allocation, and the small fp32 conversions of
// weight / bias / states (O(d w) or O(b d w) elements) so the SIMD kernels only template on x's dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/causal_conv1d.h"
#include "cpu/isa.h"

H1R_DECLARE_CPU_KERNEL(void, causal_conv1d_fwd_kernel, const h1r::cpu::CausalConv1dParams&);
H1R_DECLARE_CPU_KERNEL(void, causal_conv1d_bwd_kernel, const h1r::cpu::CausalConv1dParams&);
H1R_DECLARE_CPU_KERNEL(void, causal_conv1d_update_kernel, const h1r::cpu::CausalConv1dUpdateParams&);

namespace h1r {
namespace {

using cpu::CausalConv1dParams;
using cpu::ConvDtype;

ConvDtype conv_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return ConvDtype::bf16;
    case at::kHalf: return ConvDtype::f16;
    default: return ConvDtype::f32;
  }
}

// Channel-first when time has unit stride, channel-last when channels do; anything else is copied to
// channel-first.
bool is_channel_last(const at::Tensor& x) { return x.stride(2) != 1 && x.stride(1) == 1; }

at::Tensor in_supported_layout(const at::Tensor& x) {
  return (x.stride(2) == 1 || x.stride(1) == 1) ? x : x.contiguous();
}

// A tensor shaped like x in the given layout.
at::Tensor empty_in_layout(const at::Tensor& x, bool channel_last) {
  if (!channel_last) return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
}

// t in the given layout (a copy only when it is not already).
at::Tensor to_layout(const at::Tensor& t, bool channel_last) {
  if (!channel_last) return t.stride(2) == 1 ? t : t.contiguous();
  return t.stride(1) == 1 ? t : t.transpose(1, 2).contiguous().transpose(1, 2);
}

at::Tensor f32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

struct Checked {
  at::Tensor x, weight, bias, seq_idx, init;
};

Checked check_conv_args(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& initial_states) {
  check_shape(x_in, "x", {-1, -1, -1});
  check_float(x_in, "x");
  const int64_t b = x_in.size(0), d = x_in.size(1), l = x_in.size(2);
  check_shape(weight, "weight", {d, -1});
  check_float(weight, "weight");
  check_same_device(weight, "weight", x_in, "x");
  const int64_t w = weight.size(1);
  TORCH_CHECK_VALUE(w >= 2 && w <= 4, "argument 'weight': expected width 2, 3 or 4, got ", w);
  TORCH_CHECK_VALUE(l >= 1, "argument 'x': expected seqlen >= 1, got ", l);
  Checked c;
  c.x = in_supported_layout(x_in);
  c.weight = f32_contiguous(weight);
  if (bias && bias->defined()) {
    check_shape(*bias, "bias", {d});
    check_float(*bias, "bias");
    check_same_device(*bias, "bias", x_in, "x");
    c.bias = f32_contiguous(*bias);
  }
  if (seq_idx && seq_idx->defined()) {
    check_shape(*seq_idx, "seq_idx", {b, l});
    check_dtype(*seq_idx, "seq_idx", at::kInt);
    check_same_device(*seq_idx, "seq_idx", x_in, "x");
    c.seq_idx = seq_idx->contiguous();
  }
  if (initial_states && initial_states->defined()) {
    check_shape(*initial_states, "initial_states", {b, d, w - 1});
    check_float(*initial_states, "initial_states");
    check_same_device(*initial_states, "initial_states", x_in, "x");
    c.init = f32_contiguous(*initial_states);
  }
  return c;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

CausalConv1dParams make_params(const Checked& c, bool silu) {
  CausalConv1dParams p{};
  p.dtype = conv_dtype(c.x);
  p.batch = c.x.size(0);
  p.dim = c.x.size(1);
  p.seqlen = c.x.size(2);
  p.width = c.weight.size(1);
  p.channel_last = is_channel_last(c.x);
  p.silu = silu;
  p.x = c.x.data_ptr();
  p.x_stride_b = c.x.stride(0);
  p.x_stride_c = c.x.stride(1);
  p.x_stride_t = c.x.stride(2);
  p.weight = c.weight.data_ptr<float>();
  p.bias = ptr_or_null<float>(c.bias);
  p.seq_idx = ptr_or_null<int32_t>(c.seq_idx);
  p.initial_states = ptr_or_null<float>(c.init);
  return p;
}

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& seq_idx,
                                                         const std::optional<at::Tensor>& initial_states,
                                                         bool return_final_states, bool silu) {
  const Checked c = check_conv_args(x_in, weight, bias, seq_idx, initial_states);
  CausalConv1dParams p = make_params(c, silu);
  at::Tensor out = empty_in_layout(c.x, p.channel_last);
  p.out = out.data_ptr();
  p.out_stride_b = out.stride(0);
  p.out_stride_c = out.stride(1);
  p.out_stride_t = out.stride(2);
  at::Tensor final_f32;
  if (return_final_states) {
    final_f32 = at::empty({p.batch, p.dim, p.width - 1}, x_in.options().dtype(at::kFloat));
    p.final_states = final_f32.data_ptr<float>();
  }
  H1R_CPU_DISPATCH(causal_conv1d_fwd_kernel, p);
  at::Tensor final_states = return_final_states ? final_f32.to(x_in.scalar_type()) : empty_like_none(x_in);
  return {out, final_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cpu(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dfinal_states, const at::Tensor& x_in,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& seq_idx,
    const std::optional<at::Tensor>& initial_states, bool silu) {
  const Checked c = check_conv_args(x_in, weight, bias, seq_idx, initial_states);
  CausalConv1dParams p = make_params(c, silu);
  check_shape(dout_in, "dout", {p.batch, p.dim, p.seqlen});
  check_same_device(dout_in, "dout", x_in, "x");
  check_float(dout_in, "dout");
  // dout in x's dtype and layout (dx is written in that layout too)
  const at::Tensor dout = to_layout(dout_in.to(x_in.scalar_type()), p.channel_last);
  p.dout = dout.data_ptr();
  p.dout_stride_b = dout.stride(0);
  p.dout_stride_c = dout.stride(1);
  p.dout_stride_t = dout.stride(2);
  at::Tensor dfinal;
  if (dfinal_states && dfinal_states->defined() && dfinal_states->numel() > 0) {
    check_shape(*dfinal_states, "dfinal_states", {p.batch, p.dim, p.width - 1});
    check_same_device(*dfinal_states, "dfinal_states", x_in, "x");
    check_float(*dfinal_states, "dfinal_states");
    dfinal = f32_contiguous(*dfinal_states);
    p.dfinal_states = dfinal.data_ptr<float>();
  }
  at::Tensor dx = empty_in_layout(c.x, p.channel_last);
  p.out = dx.data_ptr();
  p.out_stride_b = dx.stride(0);
  p.out_stride_c = dx.stride(1);
  p.out_stride_t = dx.stride(2);
  const auto f32 = x_in.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({p.dim, p.width}, f32);
  p.dweight = dweight.data_ptr<float>();
  at::Tensor dbias, dinit;
  if (c.bias.defined()) {
    dbias = at::empty({p.dim}, f32);
    p.dbias = dbias.data_ptr<float>();
  }
  if (c.init.defined()) {
    dinit = at::empty({p.batch, p.dim, p.width - 1}, f32);
    p.dinitial_states = dinit.data_ptr<float>();
  }
  H1R_CPU_DISPATCH(causal_conv1d_bwd_kernel, p);
  return {dx, dweight.to(weight.scalar_type()),
          c.bias.defined() ? dbias.to(bias->scalar_type()) : empty_like_none(x_in),
          c.init.defined() ? dinit.to(initial_states->scalar_type()) : empty_like_none(x_in)};
}

// The decode step. This glue accepts what the public API does without a Python-side copy (the API's
// fast path calls it directly): x (b, d) or (b, d, l) with any strides, weight (d, w) or nn.Conv1d's
// (d, 1, w), weight / bias in fp32 or in x's dtype (read as they are), conv_state_indices int32 or int64.
at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, bool silu,
                                    const std::optional<at::Tensor>& conv_state_indices) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "argument 'x': expected shape (b, d) or (b, d, l), got ",
                    shape_str(x.sizes()));
  check_float(x, "x");
  const int64_t b = x.size(0), d = x.size(1), l = x.dim() == 3 ? x.size(2) : 1;
  if (weight.dim() == 3) check_shape(weight, "weight", {d, 1, -1});
  else check_shape(weight, "weight", {d, -1});
  check_float(weight, "weight");
  check_same_device(weight, "weight", x, "x");
  const int64_t w = weight.size(-1);
  TORCH_CHECK_VALUE(w >= 2 && w <= 4, "argument 'weight': expected width 2, 3 or 4, got ", w);
  check_shape(conv_state, "conv_state", {-1, d, -1});
  check_same_device(conv_state, "conv_state", x, "x");
  check_dtype(conv_state, "conv_state", x.scalar_type());
  const int64_t num_states = conv_state.size(0), state_len = conv_state.size(2);
  TORCH_CHECK_VALUE(state_len >= w - 1, "argument 'conv_state': expected state_len >= width - 1 = ", w - 1, ", got ",
                    state_len);
  const bool has_bias = bias && bias->defined();
  if (has_bias) {
    check_shape(*bias, "bias", {d});
    check_float(*bias, "bias");
    check_same_device(*bias, "bias", x, "x");
  }
  const bool has_indices = conv_state_indices && conv_state_indices->defined();
  if (has_indices) {
    const at::Tensor& idx = *conv_state_indices;
    check_shape(idx, "conv_state_indices", {b});
    TORCH_CHECK_VALUE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
                      "argument 'conv_state_indices': expected dtype int32 or int64, got ", idx.scalar_type());
    check_same_device(idx, "conv_state_indices", x, "x");
    for (int64_t i = 0; i < b; ++i) {
      const int64_t row = idx.scalar_type() == at::kLong ? idx.data_ptr<int64_t>()[i * idx.stride(0)]
                                                         : idx.data_ptr<int32_t>()[i * idx.stride(0)];
      TORCH_CHECK_VALUE(row < num_states, "argument 'conv_state_indices': index ", row, " at position ", i,
                        " is out of range for conv_state with ", num_states, " rows");
    }
  } else {
    TORCH_CHECK_VALUE(num_states >= b, "argument 'conv_state': expected at least b = ", b, " rows, got ", num_states);
  }
  // weight and bias as they are when both are in x's dtype or both fp32, else both converted to fp32
  const auto xt = x.scalar_type();
  const bool same = weight.scalar_type() == xt && (!has_bias || bias->scalar_type() == xt);
  const bool f32 = weight.scalar_type() == at::kFloat && (!has_bias || bias->scalar_type() == at::kFloat);
  const bool params_f32 = f32 || !same;
  const auto pt = params_f32 ? at::kFloat : xt;
  const at::Tensor weight_c = weight.to(pt).contiguous();
  const at::Tensor bias_c = has_bias ? bias->to(pt).contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options());

  cpu::CausalConv1dUpdateParams p{};
  p.dtype = conv_dtype(x);
  p.params_f32 = params_f32;
  p.batch = b;
  p.dim = d;
  p.seqlen = l;
  p.width = w;
  p.state_len = state_len;
  p.num_states = num_states;
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_stride_b = x.stride(0);
  p.x_stride_c = x.stride(1);
  p.x_stride_t = x.dim() == 3 ? x.stride(2) : 1;
  p.out = out.data_ptr();
  p.conv_state = conv_state.data_ptr();
  p.state_stride_b = conv_state.stride(0);
  p.state_stride_c = conv_state.stride(1);
  p.state_stride_t = conv_state.stride(2);
  p.weight = weight_c.data_ptr();
  p.bias = has_bias ? bias_c.data_ptr() : nullptr;
  if (has_indices) {
    p.conv_state_indices = conv_state_indices->data_ptr();
    p.indices_i64 = conv_state_indices->scalar_type() == at::kLong;
    p.indices_stride = conv_state_indices->stride(0);
  }
  H1R_CPU_DISPATCH(causal_conv1d_update_kernel, p);
  return out;
}

}  // namespace
}  // namespace h1r

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("causal_conv1d_fwd", &h1r::causal_conv1d_fwd_cpu);
  m.impl("causal_conv1d_bwd", &h1r::causal_conv1d_bwd_cpu);
  m.impl("causal_conv1d_update", &h1r::causal_conv1d_update_cpu);
}
