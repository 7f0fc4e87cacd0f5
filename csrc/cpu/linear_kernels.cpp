// Linear layer for a few rows of input (decode): out = alpha * act(x @ W^T * scale + bias) (+ residual),
// and the SwiGLU of a [gate | up] GEMM output for the many-row (prefill) case, where the GEMM is the BLAS's.
//
// With m (rows of x) small, the product is a stream over the weight matrix: every weight element is
// used m times, so the time is the time to read W once, and the kernel must (1) read each weight row
// from memory once for all rows of x, (2) keep enough independent loads in flight to saturate the
// memory, and (3) do its arithmetic in the shadow of the loads. Layout of the work:
//
//   * the output columns (weight rows) are cut into blocks of kBlock; threads take contiguous runs of
//     blocks (OpenMP static), so each thread streams one contiguous slab of W;
//   * every tile prefetches the rows of the next one (the following rows of W) at the columns it reads:
//     a matrix streamed from DRAM (the 64 MiB lm head) is otherwise latency-bound (measured: 2.5 ms vs
//     3.0 at one row, 3.5 vs 8.7 ms at four);
//   * inside a block, a micro tile holds kRW weight rows x kRX rows of x as kRW * kRX fp32 vector
//     accumulators over k: each weight vector loaded is used kRX times (from registers), each x vector
//     kRW times; the kRW weight rows stay in L1 while the tile walks over all rows of x, so W leaves
//     memory once whatever m is;
//   * bf16 on a CPU with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32
//     lanes in one instruction (no widening at all, x is read as bf16); otherwise the weights are
//     widened to fp32 in registers and x was widened once up front;
//   * the epilogue (muP scale, bias, SwiGLU, alpha, residual add) runs in fp32 on the block's tile before
//     its single rounding to the output dtype, so no intermediate tensor is written.
// bf16 batches of 5+ rows run on AMX tiles where the CPU has them (linear_amx below: the same epilogue).
#define H1R_SILENCE_UNINITIALIZED
#include "cpu/vec_diagnostics.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/float_io.h"
#include "cpu/linear.h"
#include "cpu/narrow_store.h"

namespace h1r::cpu::H1R_ISA {
namespace {

// Micro tile: weight rows x rows of x. AVX-512 has 32 vector registers (16 accumulators + 4 weight +
// 1 x in flight); AVX2 has 16, so it keeps 4 x 2 accumulators.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRW = 4, kRX = 4;
#else
constexpr int kRW = 4, kRX = 2;
#endif
constexpr int64_t kBlock = 16;  // output columns per block: a thread's unit of work

// f(std::integral_constant<int, v>{}) for a run-time 1 <= v <= N (instantiates the tile sizes).
template <int N, typename F>
inline void with_const(int v, F&& f) {
  if constexpr (N >= 1) {
    if (v == N) f(std::integral_constant<int, N>{});
    else with_const<N - 1>(v, std::forward<F>(f));
  }
}

inline float hsum(const VF& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(__m512(v));
#else
  return at::vec::vec_reduce_all<float>([](VF& a, VF& b) { return a + b; }, v);
#endif
}

// tile[i * ld + r] = x_i . w_r over k for RX rows of x (fp32) and RW rows of w (T, widened in registers).
template <int RW, int RX, typename T>
void dot_tile(const T* w, int64_t ws, const float* x, int64_t xs, int64_t k, float* tile, int64_t ld) {
  VF acc[RX][RW];
  for (int i = 0; i < RX; ++i)
    for (int r = 0; r < RW; ++r) acc[i][r] = VF(0.f);
  auto step = [&](int64_t c, int64_t n) {
    VF wv[RW];
    if constexpr (kLanes >= 8)  // the next tile's rows, as in dot_tile_bf16 (not per element in scalar code)
      for (int r = 0; r < RW; ++r) __builtin_prefetch(w + (RW + r) * ws + c);
    for (int r = 0; r < RW; ++r) wv[r] = n == kLanes ? load_f(w + r * ws + c) : load_f(w + r * ws + c, n);
    for (int i = 0; i < RX; ++i) {
      const VF xv = n == kLanes ? VF::loadu(x + i * xs + c) : VF::loadu(x + i * xs + c, n);
      for (int r = 0; r < RW; ++r) acc[i][r] = at::vec::fmadd(xv, wv[r], acc[i][r]);
    }
  };
  int64_t c = 0;
  for (; c + kLanes <= k; c += kLanes) step(c, kLanes);
  if (c < k) step(c, k - c);
  for (int i = 0; i < RX; ++i)
    for (int r = 0; r < RW; ++r) tile[i * ld + r] = hsum(acc[i][r]);
}

#if defined(CPU_CAPABILITY_AVX512)
// The same with x and w both bf16, on vdpbf16ps: acc[l] += x[2l] w[2l] + x[2l+1] w[2l+1] over 32 pairs
// of k per instruction (products exact in fp32, sums rounded to nearest even, denormals flushed).
template <int RW, int RX>
__attribute__((target("avx512bf16"))) void dot_tile_bf16(const c10::BFloat16* w, int64_t ws,
                                                          const c10::BFloat16* x, int64_t xs, int64_t k,
                                                          float* tile, int64_t ld) {
  __m512 acc[RX][RW];
  for (int i = 0; i < RX; ++i)
    for (int r = 0; r < RW; ++r) acc[i][r] = _mm512_setzero_ps();
  auto step = [&](int64_t c, __mmask32 mask, bool full) __attribute__((target("avx512bf16"))) {
    __m512bh wv[RW];
    // the next tile's rows (the following RW rows of W), one tile of lead time: a weight matrix that
    // comes from DRAM is otherwise latency-bound once the dot products per line grow with the rows of x
    for (int r = 0; r < RW; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (RW + r) * ws + c), _MM_HINT_T0);
    for (int r = 0; r < RW; ++r)
      wv[r] = (__m512bh)(full ? _mm512_loadu_si512(w + r * ws + c) : _mm512_maskz_loadu_epi16(mask, w + r * ws + c));
    for (int i = 0; i < RX; ++i) {
      const __m512bh xv =
          (__m512bh)(full ? _mm512_loadu_si512(x + i * xs + c) : _mm512_maskz_loadu_epi16(mask, x + i * xs + c));
      for (int r = 0; r < RW; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  };
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) step(c, ~__mmask32(0), true);
  if (c < k) step(c, (__mmask32)((1ull << (k - c)) - 1), false);
  for (int i = 0; i < RX; ++i)
    for (int r = 0; r < RW; ++r) tile[i * ld + r] = _mm512_reduce_add_ps(acc[i][r]);
}
#endif

// silu(v) = v / (1 + exp(-v)), with ATen's polynomial exp (20 ulp: far below a bf16 rounding, and the
// exp is most of the activation's cost)
inline VF silu(const VF& v) { return v / (VF(1.f) + v.neg().exp_u20()); }

// fp32 epilogue of one block (columns j0 .. j0 + nb of the output) for every row of x; tile row i holds
// the dot products of the block's weight rows (and, with SwiGLU, the matching "up" rows at +kBlock).
// Rows i0 .. i1 of x: tile row i - i0.
template <typename T>
void epilogue(const LinearParams& p, const float* tile, int64_t ld, int64_t j0, int64_t nb, int64_t n_out,
              int64_t i0, int64_t i1) {
  const float* scale = p.scale;
  const float* bias = p.bias;
  const VF alpha(p.alpha);
  auto affine = [&](const float* y, int64_t col, int64_t n) {  // y * scale[col] + bias[col]
    VF v = VF::loadu(y, n);
    if (scale) v = v * VF::loadu(scale + col, n);
    if (bias) v = v + VF::loadu(bias + col, n);
    return v;
  };
  for (int64_t i = i0; i < i1; ++i) {
    const float* row = tile + (i - i0) * ld;
    T* out = static_cast<T*>(p.out) + i * p.out_stride + j0;
    const T* res = p.residual ? static_cast<const T*>(p.residual) + i * p.res_stride + j0 : nullptr;
    for_lanes(nb, [&](int64_t c, int64_t n) {
      VF v = affine(row + c, j0 + c, n);
      if (p.swiglu) {
        const VF up = affine(row + kBlock + c, n_out + j0 + c, n);
        v = silu(v) * up;
      }
      v = v * alpha;
      if (res) v = v + load_n(res + c, n);
      store_n(out + c, v, n);
    });
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// ---- many rows of bf16 on AMX tiles ----------------------------------------------------------------
// With more than a few rows the product is compute-bound and AMX's tile multiply (TDPBF16PS: a 16 x 32
// bf16 tile times a 32 x 16 one into 16 x 16 fp32, 16K FLOP per instruction) is the fast unit. A BLAS
// (oneDNN) must first reorder the weight into its blocked layout on every call (the weight is the
// tiles' "B" operand, which must be pair-interleaved along k): a full read + write of the weight per call.
// Here the roles are swapped: out^T = W x^T, so the weight is the "A" operand, whose tiles are 16 plain
// rows of 32 k-elements loaded straight from W (row stride w_stride), and x, the small side, is the
// one repacked (once per call) into B tiles:
//
//   xp block (mb, kb) = the 16 x 16 pairs tile[kk][j] = (x[16 mb + j][32 kb + 2 kk], x[..][.. + 1]),
//   zero rows past m;
//   for each panel of weight rows (two A tiles: 32 output columns, or with SwiGLU 16 gate + the 16
//   matching up rows) and each block of 32 rows of x (two B tiles; one where the block has at most 16
//   rows, as a decode batch of <= 16 does: no multiplies of zero rows), four (two) accumulator tiles run
//   over k; they hold out^T, transposed into the fp32 tile of the shared epilogue (scale, bias, SwiGLU,
//   alpha, residual: one rounding, no intermediate tensor).
//
// Threads take contiguous runs of panels: each streams its own slab of W once; the panel (32 rows x k)
// stays in L2 while the blocks of x pass, and xp (m x k bf16) is shared, read from L2 / L3; a block of xp
// is packed by the first thread that needs it (XpPacker), no barrier before the first multiply.
// Every k step loads 4 KiB of tiles from L2 for four multiplies, so the tile unit is fed at about the rate
// L2 can serve (the same loop with every operand from L1, measured: 40-65 % faster). Vector work is kept
// off the tile unit's path: the epilogue of a block (four 16 x 16 transposes and the fp32 math, ~15 % of
// the time at k = 1024 when it ran between blocks) and the packing of the next block of x run between the
// two halves of a block's k loop, while its tile multiplies are queued.
// Measured and not kept (1-2 threads, 512 x 1024 rows and the decode batch of 16): copying the weight
// panel into contiguous tiles (its cost > the strided loads' cost), k slices of 4-16 steps with the
// accumulators spilled to L1 between them (the weight's or x's slice reused from L1 across blocks or
// panels), software prefetch of the operand tiles into L1, of the next panel into L2 (at 16 rows slower
// than the hardware streams: the prefetches hold line-fill buffers the L2 streamer does not need), of the
// output and residual lines, and a 2 MiB row chunk (xp then spills L2).
constexpr int64_t kAmxRows = 32;  // rows of x per block: two B tiles

// xp for rows 16 mb .. 16 mb + 15 of x (all k blocks), see above: each 16 rows x 32 k slice of x, read as
// 16 x 16 bf16 pairs, is one transpose away from its B tile.
void amx_pack_x(const c10::BFloat16* x, int64_t xs, int64_t m, int64_t k, int64_t mb, uint32_t* xp) {
  const int64_t nkb = k / 32;
  uint32_t* blk = xp + mb * nkb * 256;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    __m512 rows[16], tile[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t i = 16 * mb + j;
      rows[j] = i < m ? _mm512_castsi512_ps(_mm512_loadu_si512(x + i * xs + 32 * kb)) : _mm512_setzero_ps();
    }
    transpose16(rows, tile);
    for (int kk = 0; kk < 16; ++kk) _mm512_storeu_si512(blk + kb * 256 + kk * 16, _mm512_castps_si512(tile[kk]));
  }
}

// The epilogue's per-column vectors of one panel (its two 16-column halves: SwiGLU's gate and up), with
// alpha folded in where it multiplies linearly: out = y * scale + bias (alpha * (y * s + b)), or for SwiGLU
// silu(gate) * up with up's pair scaled by alpha. Loaded once for all the panel's rows.
struct AmxPanel {
  VF scale[2], bias[2];
};

AmxPanel amx_panel_vectors(const LinearParams& p, int64_t j0, int64_t n_out) {
  AmxPanel e;
  for (int a = 0; a < 2; ++a) {
    // the columns of half a: SwiGLU's up rows sit n_out further; the last panel's missing half is unused
    const int64_t col = p.swiglu ? a * n_out + j0 : j0 + 16 * a;
    const bool valid = p.swiglu || col < n_out;
    const VF alpha(p.swiglu && a == 0 ? 1.f : p.alpha);
    e.scale[a] = (p.scale && valid ? VF::loadu(p.scale + col) : VF(1.f)) * alpha;
    e.bias[a] = (p.bias && valid ? VF::loadu(p.bias + col) : VF(0.f)) * alpha;
  }
  return e;
}

// The fp32 epilogue (as epilogue() above) straight from the accumulator tiles of one panel and one block
// of ``rows`` rows of x starting at i0: each 16 x 16 tile of out^T is transposed in registers, then every
// row of x gets its 16 (SwiGLU) or 32 outputs scaled, activated, added and rounded once, by the narrowing
// policy Cvt (narrow_store.h: AVX512-BF16's vcvtneps2bf16 or ATen's software rounding, the same bits).
template <typename Cvt>
void amx_epilogue_impl(const LinearParams& p, const float* ct, bool two, int64_t j0, int64_t i0, int64_t rows,
                       const AmxPanel& e) {
  using T = c10::BFloat16;
  for (int b = 0; b < 2 && 16 * b < rows; ++b) {
    __m512 col[2][16];
    transpose16(ct + b * 256, col[0]);
    if (two) transpose16(ct + (2 + b) * 256, col[1]);
    for (int j = 0; j < 16 && 16 * b + j < rows; ++j) {
      const int64_t i = i0 + 16 * b + j;
      T* out = static_cast<T*>(p.out) + i * p.out_stride + j0;
      const T* res = p.residual ? static_cast<const T*>(p.residual) + i * p.res_stride + j0 : nullptr;
      if (p.swiglu) {
        const VF gate = at::vec::fmadd(VF(col[0][j]), e.scale[0], e.bias[0]);
        VF v = silu(gate) * at::vec::fmadd(VF(col[1][j]), e.scale[1], e.bias[1]);
        if (res) v = v + load_n(res, 16);
        Cvt::store(out, v, 16);
        continue;
      }
      for (int a = 0; a < (two ? 2 : 1); ++a) {
        VF v = at::vec::fmadd(VF(col[a][j]), e.scale[a], e.bias[a]);
        if (res) v = v + load_n(res + 16 * a, 16);
        Cvt::store(out + 16 * a, v, 16);
      }
    }
  }
}

void amx_epilogue(const LinearParams& p, const float* ct, bool two, int64_t j0, int64_t i0, int64_t rows,
                  const AmxPanel& e) {
  // the hardware rounding where the CPU has AVX512-BF16 (p.bf16_dot: cpu_has_avx512_bf16())
  with_cvt<c10::BFloat16>(p.bf16_dot, [&](auto cvt) {
    amx_epilogue_impl<decltype(cvt)>(p, ct, two, j0, i0, rows, e);
  });
}

// Accumulator tiles of one panel x one block of rows of x (tile numbers: C[a][b] = 2a + b, A tiles 4 + a,
// B tiles 6 + b): NA A tiles (weight rows wa[a]: 16 each) times NB B tiles (16 rows of x each; NB = 1
// where the block has at most 16 valid rows, as every block of a decode batch of <= 16: no multiplies of
// zero rows).
template <int NA, int NB>
__attribute__((target("amx-tile,amx-bf16"))) void amx_zero() {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (NA == 2) _tile_zero(2);
  if constexpr (NA == 2 && NB == 2) _tile_zero(3);
}

// C += A B over the k steps kb0 .. kb1 (32 k each): the weight's A tiles straight from its rows (stride
// ws elements), x's B tiles from its packed block (xb[b]: one 1 KiB tile per k step).
template <int NA, int NB>
__attribute__((target("amx-tile,amx-bf16"))) void amx_steps(const c10::BFloat16* w0, const c10::BFloat16* w1,
                                                             int64_t ws, const uint32_t* xb0, const uint32_t* xb1,
                                                             int64_t kb0, int64_t kb1) {
  const int64_t wbytes = ws * static_cast<int64_t>(sizeof(c10::BFloat16));
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    _tile_loadd(6, xb0 + kb * 256, 64);
    if constexpr (NB == 2) _tile_loadd(7, xb1 + kb * 256, 64);
    _tile_loadd(4, w0 + 32 * kb, wbytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA == 2) {
      _tile_loadd(5, w1 + 32 * kb, wbytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// ct[(2a + b) * 256 ..] = C[a][b] (16 x 16 fp32, rows of 64 bytes), for the epilogue
template <int NA, int NB>
__attribute__((target("amx-tile"))) void amx_store(float* ct) {
  _tile_stored(0, ct, 64);
  if constexpr (NB == 2) _tile_stored(1, ct + 256, 64);
  if constexpr (NA == 2) _tile_stored(2, ct + 512, 64);
  if constexpr (NA == 2 && NB == 2) _tile_stored(3, ct + 768, 64);
}

// f(NA, NB) with the tile counts as constants
template <typename F>
void with_tiles(bool two_a, bool two_b, F&& f) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  if (two_a) {
    if (two_b) f(I2{}, I2{});
    else f(I2{}, I1{});
  } else {
    if (two_b) f(I1{}, I2{});
    else f(I1{}, I1{});
  }
}

// A block whose accumulators are stored and whose epilogue is still to run.
struct AmxPending {
  const float* ct;
  bool two;
  int64_t j0, i0, rows;
  AmxPanel e;
};

// xp packed on demand, a pair of 16-row blocks (one block of 32 rows of x) at a time, by whichever thread
// needs it first, or ahead of need in the deferred-work slot of a block's k loop (its transposes then run
// while tile multiplies are queued, instead of before the first one: ~90 us of a 0.6-0.9 ms 512 x 1024 x
// 1024 projection). state[q]: 0 to do, 1 being packed, 2 done (release / acquire: the tiles' bytes).
struct XpPacker {
  const c10::BFloat16* x;
  int64_t xs, m, k;
  uint32_t* xp;
  std::atomic<uint8_t>* state;
  int64_t pairs;

  bool try_pack(int64_t q) {
    uint8_t expected = 0;
    if (!state[q].compare_exchange_strong(expected, 1, std::memory_order_acquire)) return false;
    amx_pack_x(x, xs, m, k, 2 * q, xp);
    amx_pack_x(x, xs, m, k, 2 * q + 1, xp);
    state[q].store(2, std::memory_order_release);
    return true;
  }
  // block q packed (by this thread, or waited for when the other one is at it)
  void need(int64_t q) {
    if (state[q].load(std::memory_order_acquire) == 2 || try_pack(q)) return;
    // the other thread is packing it (~3 us); yield now and then in case it was descheduled
    for (int spins = 1; state[q].load(std::memory_order_acquire) != 2; ++spins) {
      _mm_pause();
      if (spins % 1024 == 0) std::this_thread::yield();
    }
  }
  // pack one of the next two blocks from q if one is still to do
  void ahead(int64_t q) {
    for (int64_t r = q; r < std::min(pairs, q + 2); ++r)
      if (state[r].load(std::memory_order_relaxed) == 0 && try_pack(r)) return;
  }
};

// xp is kept by the calling thread between calls up to 32 MiB (4096 x 4096 rows of bf16; ThreadScratch:
// pack_x writes every element, so no zeroing). Aligned to a cache line: B tiles whose 64-byte rows straddle
// two lines (malloc's 16-byte alignment) made the 512-row projections 10-20 % slower (measured: 1.22-1.27
// vs 1.38-1.53 TF/s, one thread).
struct AmxXTag;
constexpr size_t kAmxKeepXBytes = size_t(32) << 20;

void linear_amx(const LinearParams& p) {
  using T = c10::BFloat16;
  const int64_t m = p.m, k = p.k, nkb = k / 32, n_out = p.swiglu ? p.n / 2 : p.n;
  const T* w = static_cast<const T*>(p.weight);
  const T* x = static_cast<const T*>(p.x);
  const int64_t m16 = (m + kAmxRows - 1) / kAmxRows * 2;  // blocks of 16 rows, padded to whole B-tile pairs
  const ThreadScratch<uint32_t, AmxXTag> xp_buf(m16 * nkb * 256, kAmxKeepXBytes);
  uint32_t* xp = xp_buf.data();
  // panels: 16 output columns with SwiGLU (gate + up rows), else 32 (the last one 16 when n_out % 32 == 16)
  // rows of x per pass over the weight: their xp (chunk x k bf16, ~1 MiB) stays in L2 while the panels pass
  const int64_t chunk = std::max<int64_t>(kAmxRows, (int64_t(1) << 19) / k / kAmxRows * kAmxRows);
  const int64_t cols = p.swiglu ? 16 : 32;
  const int64_t n_panels = (n_out + cols - 1) / cols;
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), n_panels));
  const int64_t pairs = m16 / 2;
  std::unique_ptr<std::atomic<uint8_t>[]> state(new std::atomic<uint8_t>[pairs]);
  for (int64_t q = 0; q < pairs; ++q) state[q].store(0, std::memory_order_relaxed);
  XpPacker packer{x, p.x_stride, m, k, xp, state.get(), pairs};
#pragma omp parallel num_threads(threads)
  {
    amx_configure();
    alignas(64) float ct[2][4 * 256];  // two blocks' accumulators: the one being finished, the pending one
    int cur = 0;
    AmxPending pending{nullptr, false, 0, 0, 0, {}};
    auto finish = [&]() {
      if (pending.ct) amx_epilogue(p, pending.ct, pending.two, pending.j0, pending.i0, pending.rows, pending.e);
      pending.ct = nullptr;
    };
    for (int64_t c0 = 0; c0 < m; c0 += chunk) {
      const int64_t c1 = std::min(m, c0 + chunk);
#pragma omp for schedule(static) nowait
      for (int64_t pi = 0; pi < n_panels; ++pi) {
        const int64_t j0 = pi * cols, nb = std::min(cols, n_out - j0);
        const T* w0 = w + j0 * p.w_stride;
        const T* w1 = p.swiglu ? w + (n_out + j0) * p.w_stride : w0 + 16 * p.w_stride;
        const bool two = p.swiglu || nb > 16;
        const AmxPanel ep = amx_panel_vectors(p, j0, n_out);
        for (int64_t i0 = c0; i0 < c1; i0 += kAmxRows) {
          const uint32_t* xb0 = xp + (i0 / 16) * nkb * 256;
          const uint32_t* xb1 = xb0 + nkb * 256;
          packer.need(i0 / kAmxRows);
          // the previous block's epilogue (transposes, scale, activation, rounding: vector work) runs
          // between the two halves of this block's k loop, in the shadow of its queued tile multiplies
          with_tiles(two, c1 - i0 > 16, [&](auto NA, auto NB) {
            amx_zero<NA(), NB()>();
            amx_steps<NA(), NB()>(w0, w1, p.w_stride, xb0, xb1, 0, nkb / 2);
            finish();
            packer.ahead(i0 / kAmxRows + 1);
            amx_steps<NA(), NB()>(w0, w1, p.w_stride, xb0, xb1, nkb / 2, nkb);
            amx_store<NA(), NB()>(ct[cur]);
          });
          // ct[2a + b][r][j] = out^T: weight row 16a + r (SwiGLU: a = 0 gate, 1 up) x row 16b + j of the block
          pending = AmxPending{ct[cur], two, j0, i0, std::min(kAmxRows, m - i0), ep};
          cur ^= 1;
        }
      }
    }
    finish();
    amx_release();
  }
}
#endif

template <typename T>
void linear_impl(const LinearParams& p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (p.amx) return linear_amx(p);
  }
#endif
  const int64_t m = p.m, k = p.k, n_out = p.swiglu ? p.n / 2 : p.n;
  const T* w = static_cast<const T*>(p.weight);
  bool dot16 = false;
#if defined(CPU_CAPABILITY_AVX512)
  dot16 = std::is_same_v<T, c10::BFloat16> && p.bf16_dot;
#endif
  // x as fp32 rows for the widening path (read once per weight tile: widen it once here)
  std::vector<float> x32;
  const float* xf = nullptr;
  int64_t xs = p.x_stride;
  if (!dot16) {
    if constexpr (std::is_same_v<T, float>) {
      xf = static_cast<const float*>(p.x);
    } else {
      x32.resize(m * k);
      for (int64_t i = 0; i < m; ++i) {
        const T* src = static_cast<const T*>(p.x) + i * p.x_stride;
        for_lanes(k, [&](int64_t c, int64_t n) { store_n(x32.data() + i * k + c, load_n(src + c, n), n); });
      }
      xf = x32.data();
      xs = k;
    }
  }
  // dot products of weight rows row0 .. row0 + nr with every row of x into tile (ld columns per x row)
  auto rows = [&](int64_t row0, int64_t nr, float* tile, int64_t ld) {
    for (int64_t r0 = 0; r0 < nr; r0 += kRW) {
      const int rw = static_cast<int>(std::min<int64_t>(kRW, nr - r0));
      const T* wr = w + (row0 + r0) * p.w_stride;
      for (int64_t i0 = 0; i0 < m; i0 += kRX) {
        const int rx = static_cast<int>(std::min<int64_t>(kRX, m - i0));
        float* t = tile + i0 * ld + r0;
        with_const<kRW>(rw, [&](auto RW) {
          with_const<kRX>(rx, [&](auto RX) {
#if defined(CPU_CAPABILITY_AVX512)
            if constexpr (std::is_same_v<T, c10::BFloat16>) {
              if (dot16) {
                dot_tile_bf16<RW(), RX()>(wr, p.w_stride, static_cast<const T*>(p.x) + i0 * p.x_stride,
                                          p.x_stride, k, t, ld);
                return;
              }
            }
#endif
            dot_tile<RW(), RX(), T>(wr, p.w_stride, xf + i0 * xs, xs, k, t, ld);
          });
        });
      }
    }
  };
  const int64_t n_blocks = (n_out + kBlock - 1) / kBlock;
  const int64_t ld = p.swiglu ? 2 * kBlock : kBlock;
  // below ~256 KiB of weights a parallel region costs more than it saves
  const int64_t bytes = p.n * k * static_cast<int64_t>(sizeof(T));
  const int threads = bytes >= (int64_t(1) << 18) ? std::min<int64_t>(omp_get_max_threads(), n_blocks) : 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tile(m * ld);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t j0 = blk * kBlock, nb = std::min(kBlock, n_out - j0);
      rows(j0, nb, tile.data(), ld);
      if (p.swiglu) rows(n_out + j0, nb, tile.data() + kBlock, ld);  // the "up" rows of the same columns
      epilogue<T>(p, tile.data(), ld, j0, nb, n_out, 0, m);
    }
  }
}

template <typename T>
void swiglu_impl(const SwigluParams& p) {
  const VF gs(p.gate_scale);
  // one pass over the rows: read gate and up, write the product (threads over rows when it pays)
  const int threads = p.m * p.width >= (int64_t(1) << 16) ? std::min<int64_t>(omp_get_max_threads(), p.m) : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < p.m; ++i) {
    const T* gate = static_cast<const T*>(p.x) + i * p.x_stride;
    const T* up = gate + p.width;
    T* out = static_cast<T*>(p.out) + i * p.out_stride;
    for_lanes(p.width, [&](int64_t c, int64_t n) {
      store_n(out + c, silu(load_n(gate + c, n) * gs) * load_n(up + c, n), n);
    });
  }
}

}  // namespace

void swiglu_kernel(const SwigluParams& p) {
  with_float_type(p.dtype, [&](auto t) { swiglu_impl<decltype(t)>(p); });
}

void linear_kernel(const LinearParams& p) {
  with_float_type(p.dtype, [&](auto t) { linear_impl<decltype(t)>(p); });
}

}  // namespace h1r::cpu::H1R_ISA
