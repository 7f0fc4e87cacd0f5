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
//   a vector holds kV neighbouring channels. Work items are tiles (batch, time chunk, channel range)
//   walked row by row (time outermost), so x and out stream through memory; the taps re-read the
//   previous H rows of the range from L1.
// * channel-first (b, d, l): a vector holds kV consecutive time steps of one channel row; the row is
//   first widened to fp32 with its history in front (X), so the taps are unaligned loads X[t + k].
// The document masks M_k are built once per call (per batch row and tap) as fp32 arrays, zero-padded on
// both sides, so both layouts and the backward read them without bounds tests.
// dweight / dbias are reduced per work item into their own slots, then summed in a fixed order: the
// result does not depend on the thread count or the schedule (deterministic).
#include "cpu/vec_diagnostics.h"
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

// exp_u20: ATen's inline polynomial exp (<= 20 ulp), several times faster than the Sleef call of exp().
inline Vec sigmoid(const Vec& z) { return Vec(1.f) / (Vec(1.f) + z.neg().exp_u20()); }
inline Vec silu(const Vec& z) { return z * sigmoid(z); }
// d silu / dz = s (1 + z (1 - s)), s = sigmoid(z)
inline Vec silu_grad(const Vec& z) {
  Vec s = sigmoid(z);
  return s * (Vec(1.f) + z * (Vec(1.f) - s));
}

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// Below this many elements of work a loop runs on the calling thread: waking the OpenMP team costs more
// than the work (a decode step of one sequence is ~4K channels).
constexpr int64_t kParallelMin = 1 << 15;

// ---- dispatch on (dtype, width, one flag) -------------------------------------------------------------

// f(T{}, integral_constant<int, width>, bool_constant<flag>): the flag is "seq_idx present" for the
// forward and backward, "weight and bias in fp32" for the update.
template <typename F>
void dispatch_conv(ConvDtype dtype, int64_t width, bool flag, F&& f) {
  auto by_seq = [&](auto t, auto w) {
    if (flag) f(t, w, std::true_type{});
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
#pragma omp parallel for schedule(static) if (p.batch * p.seqlen * (p.width - 1) >= kParallelMin)
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

// Channel-last work items are tiles of (batch, time chunk, channel range). Inside a tile the loop walks
// time outermost and channels innermost, so x and out stream through memory row by row; the taps
// re-read the previous H rows of the range, which are still in L1 (a range is at most kMaxRange
// channels). Tiles per batch row are bounded (<= ~64 in all) so that the backward's per-tile dweight
// slots stay small, and chunks are >= 64 steps so that the backward's H-step halo is noise.
constexpr int64_t kMaxRange = 1024;

struct ChannelLastTiles {
  int64_t chunk, nchunks, range, nranges;
  int64_t count(int64_t batch) const { return batch * nchunks * nranges; }
};

ChannelLastTiles channel_last_tiles(const CausalConv1dParams& p) {
  ChannelLastTiles t;
  const int64_t nr = (p.dim + kMaxRange - 1) / kMaxRange;
  t.range = round_up((p.dim + nr - 1) / nr, kV);
  t.nranges = (p.dim + t.range - 1) / t.range;
  const int64_t want = std::max<int64_t>(1, std::min((64 + p.batch - 1) / p.batch, p.seqlen / 64));
  t.chunk = (p.seqlen + want - 1) / want;
  t.nchunks = (p.seqlen + t.chunk - 1) / t.chunk;
  return t;
}

// The rows feeding the taps of output time t in a channel-last tile: tap k reads time t - H + k, from x
// when that is >= 0, else from the history rows hist[(H + s) * range] (initial_states transposed to
// (H, range) for the tile, or zeros).
template <typename T, int W>
struct TapRows {
  const T* x[W];
  const float* hist[W];
  bool all_x;
  TapRows(const CausalConv1dParams& p, const T* xb, const float* hist_rows, int64_t range, int64_t c0, int64_t t) {
    constexpr int H = W - 1;
    all_x = t >= H;
    for (int k = 0; k < W; ++k) {
      const int64_t s = t - H + k;
      x[k] = s >= 0 ? xb + s * p.x_stride_t : nullptr;
      hist[k] = s >= 0 ? nullptr : hist_rows + (H + s) * range - c0;
    }
  }
  Vec load(int k, int64_t c, int64_t n) const {
    return (all_x || x[k]) ? load_vec(x[k] + c, n) : Vec::loadu(hist[k] + c, n);
  }
};

// initial_states (b, d, H) of channels [c0, c0 + nc) transposed to rows (H, range); zeros without them.
void history_rows(const CausalConv1dParams& p, int64_t b, int64_t c0, int64_t nc, int64_t range, float* rows) {
  const int64_t H = p.width - 1;
  for (int64_t j = 0; j < H; ++j)
    for (int64_t i = 0; i < range; ++i)
      rows[j * range + i] = (p.initial_states && i < nc) ? p.initial_states[(b * p.dim + c0 + i) * H + j] : 0.f;
}

// ---- final states (both layouts; b * d * H values, scalar) --------------------------------------------

template <typename T>
void write_final_states(const CausalConv1dParams& p) {
  const int64_t H = p.width - 1, l = p.seqlen, d = p.dim;
  const T* x = static_cast<const T*>(p.x);
#pragma omp parallel for schedule(static) if (p.batch * p.dim * p.width >= kParallelMin)
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
#pragma omp parallel if (p.batch * p.dim * p.seqlen >= kParallelMin)
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

// Channel-last: tiles of (batch, time chunk, channel range), time outermost inside a tile.
template <typename T, int W, bool SEQ>
void fwd_channel_last(const CausalConv1dParams& p, const TapMasks& masks) {
  constexpr int H = W - 1;
  const std::vector<float> wt = transpose_weight(p);
  const ChannelLastTiles tiles = channel_last_tiles(p);
  const int64_t range = tiles.range;
#pragma omp parallel if (p.batch * p.dim * p.seqlen >= kParallelMin)
  {
    std::vector<float> hist(H * range);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < tiles.count(p.batch); ++it) {
      const int64_t rc = it % tiles.nranges, tc = (it / tiles.nranges) % tiles.nchunks;
      const int64_t b = it / (tiles.nranges * tiles.nchunks);
      const int64_t c0 = rc * range, c1 = std::min(c0 + range, p.dim);
      const int64_t t0 = tc * tiles.chunk, t1 = std::min(t0 + tiles.chunk, p.seqlen);
      const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b;
      T* ob = static_cast<T*>(p.out) + b * p.out_stride_b;
      if (t0 < H) history_rows(p, b, c0, c1 - c0, range, hist.data());
      for (int64_t t = t0; t < t1; ++t) {
        const TapRows<T, W> rows(p, xb, hist.data(), range, c0, t);
        float m[W];  // document mask of each tap (scalar: one time step)
        for (int k = 0; k < W; ++k) m[k] = (SEQ && k < H) ? masks.at(b, k)[t] : 1.f;
        T* orow = ob + t * p.out_stride_t;
        for (int64_t c = c0; c < c1; c += kV) {
          const int64_t n = std::min(kV, c1 - c);
          Vec acc = p.bias ? Vec::loadu(p.bias + c, n) : Vec(0.f);
          for (int k = 0; k < W; ++k) {
            Vec tap = rows.load(k, c, n);
            if constexpr (SEQ) tap = tap * Vec(m[k]);
            acc = at::vec::fmadd(Vec::loadu(wt.data() + k * p.dim + c, n), tap, acc);
          }
          if (p.silu) acc = silu(acc);
          store_vec(orow + c, acc, n);
        }
      }
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------------

// dweight / dbias partial sums: slot[item][k][c] for k < W, slot[item][W][c] for dbias.
// Summed over items in order at the end (deterministic).
void reduce_weight_grads(const CausalConv1dParams& p, const std::vector<float>& slots, int64_t items) {
  const int64_t W = p.width, d = p.dim;
#pragma omp parallel for schedule(static) if (p.dim * (p.width + 1) * items >= kParallelMin)
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
#pragma omp parallel if (p.batch * p.dim * p.seqlen >= kParallelMin)
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

// Channel-last: tiles as in the forward. A tile walks t over [t0, t1 + H): it computes the row g[t] (pre
// recomputed from the x rows) into a ring of H + 1 rows, accumulates dweight / dbias for t < t1, and
// completes the row dX at time s = t - H, whose taps read g[s .. s + H] from the ring. Ring rows of
// times before t0 stay zero (they only feed rows s < t0, which belong to the previous tile).
template <typename T, int W, bool SEQ>
int64_t bwd_channel_last(const CausalConv1dParams& p, const TapMasks& masks, std::vector<float>& slots) {
  constexpr int H = W - 1;
  const std::vector<float> wt = transpose_weight(p);
  const ChannelLastTiles tiles = channel_last_tiles(p);
  const int64_t range = tiles.range, l = p.seqlen, d = p.dim;
  const int64_t nslots = p.batch * tiles.nchunks;  // one dweight slot per (batch, chunk)
  slots.assign(nslots * (W + 1) * d, 0.f);
#pragma omp parallel if (p.batch * p.dim * p.seqlen >= kParallelMin)
  {
    std::vector<float> hist(H * range), ring((H + 1) * range), acc_w((W + 1) * range);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < tiles.count(p.batch); ++it) {
      const int64_t rc = it % tiles.nranges, bt = it / tiles.nranges, tc = bt % tiles.nchunks;
      const int64_t b = bt / tiles.nchunks;
      const int64_t c0 = rc * range, c1 = std::min(c0 + range, d);
      const int64_t t0 = tc * tiles.chunk, t1 = std::min(t0 + tiles.chunk, l);
      const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b;
      const T* gb = static_cast<const T*>(p.dout) + b * p.dout_stride_b;
      T* dxb = static_cast<T*>(p.out) + b * p.out_stride_b;
      if (t0 < H) history_rows(p, b, c0, c1 - c0, range, hist.data());
      std::fill(ring.begin(), ring.end(), 0.f);
      std::fill(acc_w.begin(), acc_w.end(), 0.f);
      float* dw = acc_w.data() - c0;  // dw[k * range + c], dbias at k = W
      const int64_t first_out = (t0 == 0 && p.dinitial_states) ? -H : t0;

      for (int64_t t = t0; t < t1 + H; ++t) {
        float* grow = ring.data() + (t % (H + 1)) * range - c0;  // g[t]
        if (t < l) {
          const TapRows<T, W> rows(p, xb, hist.data(), range, c0, t);
          float m[W];
          for (int k = 0; k < W; ++k) m[k] = (SEQ && k < H) ? masks.at(b, k)[t] : 1.f;
          const T* drow = gb + t * p.dout_stride_t;
          const bool own = t < t1;  // not the halo: dweight / dbias count it here
          for (int64_t c = c0; c < c1; c += kV) {
            const int64_t n = std::min(kV, c1 - c);
            Vec taps[W];
            Vec pre = p.bias ? Vec::loadu(p.bias + c, n) : Vec(0.f);
            for (int k = 0; k < W; ++k) {
              taps[k] = rows.load(k, c, n);
              if constexpr (SEQ) taps[k] = taps[k] * Vec(m[k]);
              pre = at::vec::fmadd(Vec::loadu(wt.data() + k * d + c, n), taps[k], pre);
            }
            Vec g = load_vec(drow + c, n);
            if (p.silu) g = g * silu_grad(pre);
            g.store(grow + c, n);
            if (own) {
              for (int k = 0; k < W; ++k)
                at::vec::fmadd(g, taps[k], Vec::loadu(dw + k * range + c, n)).store(dw + k * range + c, n);
              (Vec::loadu(dw + W * range + c, n) + g).store(dw + W * range + c, n);
            }
          }
        } else {
          std::fill(grow + c0, grow + c1, 0.f);
        }

        const int64_t s = t - H;  // dX[s] is complete: its taps read g[s + H - k], k = 0..H
        if (s < first_out) continue;
        const float* gk[W];
        float m[W];
        for (int k = 0; k < W; ++k) {
          gk[k] = ring.data() + ((t - k + H + 1) % (H + 1)) * range - c0;
          m[k] = (SEQ && k < H) ? masks.at(b, k)[t - k] : 1.f;
        }
        const bool add_final = p.dfinal_states && s >= l - H && final_step_kept(p, b, s - (l - H));
        for (int64_t c = c0; c < c1; c += kV) {
          const int64_t n = std::min(kV, c1 - c);
          Vec acc(0.f);
          for (int k = 0; k < W; ++k) {
            Vec wk = Vec::loadu(wt.data() + k * d + c, n);
            if constexpr (SEQ) wk = wk * Vec(m[k]);
            acc = at::vec::fmadd(wk, Vec::loadu(gk[k] + c, n), acc);
          }
          if (add_final) acc = acc + gather(p.dfinal_states + (b * d + c) * H + s - (l - H), H, n);
          if (s >= 0) store_vec(dxb + s * p.out_stride_t + c, acc, n);
          else scatter(p.dinitial_states + (b * d + c) * H + H + s, H, acc, n);
        }
      }
      float* slot = slots.data() + bt * (W + 1) * d;
      for (int k = 0; k <= W; ++k) std::copy(dw + k * range + c0, dw + k * range + c1, slot + k * d + c0);
    }
  }
  return nslots;
}

// ---- decode-step update -------------------------------------------------------------------------------

// The batch row's state row: conv_state_indices[b] (int32 or int64), or b itself; < 0 = padded row.
inline int64_t state_row(const CausalConv1dUpdateParams& p, int64_t b) {
  if (!p.conv_state_indices) return b;
  const int64_t at = b * p.indices_stride;
  return p.indices_i64 ? static_cast<const int64_t*>(p.conv_state_indices)[at]
                       : static_cast<const int32_t*>(p.conv_state_indices)[at];
}

// act(pre + bias) of n channels, stored in the output's dtype, kV channels per vector.
template <typename T, typename P>
inline void finish_channels(const float* pre, const P* bias, bool act, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += kV) {
    const int64_t m = std::min(kV, n - i);
    Vec v = Vec::loadu(pre + i, m);
    if (bias) v = v + load_vec(bias + i, m);
    if (act) v = silu(v);
    store_vec(out + i, v, m);
  }
}

// Channels per work item of the decode step: the item's pre-activations stay in a stack buffer, and a
// batch row of Falcon-H1-7B (3584 channels) splits into 14 items for the threads.
constexpr int64_t kUpdateBlock = 256;

// One decode step over the usual cache, H = w - 1 steps per channel, contiguous, and x's channels
// contiguous: n channels of one batch row. Per channel c,
//   taps = [state[c, 0..H), x[c]]     pre[c] = sum_k weight[c, k] taps[k]     state[c] <- taps[1..W)
// as one plain loop over the channels, which the compiler vectorizes (the stride-H loads and stores of
// the state become in-register permutes): the state is read, used and shifted in place in one pass.
template <typename T, typename P, int W>
void update_step_block(const T* x, T* state, const P* weight, const P* bias, bool act, T* out, int64_t n) {
  constexpr int H = W - 1;
  __at_align__ float pre[kUpdateBlock];
  for (int64_t c = 0; c < n; ++c) {
    T taps[W];
    for (int k = 0; k < H; ++k) taps[k] = state[c * H + k];
    taps[H] = x[c];
    float acc = 0.f;
    for (int k = 0; k < W; ++k) acc += static_cast<float>(weight[c * W + k]) * static_cast<float>(taps[k]);
    pre[c] = acc;
    for (int k = 0; k < H; ++k) state[c * H + k] = taps[k + 1];
  }
  finish_channels(pre, bias, act, out, n);
}

// Any other case (a longer or strided state, strided x, several new steps), per kV channels: the
// window [state | x] of each channel is widened to fp32, the outputs of each step computed from it,
// and the newest state_len steps written back.
template <typename T, typename P, int W>
void update_general_block(const CausalConv1dUpdateParams& p, const T* xb, T* sb, const P* wc, const P* bc, T* ob,
                          int64_t n, float* buf) {
  constexpr int H = W - 1;
  const int64_t S = p.state_len, l = p.seqlen, span = S + l, ss_c = p.state_stride_c, ss_t = p.state_stride_t;
  __at_align__ float pre[kV];
  T out_t[kV];
  for (int64_t i = 0; i < n; ++i) {  // buf[i * span + j]: channel i, step j of [state | x]
    float* bi = buf + i * span;
    for (int64_t j = 0; j < S; ++j) bi[j] = static_cast<float>(sb[i * ss_c + j * ss_t]);
    for (int64_t t = 0; t < l; ++t) bi[S + t] = static_cast<float>(xb[i * p.x_stride_c + t * p.x_stride_t]);
  }
  for (int64_t t = 0; t < l; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      const float* win = buf + i * span + S - H + t;  // the W taps of step t
      float acc = 0.f;
      for (int k = 0; k < W; ++k) acc += static_cast<float>(wc[i * W + k]) * win[k];
      pre[i] = acc;
    }
    finish_channels(pre, bc, p.silu, out_t, n);
    for (int64_t i = 0; i < n; ++i) ob[i * l + t] = out_t[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* bi = buf + i * span + l;  // the newest S steps
    for (int64_t j = 0; j < S; ++j) sb[i * ss_c + j * ss_t] = T(bi[j]);
  }
}

// Work items: (batch row, block of channels). A padded row (negative state index) gets a zero output.
template <typename T, typename P, int W>
void update_impl(const CausalConv1dUpdateParams& p) {
  constexpr int H = W - 1;
  const int64_t d = p.dim, l = p.seqlen;
  const bool step = l == 1 && p.state_len == H && p.state_stride_t == 1 && p.state_stride_c == H &&
                    p.x_stride_c == 1;
  const int64_t block = step ? kUpdateBlock : kV;
  const int64_t nblocks = (d + block - 1) / block;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  T* state = static_cast<T*>(p.conv_state);
  const P* weight = static_cast<const P*>(p.weight);
  const P* bias = static_cast<const P*>(p.bias);
#pragma omp parallel if (p.batch * d * l >= kParallelMin)
  {
    std::vector<float> buf(step ? 0 : kV * (p.state_len + l));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < p.batch * nblocks; ++it) {
      const int64_t b = it / nblocks, c = (it % nblocks) * block, n = std::min(block, d - c);
      const int64_t row = state_row(p, b);
      T* ob = out + (b * d + c) * l;
      if (row < 0) {
        std::fill(ob, ob + n * l, T(0.f));
        continue;
      }
      const T* xb = x + b * p.x_stride_b + c * p.x_stride_c;
      T* sb = state + row * p.state_stride_b + c * p.state_stride_c;
      const P* bc = bias ? bias + c : nullptr;
      if (step) update_step_block<T, P, W>(xb, sb, weight + c * W, bc, p.silu, ob, n);
      else update_general_block<T, P, W>(p, xb, sb, weight + c * W, bc, ob, n, buf.data());
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
  dispatch_conv(p.dtype, p.width, p.params_f32, [&](auto t, auto w, auto params_f32) {
    using T = decltype(t);
    using P = std::conditional_t<decltype(params_f32)::value, float, T>;
    update_impl<T, P, decltype(w)::value>(p);
  });
}

}  // namespace h1r::cpu::H1R_ISA
