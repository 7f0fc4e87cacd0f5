// CPU glue of the lm head fused with cross entropy / log-probs / entropy.
//
// The tokens are processed in chunks so that the full (T, V) logits never exist (Liger's fused
// linear cross entropy). Per chunk of n tokens:
//   x      = hidden[chunk] @ weight^T (+ bias)          at::mm / at::addmm into a reused (n, V) buffer
//                                                     (oneDNN; AMX for bf16)
//   rows   softmax statistics, losses, and dL/dx written over x in place   (cross_entropy_kernels.cpp)
//   grads  grad_hidden[chunk] = dx @ weight;  grad_weight += dx^T @ hidden[chunk];  grad_bias += sum dx
// The chunk size comes from a memory budget (128 MiB of logits, see chunk_rows) rather than Liger's
// "about the size of hidden", which on a CPU gives chunks too short for the matmuls to stay compute-bound.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/cross_entropy_params.h"
#include "cpu/isa.h"

H1R_DECLARE_CPU_KERNEL(void, ce_rows_fwd_kernel, const h1r::cpu::CeRowsParams&);
H1R_DECLARE_CPU_KERNEL(void, ce_rows_bwd_kernel, const h1r::cpu::CeRowsParams&);
H1R_DECLARE_CPU_KERNEL(void, logprobs_rows_fwd_kernel, const h1r::cpu::CeRowsParams&);
H1R_DECLARE_CPU_KERNEL(void, logprobs_rows_bwd_kernel, const h1r::cpu::CeRowsParams&);

namespace h1r::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

CeDtype ce_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return CeDtype::bf16;
    case at::kHalf: return CeDtype::f16;
    default: return CeDtype::f32;
  }
}

// Checks shared by every op of the family; returns (T, V).
std::pair<int64_t, int64_t> check_lm_head(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                                          const OptTensor& bias, int64_t ignore_index) {
  check_float(hidden, "hidden");
  check_shape(hidden, "hidden", {-1, -1});
  check_contiguous(hidden, "hidden");
  const int64_t T = hidden.size(0), d = hidden.size(1);
  check_input(weight, "weight", {-1, d}, hidden, "hidden");
  check_dtype(weight, "weight", hidden.scalar_type());
  const int64_t V = weight.size(0);
  TORCH_CHECK_VALUE(V > 0, "argument 'weight': expected at least one vocabulary row, got shape ",
                    shape_str(weight.sizes()));
  check_input(target, "target", {T}, hidden, "hidden");
  check_dtype(target, "target", at::kLong);
  if (bias) {
    check_input(*bias, "bias", {V}, hidden, "hidden");
    check_dtype(*bias, "bias", hidden.scalar_type());
  }
  if (T > 0) {
    const Tensor bad = (target != ignore_index) & ((target < 0) | (target >= V));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "argument 'target': expected class indices in [0, ", V,
                      ") or ignore_index (", ignore_index, "), got ",
                      target.masked_select(bad).slice(0, 0, 1).item<int64_t>());
  }
  return {T, V};
}

// The chunk's logits buffer (n x V, input dtype) is the only workspace beyond the returned gradients, so
// n is chosen from a memory budget: the largest power of two with n * V * esize <= kChunkBytes, but at
// least kMinChunkRows and at most T.
//
// Why not smaller: every chunk streams the whole weight through two matmuls (logits = h W^T and
// dhidden = dx W) and reads and writes the whole weight gradient once (dW += dx^T h): 4 V d esize bytes
// of traffic for 6 n V d flops, i.e. 1.5 n / esize flops per byte. This machine class does ~1.4 TFLOP/s
// (bf16, AMX) or ~0.33 TFLOP/s (fp32) over ~25 GB/s, so that traffic costs ~15% of the chunk's time at
// 512 rows (bf16) and ~14% at 256 rows (fp32) where it does not overlap the compute, doubling with each
// halving of n. Measured at d 3072,
// V 32768, T 1024 (bf16, fwd+bwd vs eager): 32 rows 3.3x eager's time, 128 rows 1.2x, 256 rows 0.93x,
// 512 rows 0.83x; at V 130048, T 1024 (fp32, shared machine): 128 rows 1.22x the time of 512 rows.
// The budget gives 256 fp32 / 512 bf16 rows at V 130048 (127 MiB): at 4096 tokens the eager path holds
// three (T, V) fp32 tensors (6 GiB) at its peak, so the chunk is ~2% of that.
constexpr int64_t kChunkBytes = int64_t{128} << 20;
constexpr int64_t kMinChunkRows = 64;

int64_t chunk_rows(int64_t T, int64_t V, int64_t esize) {
  if (const char* env = std::getenv("H1R_CE_CHUNK")) {  // for experiments and tests
    const int64_t n = std::atoll(env);
    if (n > 0) return std::min(n, std::max<int64_t>(T, 1));
  }
  const int64_t fit = kChunkBytes / std::max<int64_t>(V * esize, 1);
  int64_t n = 1;
  while (2 * n <= fit) n <<= 1;
  n = std::max(n, kMinChunkRows);
  return std::max<int64_t>(std::min(n, T), 1);
}

// Runs `rows(params)` on every chunk's logits and, when grads is set, accumulates the gradients from
// the dL/dx the row kernel left in the buffer.
struct Grads {
  Tensor hidden, weight, bias;  // bias: fp32 accumulator (V,) or undefined
};

template <typename RowsFn>
void for_each_chunk(const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& target,
                    CeRowsParams base, Grads* grads, RowsFn&& rows) {
  const int64_t T = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  if (T == 0) return;
  const int64_t n_max = chunk_rows(T, V, hidden.element_size());
  Tensor buffer = at::empty({n_max, V}, hidden.options());
  const Tensor wt = weight.t();
  for (int64_t start = 0; start < T; start += n_max) {
    const int64_t n = std::min(n_max, T - start);
    const Tensor h = hidden.narrow(0, start, n);
    Tensor x = buffer.narrow(0, 0, n);
    if (bias) at::addmm_out(x, *bias, h, wt);
    else at::mm_out(x, h, wt);

    CeRowsParams p = base;
    p.logits = x.data_ptr();
    p.dtype = ce_dtype(x);
    p.rows = n;
    p.V = V;
    p.target = target.data_ptr<int64_t>() + start;
    rows(p, start);

    if (grads) {
      Tensor gh = grads->hidden.narrow(0, start, n);
      at::mm_out(gh, x, weight);
      grads->weight.addmm_(x.t(), h);
      if (grads->bias.defined()) grads->bias.add_(x.sum(0, /*keepdim=*/false, at::kFloat));
    }
  }
}

Grads make_grads(const Tensor& hidden, const Tensor& weight, const OptTensor& bias) {
  Grads g;
  g.hidden = at::empty_like(hidden);
  g.weight = at::zeros_like(weight);
  if (bias) g.bias = at::zeros({weight.size(0)}, hidden.options().dtype(at::kFloat));
  return g;
}

std::tuple<Tensor, Tensor, Tensor> finish_grads(Grads& g, const Tensor& hidden, const OptTensor& bias) {
  Tensor gb = bias ? g.bias.to(bias->scalar_type()) : empty_like_none(hidden);
  return {g.hidden, g.weight, gb};
}

// The row kernels' parameters common to all chunks (the log-probs ops have no smoothing and no z-loss).
CeRowsParams rows_params(int64_t ignore_index, double scale, bool write_grad, double label_smoothing = 0.0,
                         double z_loss_scale = 0.0) {
  CeRowsParams p;
  p.ignore_index = ignore_index;
  p.scale = static_cast<float>(scale);
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss_scale = static_cast<float>(z_loss_scale);
  p.write_grad = write_grad;
  return p;
}

// ---------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_linear_cross_entropy_fwd(
    const Tensor& hidden, const Tensor& weight, const Tensor& target, const OptTensor& bias, int64_t ignore_index,
    double label_smoothing, double z_loss_scale, double logit_scale, int64_t reduction, bool compute_grad) {
  const auto [T, V] = check_lm_head(hidden, weight, target, bias, ignore_index);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum,
                    "argument 'reduction': expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1,
                    "argument 'label_smoothing': expected a value in [0, 1], got ", label_smoothing);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor loss_rows = at::empty({T}, f32), z_rows = at::empty({T}, f32), lse = at::empty({T}, f32);

  // 'mean' weights every non-ignored token by 1 / count (0 tokens: loss 0, gradients 0).
  double weight_of_row = 1.0;
  if (reduction == kMean) {
    const int64_t n_valid = (target != ignore_index).sum().item<int64_t>();
    weight_of_row = 1.0 / std::max<int64_t>(n_valid, 1);
  }

  CeRowsParams base = rows_params(ignore_index, logit_scale, compute_grad, label_smoothing, z_loss_scale);
  base.grad_scale = static_cast<float>(weight_of_row);

  std::optional<Grads> grads;
  if (compute_grad) grads = make_grads(hidden, weight, bias);
  for_each_chunk(hidden, weight, bias, target, base, grads ? &*grads : nullptr, [&](CeRowsParams& p, int64_t s) {
    p.loss = loss_rows.data_ptr<float>() + s;
    p.z_loss = z_rows.data_ptr<float>() + s;
    p.lse = lse.data_ptr<float>() + s;
    H1R_CPU_DISPATCH(ce_rows_fwd_kernel, p);
  });

  Tensor loss = loss_rows, z_loss = z_rows;
  if (reduction != kNone) {
    loss = loss_rows.sum() * weight_of_row;
    z_loss = z_rows.sum() * weight_of_row;
  }
  Tensor gh = empty_like_none(hidden), gw = empty_like_none(hidden), gb = empty_like_none(hidden);
  if (grads) std::tie(gh, gw, gb) = finish_grads(*grads, hidden, bias);
  return {loss, z_loss, lse, gh, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> fused_linear_cross_entropy_bwd(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight, const Tensor& target,
    const OptTensor& bias, const Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss_scale,
    double logit_scale) {
  const auto [T, V] = check_lm_head(hidden, weight, target, bias, ignore_index);
  check_input(grad_loss, "grad_loss", {T}, hidden, "hidden");
  check_dtype(grad_loss, "grad_loss", at::kFloat);
  check_input(lse, "lse", {T}, hidden, "hidden");
  check_dtype(lse, "lse", at::kFloat);
  const CeRowsParams base = rows_params(ignore_index, logit_scale, true, label_smoothing, z_loss_scale);
  Grads grads = make_grads(hidden, weight, bias);
  for_each_chunk(hidden, weight, bias, target, base, &grads, [&](CeRowsParams& p, int64_t s) {
    p.grad_rows = grad_loss.data_ptr<float>() + s;
    p.lse_in = lse.data_ptr<float>() + s;
    H1R_CPU_DISPATCH(ce_rows_bwd_kernel, p);
  });
  return finish_grads(grads, hidden, bias);
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(temperature > 0, "argument 'temperature': expected a positive number, got ", temperature);
}

std::tuple<Tensor, Tensor, Tensor> fused_linear_logprobs_fwd(const Tensor& hidden, const Tensor& weight,
                                                             const Tensor& target, const OptTensor& bias,
                                                             double temperature, double logit_scale,
                                                             int64_t ignore_index) {
  const auto [T, V] = check_lm_head(hidden, weight, target, bias, ignore_index);
  check_temperature(temperature);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor logprobs = at::empty({T}, f32), entropy = at::empty({T}, f32), lse = at::empty({T}, f32);
  const CeRowsParams base = rows_params(ignore_index, logit_scale / temperature, false);
  for_each_chunk(hidden, weight, bias, target, base, nullptr, [&](CeRowsParams& p, int64_t s) {
    p.logprobs = logprobs.data_ptr<float>() + s;
    p.entropy = entropy.data_ptr<float>() + s;
    p.lse = lse.data_ptr<float>() + s;
    H1R_CPU_DISPATCH(logprobs_rows_fwd_kernel, p);
  });
  return {logprobs, entropy, lse};
}

std::tuple<Tensor, Tensor, Tensor> fused_linear_logprobs_bwd(const OptTensor& dlogprobs, const OptTensor& dentropy,
                                                             const Tensor& hidden, const Tensor& weight,
                                                             const Tensor& target, const OptTensor& bias,
                                                             double temperature, double logit_scale,
                                                             int64_t ignore_index, const Tensor& lse) {
  const auto [T, V] = check_lm_head(hidden, weight, target, bias, ignore_index);
  check_temperature(temperature);
  for (auto [t, name] : {std::pair{&dlogprobs, "dlogprobs"}, std::pair{&dentropy, "dentropy"}}) {
    if (*t) {
      check_input(**t, name, {T}, hidden, "hidden");
      check_dtype(**t, name, at::kFloat);
    }
  }
  check_input(lse, "lse", {T}, hidden, "hidden");
  check_dtype(lse, "lse", at::kFloat);
  const CeRowsParams base = rows_params(ignore_index, logit_scale / temperature, true);
  Grads grads = make_grads(hidden, weight, bias);
  for_each_chunk(hidden, weight, bias, target, base, &grads, [&](CeRowsParams& p, int64_t s) {
    p.grad_rows = dlogprobs ? dlogprobs->data_ptr<float>() + s : nullptr;
    p.grad_entropy = dentropy ? dentropy->data_ptr<float>() + s : nullptr;
    p.lse_in = lse.data_ptr<float>() + s;
    H1R_CPU_DISPATCH(logprobs_rows_bwd_kernel, p);
  });
  return finish_grads(grads, hidden, bias);
}

}  // namespace
}  // namespace h1r::cpu

TORCH_LIBRARY_IMPL(h1r, CPU, m) {
  m.impl("fused_linear_cross_entropy_fwd", &h1r::cpu::fused_linear_cross_entropy_fwd);
  m.impl("fused_linear_cross_entropy_bwd", &h1r::cpu::fused_linear_cross_entropy_bwd);
  m.impl("fused_linear_logprobs_fwd", &h1r::cpu::fused_linear_logprobs_fwd);
  m.impl("fused_linear_logprobs_bwd", &h1r::cpu::fused_linear_logprobs_bwd);
}
