// Torch-facing glue of the causal conv1d kernels (causal_conv1d.cu): checks, allocation, stream, and the
// CUDA registration of h1r::causal_conv1d_fwd, h1r::causal_conv1d_bwd and h1r::causal_conv1d_update.
#include "causal_conv1d.h"

#include <torch/library.h>

#include "api.h"
#include "glue.h"

namespace h1r::cuda {

namespace {

// The taps of weight (d, w): 2, 3 or 4.
int64_t conv_width(const at::Tensor& weight, int64_t d) {
  check_shape(weight, "weight", {d, -1});
  const int64_t w = weight.size(1);
  TORCH_CHECK_VALUE(w >= 2 && w <= 4, "argument 'weight': expected width 2, 3 or 4, got ", w);
  return w;
}

// The checks shared by the forward and the backward; returns the width.
int64_t check_conv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& initial_states) {
  check_shape(x, "x", {-1, -1, -1});
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), w = conv_width(weight, d);
  if (bias) check_shape(*bias, "bias", {d});
  check_index(seq_idx, "seq_idx", {b, l});
  if (initial_states) check_shape(*initial_states, "initial_states", {b, d, w - 1});
  check_devices({{"x", x}, {"weight", weight}, {"bias", bias}, {"seq_idx", seq_idx}, {"initial_states", initial_states}});
  return w;
}

// The inputs as the kernels read them: x in its layout (channel-last (b, l, d) memory is kept as is,
// anything else made channel-first), the small ones in fp32.
struct ConvInputs {
  bool channel_last;
  at::Tensor x, weight;
  std::optional<at::Tensor> bias, initial_states, seq_idx;

  ConvInputs(const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
             const std::optional<at::Tensor>& seq_idx_, const std::optional<at::Tensor>& initial_states_)
      : channel_last(x_.stride(1) == 1 && x_.stride(2) != 1 && x_.stride(2) == x_.size(1) &&
                     x_.stride(0) == x_.size(1) * x_.size(2)),
        x(channel_last ? x_ : x_.contiguous()), weight(as_f32(weight_)), bias(as_f32(bias_)),
        initial_states(as_f32(initial_states_)), seq_idx(contiguous(seq_idx_)) {
    TORCH_CHECK_VALUE(channel_last || x.size(1) <= 65535,
                      "argument 'x': at most 65535 channels in the channel-first layout");
  }
  // t (b, d, l) in x's layout and dtype.
  at::Tensor like_x(const at::Tensor& t) const {
    const at::Tensor c = t.to(x.scalar_type());
    return channel_last ? c.transpose(1, 2).contiguous().transpose(1, 2) : c.contiguous();
  }

  void fill(CausalConv1dInputs& prm, bool silu) const {
    prm.x = x.data_ptr();
    prm.dtype = dtype_of(x, "x");
    prm.batch = x.size(0);
    prm.dim = x.size(1);
    prm.seqlen = x.size(2);
    prm.width = weight.size(1);
    prm.x_stride_b = x.stride(0);
    prm.x_stride_d = x.stride(1);
    prm.x_stride_l = x.stride(2);
    prm.weight = weight.data_ptr<float>();
    prm.bias = ptr_or_null<float>(bias);
    prm.seq_idx = ptr_or_null<int32_t>(seq_idx);
    prm.initial_states = ptr_or_null<float>(initial_states);
    prm.silu = silu;
    prm.channel_last = channel_last;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& seq_idx,
                                                     const std::optional<at::Tensor>& initial_states,
                                                     bool return_final_states, bool silu) {
  const int64_t w = check_conv_args(x, weight, bias, seq_idx, initial_states);
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2);
  dtype_of(x, "x");

  KernelContext ctx(x);
  const ConvInputs in(x, weight, bias, seq_idx, initial_states);
  const at::Tensor out = at::empty_like(in.x);  // same strides
  at::Tensor final_states = return_final_states ? at::empty({b, d, w - 1}, x.options()) : empty_like_none(x);

  CausalConv1dFwdParams prm{};
  in.fill(prm, silu);
  prm.out = out.data_ptr();
  prm.out_stride_b = out.stride(0);
  prm.out_stride_d = out.stride(1);
  prm.out_stride_l = out.stride(2);
  prm.final_states = return_final_states ? final_states.data_ptr() : nullptr;
  if (b > 0 && d > 0 && l > 0) check_launch(launch_causal_conv1d_fwd(prm, ctx.stream()), "causal_conv1d_fwd");
  else if (return_final_states && final_states.numel() > 0) {  // l == 0: the state is the initial one
    final_states.copy_(initial_states ? *initial_states : at::zeros_like(final_states));
  }
  return {out, final_states};
}

// Gradients of causal_conv1d_fwd: dx in x's layout and dtype, dweight / dbias / dinitial_states in the
// dtypes of weight / bias / initial_states (empty where those were absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_states, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& seq_idx,
    const std::optional<at::Tensor>& initial_states, bool silu) {
  const int64_t w = check_conv_args(x, weight, bias, seq_idx, initial_states);
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2);
  check_shape(dout, "dout", {b, d, l});
  const bool has_dfinal = dfinal_states && dfinal_states->numel() > 0;
  if (has_dfinal) check_shape(*dfinal_states, "dfinal_states", {b, d, w - 1});
  check_devices({{"dout", dout}, {"dfinal_states", dfinal_states}});
  check_float(dout, "dout");
  if (has_dfinal) check_float(*dfinal_states, "dfinal_states");
  dtype_of(x, "x");

  KernelContext ctx(x);
  // The layouts of the forward; dout is brought to x's layout and dtype (dx is written in it).
  const ConvInputs in(x, weight, bias, seq_idx, initial_states);
  const at::Tensor doutc = in.like_x(dout);
  const at::Tensor dx = at::empty_like(in.x);
  std::optional<at::Tensor> dfinf;
  if (has_dfinal) dfinf = as_f32(*dfinal_states);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::zeros({d, w}, f32);
  at::Tensor dbias = bias ? at::zeros({d}, f32) : at::Tensor();
  at::Tensor dinit = initial_states ? at::zeros({b, d, w - 1}, f32) : at::Tensor();

  CausalConv1dBwdParams prm{};
  in.fill(prm, silu);
  prm.dout = doutc.data_ptr();
  prm.dx = dx.data_ptr();
  prm.dout_stride_b = doutc.stride(0);
  prm.dout_stride_d = doutc.stride(1);
  prm.dout_stride_l = doutc.stride(2);
  prm.dx_stride_b = dx.stride(0);
  prm.dx_stride_d = dx.stride(1);
  prm.dx_stride_l = dx.stride(2);
  prm.dfinal_states = ptr_or_null<float>(dfinf);
  prm.dinitial_states = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
  prm.dweight = dweight.data_ptr<float>();
  prm.dbias = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
  if (b > 0 && d > 0 && l > 0) {
    const at::Tensor partials = at::empty({causal_conv1d_bwd_partials(prm), w + 1, d}, f32);
    prm.partials = partials.data_ptr<float>();
    check_launch(launch_causal_conv1d_bwd(prm, ctx.stream()), "causal_conv1d_bwd");
  } else if (dinit.defined() && dfinf) {  // l == 0: the final state is the initial one
    dinit.copy_(*dfinf);
  }
  return {dx, dweight.to(weight.scalar_type()), bias ? dbias.to(bias->scalar_type()) : empty_like_none(x),
          initial_states ? dinit.to(initial_states->scalar_type()) : empty_like_none(x)};
}

at::Tensor causal_conv1d_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu,
                                const std::optional<at::Tensor>& conv_state_indices) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "argument 'x': expected shape (b, d) or (b, d, l), got ",
                    shape_str(x.sizes()));
  const at::Tensor x3 = (x.dim() == 2 ? x.unsqueeze(-1) : x).contiguous();
  const int64_t b = x3.size(0), d = x3.size(1), l = x3.size(2), w = conv_width(weight, d);
  check_shape(conv_state, "conv_state", {-1, d, -1});
  TORCH_CHECK_VALUE(conv_state.size(2) >= w - 1, "argument 'conv_state': expected state_len >= w - 1 = ", w - 1,
                    ", got ", conv_state.size(2));
  check_state_cache(conv_state, "conv_state", conv_state_indices, "conv_state_indices", b);
  if (bias) check_shape(*bias, "bias", {d});
  check_devices({{"x", x}, {"conv_state", conv_state}, {"weight", weight}, {"bias", bias},
                 {"conv_state_indices", conv_state_indices}});

  KernelContext ctx(x);
  const at::Tensor out = at::empty_like(x3);
  const at::Tensor wf = as_f32(weight);
  const auto bf = as_f32(bias);
  const auto idx = contiguous(conv_state_indices);

  CausalConv1dUpdateParams prm{};
  prm.x = x3.data_ptr();
  prm.out = out.data_ptr();
  prm.dtype = dtype_of(x, "x");
  prm.conv_state = conv_state.data_ptr();
  prm.state_dtype = dtype_of(conv_state, "conv_state");
  prm.batch = b;
  prm.dim = d;
  prm.seqlen = l;
  prm.width = w;
  prm.state_len = conv_state.size(2);
  prm.state_rows = conv_state.size(0);
  prm.weight = wf.data_ptr<float>();
  prm.bias = ptr_or_null<float>(bf);
  prm.conv_state_indices = ptr_or_null<int32_t>(idx);
  prm.silu = silu;
  if (b > 0 && d > 0 && l > 0) check_launch(launch_causal_conv1d_update(prm, ctx.stream()), "causal_conv1d_update");
  return x.dim() == 2 ? out.squeeze(-1) : out;
}

}  // namespace h1r::cuda

#if !defined(H1R_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(h1r, CUDA, m) {
  m.impl("causal_conv1d_fwd", &h1r::cuda::causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &h1r::cuda::causal_conv1d_bwd);
  m.impl("causal_conv1d_update", &h1r::cuda::causal_conv1d_update);
}
#endif
