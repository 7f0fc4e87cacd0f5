// Per-row softmax statistics, losses and in-place dlogits for one chunk of the lm head's logits.
//
// Each row (token) is independent: rows are spread over OpenMP threads, and a row is swept with
// at::vec::Vectorized<float> (16 / 8 / 1 lanes for avx512 / avx2 / scalar builds), loading the
// input dtype and computing in fp32. A row of a 130k vocabulary is 260-520 KB, so it stays in L2
// between the sweeps:
//   sweep 1  m = max_j u_j                                   (u = x * scale)
//   sweep 2  s = sum_j e_j, e_j = exp(u_j - m);  lse = m + log s
//            and, only when needed, sum_j u_j (label smoothing) and sum_j e_j (u_j - m) (entropy)
//   sweep 3  (gradients) dx_j = c (p_j (alpha + beta u_j) + kappa) + c gamma [j == y],  p_j = exp(u_j - lse)
// Every gradient of this family has the form of sweep 3 (see the coefficients at the call sites), so a
// single writer serves cross entropy, log-probs and entropy, forward (Liger-style) and backward.
#include "cpu/vec_diagnostics.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/cross_entropy_params.h"
#include "cpu/float_io.h"

namespace h1r::cpu::H1R_ISA {
namespace {

// fp32 lanes and their widening loads / narrowing stores (load_f, store_f) are float_io.h's.
using Vec = VF;
constexpr int64_t kW = kLanes;

inline float reduce_max(const Vec& v) {
  float b[kW];
  v.store(b);
  float m = b[0];
  for (int64_t i = 1; i < kW; ++i) m = std::max(m, b[i]);
  return m;
}

inline float reduce_sum(const Vec& v) {
  float b[kW];
  v.store(b);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += b[i];
  return s;
}

struct RowStats {
  float lse;       // log sum_j exp(u_j)
  float sum_u;     // sum_j u_j                 (when asked)
  float mean_pu;   // sum_j p_j u_j - lse = -entropy  (when asked)
};

// Sweeps 1 and 2 over one row x (V,), u = x * scale.
template <typename T>
RowStats row_stats(const T* x, int64_t V, float scale, bool want_sum_u, bool want_entropy) {
  const int64_t Vv = V - V % kW;
  const Vec vs(scale);
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < Vv; j += kW) vmax = at::vec::maximum(vmax, load_f(x + j) * vs);
  float m = reduce_max(vmax);
  for (int64_t j = Vv; j < V; ++j) m = std::max(m, static_cast<float>(x[j]) * scale);

  const Vec vm(m);
  Vec vsum(0.f), vsum_u(0.f), vsum_eu(0.f);
  for (int64_t j = 0; j < Vv; j += kW) {
    const Vec u = load_f(x + j) * vs;
    const Vec e = (u - vm).exp();
    vsum = vsum + e;
    if (want_sum_u) vsum_u = vsum_u + u;
    if (want_entropy) vsum_eu = at::vec::fmadd(e, u - vm, vsum_eu);
  }
  float s = reduce_sum(vsum), su = reduce_sum(vsum_u), seu = reduce_sum(vsum_eu);
  for (int64_t j = Vv; j < V; ++j) {
    const float u = static_cast<float>(x[j]) * scale, e = std::exp(u - m);
    s += e;
    su += u;
    seu += e * (u - m);
  }
  const float log_s = std::log(s);
  // sum_j p_j u_j - lse = sum_j e_j (u_j - m) / s - log s: no cancellation of the (large) m.
  return {m + log_s, su, seu / s - log_s};
}

// Sweep 3: x_j <- c (p_j (alpha + beta u_j) + kappa) + c gamma [j == y], in place; u_y is the target's
// logit read before the sweep (x[y] is overwritten by it).
template <typename T>
void row_write_grad(T* x, int64_t V, float scale, float lse, float alpha, float beta, float kappa, float gamma,
                    int64_t y, float u_y) {
  const int64_t Vv = V - V % kW;
  const Vec vs(scale), vlse(lse), va(alpha), vb(beta), vk(kappa);
  const float c = scale;  // d u / d x
  const Vec vc(c);
  for (int64_t j = 0; j < Vv; j += kW) {
    const Vec u = load_f(x + j) * vs;
    const Vec p = (u - vlse).exp();
    store_f(x + j, vc * at::vec::fmadd(p, at::vec::fmadd(vb, u, va), vk));
  }
  for (int64_t j = Vv; j < V; ++j) {
    const float u = static_cast<float>(x[j]) * scale;
    x[j] = static_cast<T>(c * (std::exp(u - lse) * (alpha + beta * u) + kappa));
  }
  if (y >= 0 && y < V)
    x[y] = static_cast<T>(c * (std::exp(u_y - lse) * (alpha + beta * u_y) + kappa + gamma));
}

template <typename T>
void row_zero(T* x, int64_t V) {
  for (int64_t j = 0; j < V; ++j) x[j] = static_cast<T>(0.f);
}

// Each row of the logits block, rows in parallel: body(r, x, y) with x the row's V logits (of type T) and
// y its target.
template <typename T, typename Body>
void for_each_row(const CeRowsParams& p, Body&& body) {
  T* logits = static_cast<T*>(p.logits);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) body(r, logits + r * p.V, p.target[r]);
}

inline bool ignored(const CeRowsParams& p, int64_t y) { return y == p.ignore_index || y < 0 || y >= p.V; }

// Cross-entropy coefficients of sweep 3 for a row of loss weight g:
//   dloss/du_j = p_j (1 + 2 zl lse) - (1 - eps) [j == y] - eps / V
template <typename T>
void ce_row_grad(const CeRowsParams& p, T* x, int64_t y, float lse, float u_y, float g) {
  const float eps = p.label_smoothing;
  row_write_grad(x, p.V, p.scale, lse, g * (1.f + 2.f * p.z_loss_scale * lse), 0.f, -g * eps / p.V,
                 -g * (1.f - eps), y, u_y);
}

template <typename T>
void ce_fwd(const CeRowsParams& p) {
  for_each_row<T>(p, [&](int64_t r, T* x, int64_t y) {
    if (ignored(p, y)) {
      if (p.loss) p.loss[r] = 0.f;
      if (p.z_loss) p.z_loss[r] = 0.f;
      if (p.lse) p.lse[r] = 0.f;
      if (p.write_grad) row_zero(x, p.V);
      return;
    }
    const float eps = p.label_smoothing;
    const RowStats st = row_stats(x, p.V, p.scale, eps != 0.f, false);
    const float u_y = static_cast<float>(x[y]) * p.scale;
    const float zl = p.z_loss_scale * st.lse * st.lse;
    float loss = (1.f - eps) * (st.lse - u_y) + zl;
    if (eps != 0.f) loss += eps * (st.lse - st.sum_u / p.V);
    if (p.loss) p.loss[r] = loss;
    if (p.z_loss) p.z_loss[r] = zl;
    if (p.lse) p.lse[r] = st.lse;
    if (p.write_grad) ce_row_grad(p, x, y, st.lse, u_y, p.grad_scale);
  });
}

template <typename T>
void ce_bwd(const CeRowsParams& p) {
  for_each_row<T>(p, [&](int64_t r, T* x, int64_t y) {
    const float g = p.grad_rows ? p.grad_rows[r] * p.grad_scale : p.grad_scale;
    if (ignored(p, y) || g == 0.f) {
      row_zero(x, p.V);
      return;
    }
    ce_row_grad(p, x, y, p.lse_in[r], static_cast<float>(x[y]) * p.scale, g);
  });
}

template <typename T>
void logprobs_fwd(const CeRowsParams& p) {
  for_each_row<T>(p, [&](int64_t r, const T* x, int64_t y) {
    if (ignored(p, y)) {
      p.logprobs[r] = p.entropy[r] = p.lse[r] = 0.f;
      return;
    }
    const RowStats st = row_stats(x, p.V, p.scale, false, true);
    p.logprobs[r] = static_cast<float>(x[y]) * p.scale - st.lse;
    p.entropy[r] = -st.mean_pu;
    p.lse[r] = st.lse;
  });
}

// dL/du_j = a ([j == y] - p_j) - b p_j (log p_j + H)   (a = dL/dlogprob, b = dL/dentropy, H the entropy)
//         = p_j (-a - b (H - lse) - b u_j) + a [j == y]
template <typename T>
void logprobs_bwd(const CeRowsParams& p) {
  for_each_row<T>(p, [&](int64_t r, T* x, int64_t y) {
    const float a = p.grad_rows ? p.grad_rows[r] : 0.f;
    const float b = p.grad_entropy ? p.grad_entropy[r] : 0.f;
    if (ignored(p, y) || (a == 0.f && b == 0.f)) {
      row_zero(x, p.V);
      return;
    }
    const float lse = p.lse_in[r];
    // The entropy is recomputed (one more sweep) only when its gradient is needed.
    const float H = b != 0.f ? -row_stats(x, p.V, p.scale, false, true).mean_pu : 0.f;
    row_write_grad(x, p.V, p.scale, lse, -a - b * (H - lse), -b, 0.f, a, y, static_cast<float>(x[y]) * p.scale);
  });
}


#define H1R_CE_DISPATCH(fn, p)                                      \
  switch ((p).dtype) {                                              \
    case CeDtype::bf16: return fn<c10::BFloat16>(p);                \
    case CeDtype::f16: return fn<c10::Half>(p);                     \
    default: return fn<float>(p);                                   \
  }

}  // namespace

void ce_rows_fwd_kernel(const CeRowsParams& p) { H1R_CE_DISPATCH(ce_fwd, p) }
void ce_rows_bwd_kernel(const CeRowsParams& p) { H1R_CE_DISPATCH(ce_bwd, p) }
void logprobs_rows_fwd_kernel(const CeRowsParams& p) { H1R_CE_DISPATCH(logprobs_fwd, p) }
void logprobs_rows_bwd_kernel(const CeRowsParams& p) { H1R_CE_DISPATCH(logprobs_bwd, p) }

}  // namespace h1r::cpu::H1R_ISA
