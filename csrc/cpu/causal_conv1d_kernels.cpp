// Depthwise causal conv1d on the CPU: forward, backward and the decode-step update.
//
// The math, per channel c (H = w - 1 steps of history, X = [history, x] along time, so X[H + t] = x[t]):
//   pre[t] = bias + sum_{k=0}^{H} weight[k] * X[t + k] * M_k[t]        out[t] = silu?(pre[t])
// where M_k[t] = 1 when X[t + k] (time t - H + k) belongs to the same document as t (seq_idx; the
// history counts as the first document), else 0; M_H = 1. The backward, with g = dout * act'(pre):
//   dX[j]      = sum_k weight[k] * g[j - k] * M_k[j - k]     (+ dfinal_states on the last H steps)
//   dweight[k] = sum_t g[t] * X[t + k] * M_k[t]              dbias = sum_t g[t]
// dx = dX[H:], dinitial_states = dX[:H].
//
// Two layouts of x, each vectorized along its unit-stride axis:
// * channel-last (b, l, d) in memory (the layout Falcon-H1's xBC comes in, a slice of in_proj's output):
//   a vector holds kV neighbouring channels; walking time, the w taps stay in registers (a sliding
//   window), so every x element is loaded once. Work items are (batch, time chunk, channel vector).
// * channel-first (b, d, l): a vector holds kV consecutive time steps of one channel row; the row is
//   first widened to fp32 with its history in front (X), so the taps are unaligned loads X[t + k].
// The document masks M_k are built once per call (per batch row and tap) as fp32 arrays, zero-padded on
// both sides, so both layouts and the backward read them without bounds tests.
// dweight / dbias are reduced per work item into their own slots, then summed in a fixed order: the
// result does not depend on the thread count or the schedule (deterministic).
// GCC 12 flags the _mm512_undefined_* idiom inside ATen's AVX-512 conversions; not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/causal_conv1d.h"

namespace h1r::cpu::H1R_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

// ---- fp32 <-> storage dtype, full and partial vectors ----------------------------------------------

template <typename T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// Loads n <= kV elements; the other lanes are zero.
template <typename T>
inline Vec load_vec(const T* p, int64_t n) {
  if (n == kV) return load_vec(p);
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    __at_align__ float tmp[kV] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline void store_vec(T* p, const Vec& v, int64_t n = kV) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kV) v.store(p);
    else v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);  // 2 kV lanes; the first n are v's
  }
}

// n lanes from an fp32 array with a stride (zero elsewhere), and the reverse.
inline Vec gather(const float* p, int64_t stride, int64_t n) {
  __at_align__ float tmp[kV] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i * stride];
  return Vec::loadu(tmp);
}

inline void scatter(float* p, int64_t stride, const Vec& v, int64_t n) {
  __at_align__ float tmp[kV];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i * stride] = tmp[i];
}

inline float hsum(const Vec& v) {
  __at_align__ float tmp[kV];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kV; ++i) s += tmp[i];
  return s;
}

// ---- activation -------------------------------------------------------------------------------------

inline Vec sigmoid(const Vec& z) { return Vec(1.f) / (Vec(1.f) + z.neg().exp()); }
inline Vec silu(const Vec& z) { return z * sigmoid(z); }
// d silu / dz = s (1 + z (1 - s)), s = sigmoid(z)
inline Vec silu_grad(const Vec& z) {
  Vec s = sigmoid(z);
  return s * (Vec(1.f) + z * (Vec(1.f) - s));
}
inline float silu_scalar(float z) { return z / (1.f + std::exp(-z)); }

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// ---- dispatch on (dtype, width, seq_idx present) -----------------------------------------------------

template <typename F>
void dispatch_conv(ConvDtype dtype, int64_t width, bool seq, F&& f) {
  auto by_seq = [&](auto t, auto w) {
    if (seq) f(t, w, std::true_type{});
    else f(t, w, std::false_type{});
  };
  auto by_width = [&](auto t) {
    switch (width) {
      case 2: by_seq(t, std::integral_constant<int, 2>{}); break;
      case 3: by_seq(t, std::integral_constant<int, 3>{}); break;
      default: by_seq(t, std::integral_constant<int, 4>{}); break;
    }
  };
  switch (dtype) {
    case ConvDtype::bf16: by_width(c10::BFloat16{}); break;
    case ConvDtype::f16: by_width(c10::Half{}); break;
    default: by_width(float{}); break;
  }
}

// ---- document masks ----------------------------------------------------------------------------------

// Per batch row and history tap k < H: M_k[t] = (doc(t - H + k) == doc(t)), stored at
// masks[(b * H + k) * row + H + t], zero for t outside [0, l). `row` leaves room for the largest
// vector overrun of either layout and of the backward's shifted reads.
struct TapMasks {
  std::vector<float> data;
  int64_t row = 0;
  int64_t H = 0;
  const float* at(int64_t b, int64_t k) const { return data.data() + (b * H + k) * row + H; }
};

TapMasks build_tap_masks(const CausalConv1dParams& p) {
  TapMasks m;
  if (!p.seq_idx) return m;
  const int64_t l = p.seqlen, H = p.width - 1;
  m.H = H;
  m.row = 2 * H + round_up(l, kV) + kV;
  m.data.assign(p.batch * H * m.row, 0.f);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t* seq = p.seq_idx + b * l;
    for (int64_t k = 0; k < H; ++k) {
      float* mk = m.data.data() + (b * H + k) * m.row + H;
      for (int64_t t = 0; t < l; ++t) {
        const int64_t s = t - H + k;
        mk[t] = seq[s >= 0 ? s : 0] == seq[t] ? 1.f : 0.f;
      }
    }
  }
  return m;
}

// Whether history step j of the final state (time l - H + j) belongs to the last document.
inline bool final_step_kept(const CausalConv1dParams& p, int64_t b, int64_t j) {
  if (!p.seq_idx) return true;
  const int64_t l = p.seqlen, s = l - (p.width - 1) + j;
  const int32_t* seq = p.seq_idx + b * l;
  return seq[s >= 0 ? s : 0] == seq[l - 1];
}

// weight (d, w) -> (w, d), so that a channel vector of tap k is one contiguous load.
std::vector<float> transpose_weight(const CausalConv1dParams& p) {
  std::vector<float> wt(p.width * p.dim);
  for (int64_t c = 0; c < p.dim; ++c)
    for (int64_t k = 0; k < p.width; ++k) wt[k * p.dim + c] = p.weight[c * p.width + k];
  return wt;
}

// Time chunk of the channel-last work items: long enough that re-reading H steps of history per chunk
// is noise, short enough that (batch x chunks x channel vectors) feeds every thread, and bounded in
// count so that the backward's per-chunk dweight slots stay small.
int64_t channel_last_chunk(const CausalConv1dParams& p) {
  const int64_t by_count = (p.batch * p.seqlen + 63) / 64;
  return std::max<int64_t>(256, by_count);
}

// ---- final states (both layouts; b * d * H values, scalar) --------------------------------------------

template <typename T>
void write_final_states(const CausalConv1dParams& p) {
  const int64_t H = p.width - 1, l = p.seqlen, d = p.dim;
  const T* x = static_cast<const T*>(p.x);
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < p.batch * d; ++bc) {
    const int64_t b = bc / d, c = bc % d;
    for (int64_t j = 0; j < H; ++j) {
      const int64_t s = l - H + j;  // time of final step j
      float v = 0.f;
      if (s >= 0) v = static_cast<float>(x[b * p.x_stride_b + c * p.x_stride_c + s * p.x_stride_t]);
      else if (p.initial_states) v = p.initial_states[bc * H + H + s];
      p.final_states[bc * H + j] = final_step_kept(p, b, j) ? v : 0.f;
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------------

// Channel-first: one (batch, channel) row at a time, kV time steps per vector.
template <typename T, int W, bool SEQ>
void fwd_channel_first(const CausalConv1dParams& p, const TapMasks& masks) {
  constexpr int H = W - 1;
  const int64_t l = p.seqlen, d = p.dim, Lr = round_up(l, kV);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel
  {
    std::vector<float> X(H + Lr, 0.f);  // [history | x row in fp32 | zeros]
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < p.batch * d; ++bc) {
      const int64_t b = bc / d, c = bc % d;
      const T* xr = x + b * p.x_stride_b + c * p.x_stride_c;
      T* outr = out + b * p.out_stride_b + c * p.out_stride_c;
      for (int64_t j = 0; j < H; ++j) X[j] = p.initial_states ? p.initial_states[bc * H + j] : 0.f;
      for (int64_t t = 0; t < l; t += kV) load_vec(xr + t, std::min(kV, l - t)).store(X.data() + H + t);

      Vec wk[W];
      for (int k = 0; k < W; ++k) wk[k] = Vec(p.weight[c * W + k]);
      const Vec bias(p.bias ? p.bias[c] : 0.f);
      for (int64_t t = 0; t < l; t += kV) {
        Vec acc = bias;
        for (int k = 0; k < W; ++k) {
          Vec tap = Vec::loadu(X.data() + t + k);
          if constexpr (SEQ) {
            if (k < H) tap = tap * Vec::loadu(masks.at(b, k) + t);
          }
          acc = at::vec::fmadd(wk[k], tap, acc);
        }
        if (p.silu) acc = silu(acc);
        store_vec(outr + t, acc, std::min(kV, l - t));
      }
    }
  }
}

// History window of a channel-last block before time t0: win[j + 1] = X at time t0 - H + j.
template <typename T, int W>
inline void load_history(const CausalConv1dParams& p, int64_t b, int64_t t0, int64_t c, int64_t n, Vec* win) {
  constexpr int H = W - 1;
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b + c;
  for (int j = 0; j < H; ++j) {
    const int64_t s = t0 - H + j;
    if (s >= 0) win[j + 1] = load_vec(xb + s * p.x_stride_t, n);
    else if (p.initial_states) win[j + 1] = gather(p.initial_states + (b * p.dim + c) * H + H + s, H, n);
    else win[j + 1] = Vec(0.f);
  }
}

// Channel-last: n <= kV channels starting at c, times [t0, t1), taps kept in registers.
template <typename T, int W, bool SEQ>
void fwd_channel_last_block(const CausalConv1dParams& p, const TapMasks& masks, const float* wt, int64_t b,
                            int64_t t0, int64_t t1, int64_t c, int64_t n) {
  constexpr int H = W - 1;
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b + c;
  T* ob = static_cast<T*>(p.out) + b * p.out_stride_b + c;
  Vec wk[W], win[W];
  for (int k = 0; k < W; ++k) wk[k] = Vec::loadu(wt + k * p.dim + c, n);
  const Vec bias = p.bias ? Vec::loadu(p.bias + c, n) : Vec(0.f);
  load_history<T, W>(p, b, t0, c, n, win);
  const float* mk[H > 0 ? H : 1];
  if constexpr (SEQ) for (int k = 0; k < H; ++k) mk[k] = masks.at(b, k);

  for (int64_t t = t0; t < t1; ++t) {
    for (int k = 0; k < H; ++k) win[k] = win[k + 1];  // slide: win[k] = X at time t - H + k
    win[H] = load_vec(xb + t * p.x_stride_t, n);
    Vec acc = bias;
    for (int k = 0; k < W; ++k) {
      Vec tap = win[k];
      if constexpr (SEQ) {
        if (k < H) tap = tap * Vec(mk[k][t]);
      }
      acc = at::vec::fmadd(wk[k], tap, acc);
    }
    if (p.silu) acc = silu(acc);
    store_vec(ob + t * p.out_stride_t, acc, n);
  }
}

template <typename T, int W, bool SEQ>
void fwd_channel_last(const CausalConv1dParams& p, const TapMasks& masks) {
  const std::vector<float> wt = transpose_weight(p);
  const int64_t chunk = channel_last_chunk(p);
  const int64_t nchunks = (p.seqlen + chunk - 1) / chunk, ncv = (p.dim + kV - 1) / kV;
  const int64_t items = p.batch * nchunks * ncv;
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t cv = it % ncv, tc = (it / ncv) % nchunks, b = it / (ncv * nchunks);
    const int64_t c = cv * kV, t0 = tc * chunk;
    fwd_channel_last_block<T, W, SEQ>(p, masks, wt.data(), b, t0, std::min(t0 + chunk, p.seqlen), c,
                                      std::min(kV, p.dim - c));
  }
}

// ---- backward -----------------------------------------------------------------------------------------

// dweight / dbias partial sums: slot[item][k][c] for k < W, slot[item][W][c] for dbias.
// Summed over items in order at the end (deterministic).
void reduce_weight_grads(const CausalConv1dParams& p, const std::vector<float>& slots, int64_t items) {
  const int64_t W = p.width, d = p.dim;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t k = 0; k <= W; ++k) {
      float s = 0.f;
      for (int64_t i = 0; i < items; ++i) s += slots[(i * (W + 1) + k) * d + c];
      if (k < W) p.dweight[c * W + k] = s;
      else if (p.dbias) p.dbias[c] = s;
    }
  }
}

// Channel-first: per row, (1) recompute pre and g = dout * act'(pre) into G (zero-padded by H on both
// sides) while accumulating dweight / dbias, (2) dX[j] = sum_k w_k g[j-k] M_k[j-k], vectorized over j,
// (3) add dfinal_states and store dx / dinitial_states. Slots: one per batch row.
template <typename T, int W, bool SEQ>
void bwd_channel_first(const CausalConv1dParams& p, const TapMasks& masks, std::vector<float>& slots) {
  constexpr int H = W - 1;
  const int64_t l = p.seqlen, d = p.dim, Lr = round_up(l, kV);
  const T* x = static_cast<const T*>(p.x);
  const T* dout = static_cast<const T*>(p.dout);
  T* dx = static_cast<T*>(p.out);
#pragma omp parallel
  {
    std::vector<float> X(H + Lr, 0.f);
    std::vector<float> G(2 * H + Lr + kV, 0.f);  // G[H + t] = g[t]
    std::vector<float> D(H + Lr + kV, 0.f);      // D[j] = dX[j]
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < p.batch * d; ++bc) {
      const int64_t b = bc / d, c = bc % d;
      const T* xr = x + b * p.x_stride_b + c * p.x_stride_c;
      const T* dr = dout + b * p.dout_stride_b + c * p.dout_stride_c;
      for (int64_t j = 0; j < H; ++j) X[j] = p.initial_states ? p.initial_states[bc * H + j] : 0.f;
      for (int64_t t = 0; t < l; t += kV) load_vec(xr + t, std::min(kV, l - t)).store(X.data() + H + t);

      Vec wk[W], dw[W];
      for (int k = 0; k < W; ++k) wk[k] = Vec(p.weight[c * W + k]), dw[k] = Vec(0.f);
      const Vec bias(p.bias ? p.bias[c] : 0.f);
      Vec db(0.f);
      // (1) g, dweight, dbias. Lanes past l have dout = 0, hence g = 0.
      for (int64_t t = 0; t < l; t += kV) {
        Vec taps[W];
        Vec pre = bias;
        for (int k = 0; k < W; ++k) {
          taps[k] = Vec::loadu(X.data() + t + k);
          if constexpr (SEQ) {
            if (k < H) taps[k] = taps[k] * Vec::loadu(masks.at(b, k) + t);
          }
          pre = at::vec::fmadd(wk[k], taps[k], pre);
        }
        Vec g = load_vec(dr + t, std::min(kV, l - t));
        if (p.silu) g = g * silu_grad(pre);
        g.store(G.data() + H + t);
        for (int k = 0; k < W; ++k) dw[k] = at::vec::fmadd(g, taps[k], dw[k]);
        db = db + g;
      }
      // (2) dX over j in [0, H + l)
      for (int64_t j = 0; j < H + l; j += kV) {
        Vec acc(0.f);
        for (int k = 0; k < W; ++k) {
          Vec gk = Vec::loadu(G.data() + H + j - k);  // g[j - k]
          if constexpr (SEQ) {
            if (k < H) gk = gk * Vec::loadu(masks.at(b, k) + j - k);
          }
          acc = at::vec::fmadd(wk[k], gk, acc);
        }
        acc.store(D.data() + j);
      }
      // (3) the final state is X[l : l + H]
      if (p.dfinal_states)
        for (int64_t j = 0; j < H; ++j)
          if (final_step_kept(p, b, j)) D[l + j] += p.dfinal_states[bc * H + j];
      if (p.dinitial_states)
        for (int64_t j = 0; j < H; ++j) p.dinitial_states[bc * H + j] = D[j];
      T* dxr = dx + b * p.out_stride_b + c * p.out_stride_c;
      for (int64_t t = 0; t < l; t += kV) store_vec(dxr + t, Vec::loadu(D.data() + H + t), std::min(kV, l - t));

      float* slot = slots.data() + b * (W + 1) * d + c;
      for (int k = 0; k < W; ++k) slot[k * d] = hsum(dw[k]);
      slot[W * d] = hsum(db);
    }
  }
}

// Channel-last block: channels [c, c + n), outputs dx at times [t0, t1) (and dinitial_states when
// t0 == 0). Walks t over [t0, t1 + H): the x window gives pre[t] and g[t]; the g window (g at t - i)
// gives dX at time t - H, whose taps read g[t - H .. t].
template <typename T, int W, bool SEQ>
void bwd_channel_last_block(const CausalConv1dParams& p, const TapMasks& masks, const float* wt, float* slot,
                            int64_t b, int64_t t0, int64_t t1, int64_t c, int64_t n) {
  constexpr int H = W - 1;
  const int64_t l = p.seqlen, d = p.dim;
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b + c;
  const T* gb = static_cast<const T*>(p.dout) + b * p.dout_stride_b + c;
  T* dxb = static_cast<T*>(p.out) + b * p.out_stride_b + c;
  Vec wk[W], win[W], gw[W], dw[W];
  for (int k = 0; k < W; ++k) wk[k] = Vec::loadu(wt + k * d + c, n), gw[k] = Vec(0.f), dw[k] = Vec(0.f);
  const Vec bias = p.bias ? Vec::loadu(p.bias + c, n) : Vec(0.f);
  Vec db(0.f);
  load_history<T, W>(p, b, t0, c, n, win);
  const float* mk[H > 0 ? H : 1];
  if constexpr (SEQ) for (int k = 0; k < H; ++k) mk[k] = masks.at(b, k);
  const int64_t first_out = (t0 == 0 && p.dinitial_states) ? -H : t0;

  for (int64_t t = t0; t < t1 + H; ++t) {
    Vec g(0.f);
    if (t < l) {
      for (int k = 0; k < H; ++k) win[k] = win[k + 1];
      win[H] = load_vec(xb + t * p.x_stride_t, n);
      Vec taps[W];
      Vec pre = bias;
      for (int k = 0; k < W; ++k) {
        taps[k] = win[k];
        if constexpr (SEQ) {
          if (k < H) taps[k] = taps[k] * Vec(mk[k][t]);
        }
        pre = at::vec::fmadd(wk[k], taps[k], pre);
      }
      g = load_vec(gb + t * p.dout_stride_t, n);
      if (p.silu) g = g * silu_grad(pre);
      if (t < t1) {
        for (int k = 0; k < W; ++k) dw[k] = at::vec::fmadd(g, taps[k], dw[k]);
        db = db + g;
      }
    }
    for (int i = H; i > 0; --i) gw[i] = gw[i - 1];  // gw[i] = g at time t - i
    gw[0] = g;

    const int64_t s = t - H;  // the time whose dX is now complete
    if (s < first_out) continue;
    Vec acc(0.f);
    for (int k = 0; k < W; ++k) {
      Vec gk = gw[k];  // g[s + H - k] feeds X[s] through tap k
      if constexpr (SEQ) {
        if (k < H) gk = gk * Vec(mk[k][t - k]);
      }
      acc = at::vec::fmadd(wk[k], gk, acc);
    }
    if (p.dfinal_states && s >= l - H) {
      const int64_t j = s - (l - H);
      if (final_step_kept(p, b, j)) acc = acc + gather(p.dfinal_states + (b * d + c) * H + j, H, n);
    }
    if (s >= 0) store_vec(dxb + s * p.out_stride_t, acc, n);
    else scatter(p.dinitial_states + (b * d + c) * H + H + s, H, acc, n);
  }
  for (int k = 0; k < W; ++k) dw[k].store(slot + k * d + c, n);
  db.store(slot + W * d + c, n);
}

template <typename T, int W, bool SEQ>
int64_t bwd_channel_last(const CausalConv1dParams& p, const TapMasks& masks, std::vector<float>& slots) {
  const std::vector<float> wt = transpose_weight(p);
  const int64_t chunk = channel_last_chunk(p);
  const int64_t nchunks = (p.seqlen + chunk - 1) / chunk, ncv = (p.dim + kV - 1) / kV;
  const int64_t nslots = p.batch * nchunks;
  slots.assign(nslots * (W + 1) * p.dim, 0.f);
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < nslots * ncv; ++it) {
    const int64_t cv = it % ncv, bt = it / ncv, tc = bt % nchunks, b = bt / nchunks;
    const int64_t c = cv * kV, t0 = tc * chunk;
    bwd_channel_last_block<T, W, SEQ>(p, masks, wt.data(), slots.data() + bt * (W + 1) * p.dim, b, t0,
                                      std::min(t0 + chunk, p.seqlen), c, std::min(kV, p.dim - c));
  }
  return nslots;
}

// ---- decode-step update -------------------------------------------------------------------------------

// Per (batch row, kV channels): the window [state | new x] of each channel in fp32, the conv of the
// new steps (silu vectorized across the channels), then the state shifted in place.
template <typename T>
void update_impl(const CausalConv1dUpdateParams& p) {
  const int64_t W = p.width, H = W - 1, S = p.state_len, l = p.seqlen, d = p.dim;
  const int64_t ncv = (d + kV - 1) / kV, span = S + l;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  T* state = static_cast<T*>(p.conv_state);
#pragma omp parallel
  {
    std::vector<float> buf(kV * span);  // buf[i * span + j]: lane i, step j of [state | x]
    __at_align__ float pre[kV];
#pragma omp for schedule(static)
    for (int64_t it = 0; it < p.batch * ncv; ++it) {
      const int64_t b = it / ncv, c = (it % ncv) * kV, n = std::min(kV, d - c);
      const int64_t row = p.conv_state_indices ? p.conv_state_indices[b] : b;
      T* ob = out + (b * d + c) * l;
      if (row < 0) {  // padded batch row
        for (int64_t i = 0; i < n * l; ++i) ob[i] = T(0.f);
        continue;
      }
      T* sb = state + row * p.state_stride_b + c * p.state_stride_c;
      const T* xb = x + b * p.x_stride_b + c * p.x_stride_c;
      for (int64_t i = 0; i < n; ++i) {
        float* bi = buf.data() + i * span;
        for (int64_t j = 0; j < S; ++j) bi[j] = static_cast<float>(sb[i * p.state_stride_c + j * p.state_stride_t]);
        for (int64_t t = 0; t < l; ++t) bi[S + t] = static_cast<float>(xb[i * p.x_stride_c + t * p.x_stride_t]);
      }
      for (int64_t t = 0; t < l; ++t) {
        for (int64_t i = 0; i < kV; ++i) {
          if (i >= n) { pre[i] = 0.f; continue; }
          const float* win = buf.data() + i * span + S - H + t;  // the w taps of step t
          const float* wc = p.weight + (c + i) * W;
          float acc = p.bias ? p.bias[c + i] : 0.f;
          for (int64_t k = 0; k < W; ++k) acc += wc[k] * win[k];
          pre[i] = acc;
        }
        Vec v = Vec::loadu(pre);
        if (p.silu) v = silu(v);
        if (l == 1) {
          store_vec(ob, v, n);
        } else {
          v.store(pre);
          for (int64_t i = 0; i < n; ++i) ob[i * l + t] = T(pre[i]);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* bi = buf.data() + i * span + l;  // the newest S steps
        for (int64_t j = 0; j < S; ++j) sb[i * p.state_stride_c + j * p.state_stride_t] = T(bi[j]);
      }
    }
  }
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------------

void causal_conv1d_fwd_kernel(const CausalConv1dParams& p) {
  const TapMasks masks = build_tap_masks(p);
  dispatch_conv(p.dtype, p.width, p.seq_idx != nullptr, [&](auto t, auto w, auto seq) {
    using T = decltype(t);
    constexpr int W = decltype(w)::value;
    constexpr bool SEQ = decltype(seq)::value;
    if (p.channel_last) fwd_channel_last<T, W, SEQ>(p, masks);
    else fwd_channel_first<T, W, SEQ>(p, masks);
    if (p.final_states) write_final_states<T>(p);
  });
}

void causal_conv1d_bwd_kernel(const CausalConv1dParams& p) {
  const TapMasks masks = build_tap_masks(p);
  std::vector<float> slots;
  int64_t nslots = 0;
  dispatch_conv(p.dtype, p.width, p.seq_idx != nullptr, [&](auto t, auto w, auto seq) {
    using T = decltype(t);
    constexpr int W = decltype(w)::value;
    constexpr bool SEQ = decltype(seq)::value;
    if (p.channel_last) {
      nslots = bwd_channel_last<T, W, SEQ>(p, masks, slots);
    } else {
      nslots = p.batch;
      slots.assign(nslots * (W + 1) * p.dim, 0.f);
      bwd_channel_first<T, W, SEQ>(p, masks, slots);
    }
  });
  reduce_weight_grads(p, slots, nslots);
}

void causal_conv1d_update_kernel(const CausalConv1dUpdateParams& p) {
  switch (p.dtype) {
    case ConvDtype::bf16: update_impl<c10::BFloat16>(p); break;
    case ConvDtype::f16: update_impl<c10::Half>(p); break;
    default: update_impl<float>(p); break;
  }
}

}  // namespace h1r::cpu::H1R_ISA
