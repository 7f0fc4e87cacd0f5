// RMSNorm and Mamba2's gated RMSNorm on CPU: rows in parallel (OpenMP), each row vectorized over the
// hidden dimension with at::vec in fp32 lanes (bf16 / fp16 are widened on load, narrowed on store).
//
// A row of a few thousand channels fits in L1/L2, so every kernel makes two sweeps over its row: the
// first reduces the statistic (mean of squares, or the mean of g * xn in the backward), the second
// writes the outputs. Memory traffic is then one read of each input and one write of each output.
//
// dweight is reduced deterministically: the rows are cut into at most kDweightBlocks fixed blocks, each
// block accumulates its own partial row of dweight, and the partials are summed in block order at the
// end. The result does not depend on the number of threads.
//
// The backward's second sweep recomputes what it needs from the row's inputs (in L1) instead of keeping
// fp32 copies from the first sweep, except where that would mean a second sigmoid. bf16 outputs are
// rounded by AVX512-BF16's vcvtneps2bf16 where the CPU has it (same bits as ATen's software rounding), and
// outputs too large to stay in the cache are written with non-temporal stores (narrow_store.h).
//
// Rows (and dweight blocks) are handed out dynamically: on a shared machine a descheduled thread does not
// hold up the others, and the fixed block partition keeps dweight deterministic.

#define H1R_SILENCE_UNINITIALIZED
#include "cpu/vec_diagnostics.h"
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/float_io.h"
#include "cpu/narrow_store.h"
#include "cpu/rms_norm.h"

namespace h1r::cpu::H1R_ISA {
namespace {

// Every kernel reads a row (or group) of its streamed inputs in sweep 1 and then works out of L1 in
// sweep 2: the hardware prefetchers, which follow the demand misses, then idle during sweep 2, and one
// thread sees DRAM latency again at the start of each row. Sweep 2 hints the NEXT row's lines (the same
// offset one row ahead: rows are contiguous) into the cache, so that memory works while sweep 2 computes.
// A prefetch past the end of a tensor is a hint only and does not fault.
template <typename T>
inline void prefetch_next(const T* row_ahead) {
  __builtin_prefetch(row_ahead, 0, 3);
}

inline float sum_lanes(const VF& v) {
  return at::vec::vec_reduce_all<float>([](const VF& a, const VF& b) { return a + b; }, v);
}

// 1 / a: the hardware's approximate reciprocal (rel. error < 2^-14 on AVX-512, 1.5 * 2^-12 on AVX2) refined by
// one Newton step r (2 - a r), i.e. to within an ulp or two of fp32, at a fraction of a vector division's
// cost (a 512-bit vdivps issues once every 8-16 cycles; the gated norm does one per vector).
inline VF reciprocal(const VF& a) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(a);
  return VF(_mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.f))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r = _mm256_rcp_ps(a);
  return VF(_mm256_mul_ps(r, _mm256_fnmadd_ps(a, r, _mm256_set1_ps(2.f))));
#else
  return VF(1.f) / a;
#endif
}

// The gate: sigmoid(z) = 1 / (1 + e) and 1 - sigmoid(z) = e * sigmoid(z), with e = exp(-z); silu(z) = z * sigmoid(z)
// and silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))). 1 - sigmoid is formed from e rather than by a
// subtraction: silu' multiplies it by z, which would turn the last-bit error of a sigmoid near 1 into an
// error of z ulps. exp_u20 (ATen's inline polynomial exp, <= 20 ulp; the Sleef call of exp() spills every
// vector register and made the gated norm compute-bound) saturates to +inf below z = -88.7: e is clamped
// to FLT_MAX so that 1 + e, its refined reciprocal (0 or a denormal) and e * sigmoid stay finite.
struct Sigmoid {
  VF s;            // sigmoid(z)
  VF one_minus_s;  // 1 - sigmoid(z)
};
inline Sigmoid sigmoid(const VF& z) {
  const VF e = at::vec::minimum(z.neg().exp_u20(), VF(std::numeric_limits<float>::max()));
  const VF s = reciprocal(VF(1.f) + e);
  return {s, e * s};
}
inline VF dsilu(const VF& z, const Sigmoid& sg) { return sg.s * (VF(1.f) + z * sg.one_minus_s); }

// Rows [begin, end) of block `blk` when `rows` rows are cut into `nblocks` equal blocks.
inline std::pair<int64_t, int64_t> block_rows(int64_t blk, int64_t rows, int64_t nblocks) {
  const int64_t per = (rows + nblocks - 1) / nblocks;
  return {std::min(rows, blk * per), std::min(rows, (blk + 1) * per)};
}

// The weight as fp32: w itself when it is fp32, else widened once into buf (per thread), so that the
// row sweeps do not convert it again for every row.
template <typename W>
const float* weight_f32(const W* w, int64_t d, std::vector<float>& buf) {
  if constexpr (std::is_same_v<W, float>) {
    return w;
  } else {
    buf.resize(d);
    for_lanes(d, [&](int64_t i, int64_t n) { store_n(buf.data() + i, load_n(w + i, n), n); });
    return buf.data();
  }
}

// dweight[j] = sum over blocks (in order) of partial[blk, j]. Called by every thread of the backward's
// parallel region (an orphaned omp for: the columns are shared out in slices, no second fork / join).
void reduce_dweight(const float* partial, float* dweight, int64_t nblocks, int64_t d) {
  constexpr int64_t kCols = 256;
#pragma omp for schedule(dynamic, 1)
  for (int64_t j0 = 0; j0 < d; j0 += kCols) {
    const int64_t len = std::min(kCols, d - j0);
    for_lanes(len, [&](int64_t i, int64_t n) {
      VF acc(0.f);
      for (int64_t blk = 0; blk < nblocks; ++blk) acc = acc + load_n(partial + blk * d + j0 + i, n);
      store_n(dweight + j0 + i, acc, n);
    });
  }
}

// ---- RMSNorm (+ residual) ----------------------------------------------------------------------

// The backward's loop over rows: the rows are cut into p.nblocks blocks (handed out one at a time); each
// block accumulates its dweight into its own fp32 partial row, and the partial rows are summed in block
// order at the end (deterministic, no atomics). Per thread: the weight as fp32 and four fp32 scratch
// buffers of `scratch_len` (kept in L1 / L2 across a row's sweeps). row(cvt, row, w, dw, s) does one row,
// s[0..3] being the scratch buffers and cvt the narrowing policy (narrow_store.h), chosen once per block.
template <typename T, typename W, typename P, typename Row>
void bwd_row_blocks(const P& p, int64_t scratch_len, Row&& row) {
  const int64_t d = p.d;
#pragma omp parallel
  {
    std::vector<float> wbuf, scratch(4 * scratch_len);
    float* const s[4] = {scratch.data(), scratch.data() + scratch_len, scratch.data() + 2 * scratch_len,
                         scratch.data() + 3 * scratch_len};
    const float* w = weight_f32(static_cast<const W*>(p.weight), d, wbuf);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < p.nblocks; ++blk) {
      float* dw = p.dweight_partial + blk * d;
      std::fill(dw, dw + d, 0.f);
      const auto [begin, end] = block_rows(blk, p.rows, p.nblocks);
      with_cvt<T>(p.hw_bf16, [&](auto cvt) {
        for (int64_t r = begin; r < end; ++r) row(cvt, r, w, dw, s);
      });
    }
    stream_fence();
    reduce_dweight(p.dweight_partial, p.dweight, p.nblocks, d);  // after the loop's barrier
  }
}

// One row of the forward: h = x (+ residual), rstd, out. Cvt narrows to T; out is written with
// non-temporal stores when kStream (narrow_store.h).
template <typename Cvt, bool kStream, typename T>
inline void rms_norm_fwd_row(const RmsNormFwdParams& p, const float* w, int64_t row) {
  const int64_t d = p.d;
  const T* xr = static_cast<const T*>(p.x) + row * d;
  const T* residual = static_cast<const T*>(p.residual);
  T* outr = static_cast<T*>(p.out) + row * d;
  // 1. h = x (+ residual, rounded to T: it is also the new residual), and sum(h^2) in fp32.
  const T* h = xr;
  VF sumsq(0.f);
  if (residual) {
    const T* rr = residual + row * d;
    T* hr = static_cast<T*>(p.residual_out) + row * d;
    for_lanes(d, [&](int64_t i, int64_t n) {
      const VF hv = Cvt::template round<T>(load_n(xr + i, n) + load_n(rr + i, n));
      Cvt::store(hr + i, hv, n);
      sumsq = at::vec::fmadd(hv, hv, sumsq);
    });
    h = hr;
  } else {
    for_lanes(d, [&](int64_t i, int64_t n) {
      const VF hv = load_n(xr + i, n);
      sumsq = at::vec::fmadd(hv, hv, sumsq);
    });
  }
  const float rstd = 1.f / std::sqrt(sum_lanes(sumsq) / static_cast<float>(d) + p.eps);
  p.rstd[row] = rstd;
  // 2. out = T(w * T(h * rstd)): normalized in fp32, cast to the input type, then scaled.
  const VF vrstd(rstd);
  for_lanes(d, [&](int64_t i, int64_t n) {
    prefetch_next(xr + d + i);
    if (residual) prefetch_next(residual + (row + 1) * d + i);
    const VF xn = Cvt::template round<T>(load_n(h + i, n) * vrstd);
    put<kStream, Cvt>(outr + i, load_n(w + i, n) * xn, n);
  });
}

template <typename T, typename W>
void rms_norm_fwd_impl(const RmsNormFwdParams& p) {
  const bool stream = stream_rows(p.out, p.rows, p.d * sizeof(T));
#pragma omp parallel
  {
    std::vector<float> wbuf;
    const float* w = weight_f32(static_cast<const W*>(p.weight), p.d, wbuf);
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < p.rows; ++row) {
      with_cvt<T>(p.hw_bf16, [&](auto cvt) {
        if (stream) rms_norm_fwd_row<decltype(cvt), true, T>(p, w, row);
        else rms_norm_fwd_row<decltype(cvt), false, T>(p, w, row);
      });
    }
    stream_fence();
  }
}

// One row of the backward. Sweep 1 reduces c = mean(g * xn) (g = dout * w, the gradient w.r.t. the
// normalized row xn = h * rstd) and adds dout * T(xn) to the block's dweight; sweep 2 recomputes g and xn
// from the row's dout and h, still in L1 (two T rows: a third of the bytes of fp32 copies of g and xn kept
// from sweep 1, and no stores), and writes dh = rstd * (g - xn * c) (+ dresidual_out).
template <typename Cvt, bool kStream, typename T>
inline void rms_norm_bwd_row(const RmsNormBwdParams& p, const float* w, float* dw, int64_t row) {
  const int64_t d = p.d;
  const T* dyr = static_cast<const T*>(p.dout) + row * d;
  const T* hr = static_cast<const T*>(p.h) + row * d;
  const T* drr = p.dresidual_out ? static_cast<const T*>(p.dresidual_out) + row * d : nullptr;
  T* dhr = static_cast<T*>(p.dh) + row * d;
  const VF vrstd(p.rstd[row]);
  VF acc(0.f);
  for_lanes(d, [&](int64_t i, int64_t n) {
    const VF dy = load_n(dyr + i, n);
    const VF xv = load_n(hr + i, n) * vrstd;
    acc = at::vec::fmadd(dy * load_n(w + i, n), xv, acc);
    store_n(dw + i, at::vec::fmadd(dy, Cvt::template round<T>(xv), load_n(dw + i, n)), n);
  });
  const VF c(sum_lanes(acc) / static_cast<float>(d));
  for_lanes(d, [&](int64_t i, int64_t n) {
    prefetch_next(dyr + d + i);
    prefetch_next(hr + d + i);
    const VF g = load_n(dyr + i, n) * load_n(w + i, n);
    VF dhv = vrstd * (g - load_n(hr + i, n) * vrstd * c);
    if (drr) dhv = dhv + load_n(drr + i, n);
    put<kStream, Cvt>(dhr + i, dhv, n);
  });
}

template <typename T, typename W>
void rms_norm_bwd_impl(const RmsNormBwdParams& p) {
  const bool stream = stream_rows(p.dh, p.rows, p.d * sizeof(T));
  bwd_row_blocks<T, W>(p, 0, [&](auto cvt, int64_t row, const float* w, float* dw, float* const*) {
    if (stream) rms_norm_bwd_row<decltype(cvt), true, T>(p, w, dw, row);
    else rms_norm_bwd_row<decltype(cvt), false, T>(p, w, dw, row);
  });
}

// ---- gated RMSNorm (Mamba2) --------------------------------------------------------------------

// One row of the gated forward, group by group. u: one group in fp32 (per thread). Cvt narrows to T; out
// is written with non-temporal stores when kStream.
template <typename Cvt, bool kStream, typename T>
inline void gated_fwd_row(const GatedRmsNormFwdParams& p, const float* w, float* u, int64_t row) {
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.z);
  T* out = static_cast<T*>(p.out);
  const int64_t d = p.d, gs = p.group_size, ngroups = d / gs;
  const bool gate_before = z && !p.norm_before_gate;  // normalize u = x * silu(z)
  const bool gate_after = z && p.norm_before_gate;    // out = norm(x) * w * silu(z)
  for (int64_t grp = 0; grp < ngroups; ++grp) {
    const int64_t off = row * d + grp * gs, zoff = row * p.z_stride + grp * gs;
    // 1. u = x (or x * silu(z)) and sum(u^2).
    VF sumsq(0.f);
    for_lanes(gs, [&](int64_t i, int64_t n) {
      VF uv = load_n(x + off + i, n);
      if (gate_before) {
        const VF zv = load_n(z + zoff + i, n);
        uv = uv * zv * sigmoid(zv).s;
      }
      store_n(u + i, uv, n);
      sumsq = at::vec::fmadd(uv, uv, sumsq);
    });
    const float rstd = 1.f / std::sqrt(sum_lanes(sumsq) / static_cast<float>(gs) + p.eps);
    p.rstd[row * ngroups + grp] = rstd;
    // 2. out = u * rstd * w (* silu(z)), one cast at the end.
    const VF vrstd(rstd);
    for_lanes(gs, [&](int64_t i, int64_t n) {
      prefetch_next(x + off + gs + i);  // the next group or row
      if (z) prefetch_next(z + zoff + gs + i);
      VF y = load_n(u + i, n) * vrstd * load_n(w + grp * gs + i, n);
      if (gate_after) {
        const VF zv = load_n(z + zoff + i, n);
        y = y * zv * sigmoid(zv).s;
      }
      put<kStream, Cvt>(out + off + i, y, n);
    });
  }
}

template <typename T, typename W>
void gated_rms_norm_fwd_impl(const GatedRmsNormFwdParams& p) {
  const bool stream = stream_rows(p.out, p.rows * (p.d / p.group_size), p.group_size * sizeof(T));
#pragma omp parallel
  {
    std::vector<float> u(p.group_size), wbuf;
    const float* w = weight_f32(static_cast<const W*>(p.weight), p.d, wbuf);
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < p.rows; ++row) {
      with_cvt<T>(p.hw_bf16, [&](auto cvt) {
        if (stream) gated_fwd_row<decltype(cvt), true, T>(p, w, u.data(), row);
        else gated_fwd_row<decltype(cvt), false, T>(p, w, u.data(), row);
      });
    }
    stream_fence();
  }
}

// Where the gate silu(z) sits: no z; before the norm (u = x * silu(z) is normalized); after it
// (out = norm(x) * w * silu(z)). A template parameter, so that the inner loops carry no branch on it.
enum class Gate { none, before, after };
template <Gate G>
using GateC = std::integral_constant<Gate, G>;

// Backward of one group of gs channels (the pointers point at the group). xh is the normalized input
// (xn = x * rstd, or un = x * silu(z) * rstd) and g = dy * w the gradient w.r.t. xh (dy: the gradient
// reaching the norm's output, dout, or dout * silu(z) when the gate comes after the norm). Sweep 2 works out
// of L1: it recomputes g and xh from the group's dout and x where that needs no sigmoid (no gate; the gate
// first, with silu(z) kept from sweep 1 together with x * silu'(z), the factors that carry the pre-norm
// gradient du to dx and dz), and reads them from sweep 1's fp32 copies when the gate comes after the norm.
// s: four fp32 scratch rows of gs. dx and dz are stored non-temporally when kStream.
// (A function of plain values: the inner loops then keep them in registers, where a lambda capturing by
// reference would reload them after every store of bf16 data, which may alias anything.)
template <Gate G, typename Cvt, bool kStream, typename T>
inline void gated_bwd_group(const T* dout, const T* x, const T* z, T* dx, T* dz, const float* w, float* dw,
                            float rstd, int64_t gs, float* const* s) {
  float* const xh = s[0];
  float* const g = s[1];
  float* const silu = s[2];
  float* const xdsilu = s[3];
  const VF vrstd(rstd);
  // 1. xh, g and c = mean(g * xh); dz when the gate comes after the norm (it needs no c);
  //    dweight += dy * xh.
  VF acc(0.f);
  for_lanes(gs, [&](int64_t i, int64_t n) {
    VF dy = load_n(dout + i, n);
    const VF xv = load_n(x + i, n);
    VF xhv;
    if constexpr (G == Gate::none) {
      xhv = xv * vrstd;
    } else {
      const VF zv = load_n(z + i, n);
      const Sigmoid sg = sigmoid(zv);
      const VF sv = zv * sg.s;
      if constexpr (G == Gate::before) {
        xhv = xv * sv * vrstd;
        store_n(silu + i, sv, n);
        store_n(xdsilu + i, xv * dsilu(zv, sg), n);
      } else {
        xhv = xv * vrstd;
        put<kStream, Cvt>(dz + i, dy * xhv * load_n(w + i, n) * dsilu(zv, sg), n);
        dy = dy * sv;
      }
    }
    const VF gv = dy * load_n(w + i, n);
    store_n(dw + i, at::vec::fmadd(dy, xhv, load_n(dw + i, n)), n);
    if constexpr (G == Gate::after) {
      store_n(xh + i, xhv, n);
      store_n(g + i, gv, n);
    }
    acc = at::vec::fmadd(gv, xhv, acc);
  });
  const VF c(sum_lanes(acc) / static_cast<float>(gs));
  // 2. d(pre-norm) = rstd * (g - xh * c); through the gate when it came first.
  for_lanes(gs, [&](int64_t i, int64_t n) {
    VF gv, xhv;
    if constexpr (G == Gate::after) {
      gv = load_n(g + i, n);
      xhv = load_n(xh + i, n);
    } else {
      gv = load_n(dout + i, n) * load_n(w + i, n);
      xhv = load_n(x + i, n);
      if constexpr (G == Gate::before) xhv = xhv * load_n(silu + i, n);
      xhv = xhv * vrstd;
    }
    const VF du = vrstd * (gv - xhv * c);
    if constexpr (G == Gate::before) {
      put<kStream, Cvt>(dx + i, du * load_n(silu + i, n), n);
      put<kStream, Cvt>(dz + i, du * load_n(xdsilu + i, n), n);
    } else {
      put<kStream, Cvt>(dx + i, du, n);
    }
  });
}

template <typename T, typename W>
void gated_rms_norm_bwd_impl(const GatedRmsNormBwdParams& p) {
  const T* dout = static_cast<const T*>(p.dout);
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.z);
  T* dx = static_cast<T*>(p.dx);
  T* dz = static_cast<T*>(p.dz);
  const int64_t d = p.d, gs = p.group_size, ngroups = d / gs;
  // dx and dz are streamed when both may be (they have the same size and row layout).
  const bool stream = stream_rows(dx, p.rows * ngroups, gs * sizeof(T)) && (!dz || stream_rows(dz, p.rows * ngroups, gs * sizeof(T)));
  auto run = [&](auto gate) {
    bwd_row_blocks<T, W>(p, gs, [&](auto cvt, int64_t row, const float* w, float* dw, float* const* s) {
      auto group = [&](auto stream_c) {
        for (int64_t grp = 0; grp < ngroups; ++grp) {
          const int64_t off = row * d + grp * gs;
          gated_bwd_group<decltype(gate)::value, decltype(cvt), decltype(stream_c)::value>(
              dout + off, x + off, z ? z + off : nullptr, dx + off, dz ? dz + off : nullptr, w + grp * gs,
              dw + grp * gs, p.rstd[row * ngroups + grp], gs, s);
        }
      };
      if (stream) group(std::true_type{});
      else group(std::false_type{});
    });
  };
  if (!z) run(GateC<Gate::none>{});
  else if (p.norm_before_gate) run(GateC<Gate::after>{});
  else run(GateC<Gate::before>{});
}

// Instantiate body<T, W> for the runtime types (x and weight types are independent).
template <template <typename, typename> class Impl, typename P>
void dispatch_types(const P& p) {
  with_float_type(p.dtype, [&](auto t) {
    with_float_type(p.wdtype, [&](auto wt) { Impl<decltype(t), decltype(wt)>::run(p); });
  });
}

#define H1R_IMPL_STRUCT(name, Params)                      \
  template <typename T, typename W>                        \
  struct name##_s {                                        \
    static void run(const Params& p) { name<T, W>(p); }    \
  };
H1R_IMPL_STRUCT(rms_norm_fwd_impl, RmsNormFwdParams)
H1R_IMPL_STRUCT(rms_norm_bwd_impl, RmsNormBwdParams)
H1R_IMPL_STRUCT(gated_rms_norm_fwd_impl, GatedRmsNormFwdParams)
H1R_IMPL_STRUCT(gated_rms_norm_bwd_impl, GatedRmsNormBwdParams)
#undef H1R_IMPL_STRUCT

}  // namespace

void rms_norm_fwd_kernel(const RmsNormFwdParams& p) { dispatch_types<rms_norm_fwd_impl_s>(p); }
void rms_norm_bwd_kernel(const RmsNormBwdParams& p) { dispatch_types<rms_norm_bwd_impl_s>(p); }
void gated_rms_norm_fwd_kernel(const GatedRmsNormFwdParams& p) { dispatch_types<gated_rms_norm_fwd_impl_s>(p); }
void gated_rms_norm_bwd_kernel(const GatedRmsNormBwdParams& p) { dispatch_types<gated_rms_norm_bwd_impl_s>(p); }

}  // namespace h1r::cpu::H1R_ISA
