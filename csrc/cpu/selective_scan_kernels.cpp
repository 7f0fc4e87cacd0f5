// Mamba2 selective scan (chunked SSD) and its decode step, CPU SIMD kernels (compiled once per ISA).
//
// The scan follows mamba_ssm's stages, for one head and one chunk of Q tokens [t0, t0 + q):
//   chunk cumsum   dt' = clamp(softplus(dt + dt_bias)), cs_i = sum_{j <= i} dt'_j A   (log-decay)
//   bmm            CB = C_c B_c^T (q x q), once per group (shared by the group's heads)
//   chunk scan     Y  = (CB o Lmask) (dt' x)                 Lmask_ij = exp(cs_i - cs_j), j <= i, same document
//                  Y += e o (C S_prev)                        e_i = exp(cs_i) (0 after a document boundary)
//   chunk state    S  = e_last S_prev + B^T (w o dt' x)      w_j = exp(cs_last - cs_j) (same document as last)
// and loops the chunks of one (batch, head) in order, so the state passing is the loop itself and the
// only per-head intermediates are one chunk's q x q, q x p and n x p blocks. The four products are
// register-blocked fp32 GEMMs (gemm() below), or for bf16 on CPUs with AMX tile products with mamba_ssm's
// operand roundings (chunk_products_amx); the state is kept as (n, p) so that every product reads its
// right-hand operand along contiguous rows; B, C (and fp32 x) are read in place. Work is parallel over
// batch x heads (OpenMP). Denormals are flushed (FlushDenormals) for speed.

#include "cpu/vec_diagnostics.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/float_io.h"
#include "cpu/narrow_store.h"
#include "cpu/selective_scan_params.h"

namespace h1r::cpu::H1R_ISA {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();

// ---- conversions --------------------------------------------------------------------------------------
// Loads / stores of T as fp32 lanes come from float_io.h: load_n / store_n widen / narrow one full vector
// of bf16 / fp16 with a single conversion instruction (the generic Vectorized<T> path converts two vectors
// at a time and goes through a stack buffer for a one-vector count), the tail element by element.

// dst[0:n] = float(src[0:n]) and back, vectorized.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += VL) {
    const int64_t k = std::min(VL, n - i);
    load_n(src + i, k).store(dst + i, k);
  }
}
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += VL) {
    const int64_t k = std::min(VL, n - i);
    store_n(dst + i, Vec::loadu(src + i, k), k);
  }
}

inline float hsum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// dt_limit = (0, inf) means no clamp at all (as in mamba_ssm), so that a raw negative dt passes unchanged.
inline bool clamp_dt(const ScanParams& p) { return !(p.dt_min == 0.f && std::isinf(p.dt_max) && p.dt_max > 0.f); }

inline float softplus(float v) { return v <= 20.f ? std::log1p(std::exp(v)) : v; }

// Flush denormals to zero (FTZ + DAZ) in this thread while alive. The decays exp(cs) reach 1e-30 within a
// chunk, and products of such terms are denormal: without this, every FMA that produces one takes a
// microcode assist (measured: the forward ran ~10x slower). GPU kernels flush them too.
struct FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// ---- register-blocked GEMM ----------------------------------------------------------------------------
// Cm[i][j] (+)= rs_i sum_k A(i, k) Bm[k][j] for i < M, j < N, with A(i, k) = A[i * rsa + k * csa] (any
// strides: A's entries are broadcast, so a transposed A costs nothing) and Bm, Cm row-major (ldb, ldc).
// rs (optional) scales each row of the product before it is stored / added. A tile of MR rows x NV
// vectors of accumulators stays in registers over the whole K loop. `tri`: A is lower triangular
// (A(i, k) = 0 for k > i, so row block [i0, i0 + MR) stops at k = i0 + MR) or upper triangular (A(i, k) = 0
// for k < i, so the block starts at k = i0).
enum Tri { kFull = 0, kLower = 1, kUpper = 2 };
#ifndef H1R_SCAN_MR
#define H1R_SCAN_MR 6
#endif
#ifndef H1R_SCAN_NV  // accumulators MR x NV vectors: 24 of AVX-512's 32 registers, 12 of AVX2's 16
#define H1R_SCAN_NV (VL >= 16 ? 4 : 2)
#endif
constexpr int MR = H1R_SCAN_MR;
constexpr int NV = H1R_SCAN_NV;

template <int R, bool FULL>
inline void gemm_tile(int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bm, int64_t ldb,
                      float* Cm, int64_t ldc, bool acc, const float* rs, int64_t ncols) {
  Vec c[R][NV];
  int64_t cnt[NV];
  for (int v = 0; v < NV; ++v) cnt[v] = std::clamp<int64_t>(ncols - v * VL, 0, VL);
  auto load_c = [&](int r, int v) {
    return FULL ? Vec::loadu(Cm + r * ldc + v * VL) : Vec::loadu(Cm + r * ldc + v * VL, cnt[v]);
  };
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = (acc && !rs) ? load_c(r, v) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = FULL ? Vec::loadu(Bm + k * ldb + v * VL) : Vec::loadu(Bm + k * ldb + v * VL, cnt[v]);
    const float* a = A + k * csa;
    for (int r = 0; r < R; ++r) {
      Vec ar(a[r * rsa]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(ar, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      if (rs) c[r][v] = acc ? at::vec::fmadd(Vec(rs[r]), c[r][v], load_c(r, v)) : Vec(rs[r]) * c[r][v];
      if (FULL) c[r][v].store(Cm + r * ldc + v * VL);
      else if (cnt[v] > 0) c[r][v].store(Cm + r * ldc + v * VL, cnt[v]);
    }
}

template <int R>
inline void gemm_rows(int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bm, int64_t ldb,
                      float* Cm, int64_t ldc, bool acc, const float* rs, int64_t ncols) {
  if (ncols == NV * VL) gemm_tile<R, true>(K, A, rsa, csa, Bm, ldb, Cm, ldc, acc, rs, ncols);
  else gemm_tile<R, false>(K, A, rsa, csa, Bm, ldb, Cm, ldc, acc, rs, ncols);
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bm, int64_t ldb,
          float* Cm, int64_t ldc, bool acc, int tri = kFull, const float* rs = nullptr) {
  for (int64_t j0 = 0; j0 < N; j0 += NV * VL) {
    const int64_t nc = std::min<int64_t>(NV * VL, N - j0);
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - i0);
      const int64_t k0 = tri == kUpper ? std::min(K, i0) : 0;
      const int64_t kk = (tri == kLower ? std::min(K, i0 + mr) : K) - k0;
      const float* Ai = A + i0 * rsa + k0 * csa;
      const float* Bk = Bm + k0 * ldb;
      float* Ci = Cm + i0 * ldc + j0;
      const float* ri = rs ? rs + i0 : nullptr;
      switch (mr) {
#define H1R_ROWS(R) \
  case R: gemm_rows<R>(kk, Ai, rsa, csa, Bk + j0, ldb, Ci, ldc, acc, ri, nc); break;
        H1R_ROWS(8) H1R_ROWS(7) H1R_ROWS(6) H1R_ROWS(5) H1R_ROWS(4) H1R_ROWS(3) H1R_ROWS(2)
#undef H1R_ROWS
        default: gemm_rows<1>(kk, Ai, rsa, csa, Bk + j0, ldb, Ci, ldc, acc, ri, nc); break;
      }
    }
  }
}

// dst (cols x rows) = src (rows x cols, leading dim ld)^T, in 16 x 16 blocks (a block's source rows stay
// in L1 while its destination rows are written whole; with AVX-512 a whole block moves through registers,
// amx_tiles.h's transpose16).
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  constexpr int64_t TB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += TB)
    for (int64_t c0 = 0; c0 < cols; c0 += TB) {
      const int64_t r1 = std::min(rows, r0 + TB), c1 = std::min(cols, c0 + TB);
#if defined(CPU_CAPABILITY_AVX512)
      if (r1 - r0 == TB && c1 - c0 == TB) {
        __m512 in[TB], out[TB];
        for (int64_t r = 0; r < TB; ++r) in[r] = _mm512_loadu_ps(src + (r0 + r) * ld + c0);
        transpose16(in, out);
        for (int64_t c = 0; c < TB; ++c) _mm512_storeu_ps(dst + (c0 + c) * rows + r0, out[c]);
        continue;
      }
#endif
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * ld + c];
    }
}

// dst[i] *= s over n floats.
inline void scale(float* dst, float s, int64_t n) {
  const Vec vs(s);
  int64_t i = 0;
  for (; i + VL <= n; i += VL) (Vec::loadu(dst + i) * vs).store(dst + i);
  if (i < n) (Vec::loadu(dst + i, n - i) * vs).store(dst + i, n - i);
}

// ---- shared per-chunk preparation ---------------------------------------------------------------------
// Geometry and per-(batch, head) views of the inputs.
template <typename T>
struct ScanView {
  const ScanParams& p;
  int64_t L, H, P, G, N, Q, nc, hpg;
  const T *x, *dt, *B, *C, *z;
  const float *Bf, *Cf;  // B, C as fp32 (b, l, g, n): the inputs, or their copies made by chunk_bmm
  bool convert_bc;
  explicit ScanView(const ScanParams& prm)
      : p(prm), L(prm.seqlen), H(prm.nheads), P(prm.headdim), G(prm.ngroups), N(prm.dstate), Q(prm.chunk),
        nc((prm.seqlen + prm.chunk - 1) / prm.chunk), hpg(prm.nheads / prm.ngroups),
        x(static_cast<const T*>(prm.x)), dt(static_cast<const T*>(prm.dt)), B(static_cast<const T*>(prm.B)),
        C(static_cast<const T*>(prm.C)), z(static_cast<const T*>(prm.z)) {
    convert_bc = !std::is_same_v<T, float>;
    Bf = convert_bc ? prm.B32 : static_cast<const float*>(prm.B);
    Cf = convert_bc ? prm.C32 : static_cast<const float*>(prm.C);
  }
  // Row t of group g of B / C (fp32, rows G * N apart).
  const float* brow(int64_t b, int64_t t, int64_t g) const { return Bf + ((b * L + t) * G + g) * N; }
  const float* crow(int64_t b, int64_t t, int64_t g) const { return Cf + ((b * L + t) * G + g) * N; }
  int32_t doc(int64_t b, int64_t t) const { return p.seq_idx ? p.seq_idx[b * L + t] : 0; }
  const float* cb(int64_t b, int64_t g, int64_t c) const { return p.cb + ((b * G + g) * nc + c) * Q * Q; }
};

// Per-chunk quantities of one head: dt', cumulative log-decay, documents.
struct ChunkDecay {
  std::vector<float> dtp, cs, e, w;
  std::vector<int64_t> dstart;  // first position of token i's document inside the chunk
  std::vector<int32_t> doc;
  float e_last = 0.f;  // decay of the entering state over the whole chunk (0 after a document boundary)
  bool rising = false;  // some dt'_i A > 0: the log-decay cs rises somewhere in the chunk
  mutable std::vector<float> colf, rowf;  // decay_matrix's factors (its bf16 form)
  explicit ChunkDecay(int64_t Q)
      : dtp(Q), cs(Q), e(Q), w(Q), dstart(Q), doc(Q), colf((Q + VL - 1) / VL * VL), rowf((Q + VL - 1) / VL * Q) {}

  // Chunk cumsum for head h of batch b, tokens [t0, t0 + q); prev_doc: document of the entering state.
  // kVec: softplus and the decays on vectors (ATen's Sleef functions, 1 ulp) instead of libm's scalar calls
  // (also within 1 ulp, but not the same bits): the AMX path's, where ~400 scalar calls per chunk were a
  // tenth of its time; the fp32 path keeps its bits.
  template <bool kVec = false, typename T>
  void compute(const ScanView<T>& v, int64_t b, int64_t h, int64_t t0, int64_t q, int32_t prev_doc) {
    const ScanParams& p = v.p;
    const float A = p.A[h];
    const float bias = p.dt_bias ? p.dt_bias[h] : 0.f;
    rising = false;
    if constexpr (kVec) {
      for (int64_t i = 0; i < q; ++i) dtp[i] = static_cast<float>(v.dt[(b * v.L + t0 + i) * v.H + h]) + bias;
      const Vec lo(p.dt_min), hi(p.dt_max), big(20.f);
      for (int64_t i = 0; i < q; i += VL) {
        const int64_t k = std::min(VL, q - i);
        Vec d = Vec::loadu(&dtp[i], k);
        if (p.dt_softplus) d = Vec::blendv(d.exp().log1p(), d, d > big);
        if (clamp_dt(p)) d = at::vec::minimum(at::vec::maximum(d, lo), hi);
        d.store(&dtp[i], k);
      }
    }
    float run = 0.f;
    for (int64_t i = 0; i < q; ++i) {
      float d;
      if constexpr (kVec) {
        d = dtp[i];
      } else {
        d = static_cast<float>(v.dt[(b * v.L + t0 + i) * v.H + h]) + bias;
        if (p.dt_softplus) d = softplus(d);
        if (clamp_dt(p)) d = std::min(std::max(d, p.dt_min), p.dt_max);
        dtp[i] = d;
      }
      run += d * A;
      rising |= d * A > 0.f;
      cs[i] = run;
      doc[i] = v.doc(b, t0 + i);
      dstart[i] = (i > 0 && doc[i] == doc[i - 1]) ? dstart[i - 1] : i;
    }
    if constexpr (kVec) {
      const Vec last(cs[q - 1]);
      for (int64_t i = 0; i < q; i += VL) {
        const int64_t k = std::min(VL, q - i);
        const Vec c = Vec::loadu(&cs[i], k);
        c.exp().store(&e[i], k);
        (last - c).exp().store(&w[i], k);
      }
      if (p.seq_idx)
        for (int64_t i = 0; i < q; ++i) {
          if (doc[i] != prev_doc) e[i] = 0.f;
          if (doc[i] != doc[q - 1]) w[i] = 0.f;
        }
    } else {
      for (int64_t i = 0; i < q; ++i) e[i] = doc[i] == prev_doc ? std::exp(cs[i]) : 0.f;
      for (int64_t j = 0; j < q; ++j) w[j] = doc[j] == doc[q - 1] ? std::exp(cs[q - 1] - cs[j]) : 0.f;
    }
    e_last = e[q - 1];
  }

  // Lm = CB o Lmask o colscale_j (q x q, row-major with rows ld >= q elements apart, zero above the diagonal,
  // before each row's document start and in columns q .. ld); with cb == nullptr, Lmask itself. Computed
  // in fp32 and stored as TO (fp32, or bf16 rounded once: the AMX path's left operand).
  //
  // bf16 entries of a chunk whose log-decay never rises (dt'_i A <= 0: always in Mamba2, A < 0 < dt') take
  // fewer exps: below the last column a of a full column block [j0, j0 + VL), exp(cs_i - cs_j) =
  // exp(cs_i - cs_a) exp(cs_a - cs_j), both factors <= 1 (no overflow; an underflow only where the entry is
  // below fp32's range anyway), one exp per row and block (on vectors of rows) instead of one per entry;
  // within a few fp32 ulp of the direct exp, far below the bf16 rounding that follows.
  template <typename TO>
  void decay_matrix(const float* cb, int64_t ldcb, int64_t q, TO* Lm, const float* colscale = nullptr,
                    int64_t ld = 0) const {
    if (ld == 0) ld = q;
    const bool factor = !std::is_same_v<TO, float> && !rising;
    const int64_t Q = static_cast<int64_t>(cs.size());
    if (factor) {
      for (int64_t j0 = 0; j0 + VL <= q; j0 += VL) {
        const int64_t a = j0 + VL - 1, jb = j0 / VL;
        const Vec ca(cs[a]);
        Vec cf = (ca - Vec::loadu(&cs[j0])).exp_u20();
        if (colscale) cf = cf * Vec::loadu(colscale + j0);
        cf.store(&colf[j0]);
        for (int64_t i = a; i < q; i += VL) {
          const int64_t k = std::min(VL, q - i);
          (Vec::loadu(&cs[i], k) - ca).exp_u20().store(&rowf[jb * Q + i], k);
        }
      }
    }
    for (int64_t i = 0; i < q; ++i) {
      TO* row = Lm + i * ld;
      const Vec ci(cs[i]);
      const int64_t j1 = i + 1;
      for (int64_t j = 0; j < j1; j += VL) {
        const int64_t k = std::min(VL, j1 - j);
        Vec d;
        if (factor && j + VL <= j1) {  // a full block whose last column is <= i: the factored entries
          d = Vec(rowf[(j / VL) * Q + i]) * Vec::loadu(&colf[j]);  // colscale included
          if (cb) d = d * Vec::loadu(cb + i * ldcb + j);
        } else {
          // exp to 1 ulp for fp32 (the fp32 path's bits), ATen's 20-ulp polynomial where the entry is rounded
          // to bf16
          const Vec diff = ci - Vec::loadu(&cs[j], k);
          d = std::is_same_v<TO, float> ? diff.exp() : diff.exp_u20();
          if (cb) d = d * Vec::loadu(cb + i * ldcb + j, k);
          if (colscale) d = d * Vec::loadu(colscale + j, k);
        }
        store_n(row + j, d, k);
      }
      std::fill(row, row + dstart[i], TO(0.f));
      std::fill(row + j1, row + ld, TO(0.f));
    }
  }
};

// Stage "bmm": CB[b, g, c] = C_c B_c^T for every (batch, group, chunk), fp32 (q x q, leading dim Q).
// For bf16 / fp16 inputs it also writes B and C in fp32 (p.B32, p.C32), read by every head of the group.
template <typename T>
void chunk_bmm(const ScanView<T>& v) {
  const int64_t nb = v.p.batch, N = v.N, G = v.G;
#pragma omp parallel
  {
    FlushDenormals ftz;
    std::vector<float> Bt(N * v.Q);
#pragma omp for schedule(dynamic)
    for (int64_t idx = 0; idx < nb * G * v.nc; ++idx) {
      const int64_t c = idx % v.nc, g = (idx / v.nc) % G, b = idx / (v.nc * G);
      const int64_t t0 = c * v.Q, q = std::min(v.Q, v.L - t0);
      if (v.convert_bc)
        for (int64_t i = 0; i < q; ++i) {
          const int64_t off = ((b * v.L + t0 + i) * G + g) * N;
          to_float(v.B + off, v.p.B32 + off, N);
          to_float(v.C + off, v.p.C32 + off, N);
        }
      transpose(v.brow(b, t0, g), q, N, G * N, Bt.data());
      gemm(q, q, N, v.crow(b, t0, g), G * N, 1, Bt.data(), q, v.p.cb + ((b * G + g) * v.nc + c) * v.Q * v.Q, v.Q,
           false);
    }
  }
}

// Copy chunk rows [t0, t0 + q) of head h of a (b, l, h, p) tensor into fp32 (q x P).
template <typename T>
inline void load_head_rows(const ScanView<T>& v, const T* src, int64_t b, int64_t h, int64_t t0, int64_t q, float* dst) {
  for (int64_t i = 0; i < q; ++i) to_float(src + ((b * v.L + t0 + i) * v.H + h) * v.P, dst + i * v.P, v.P);
}

// ---- forward ------------------------------------------------------------------------------------------
// The chunk products of one (batch, head) chunk: Y = (CB o Lmask o dt') x + e o (C S_prev) (q x P) and the
// state passing S = e_last S + B^T ((w o dt') x), in fp32 (register-blocked gemm()). x rows: xc, ldx apart.
template <typename T>
void chunk_products_f32(const ScanView<T>& v, const ChunkDecay& dc, int64_t b, int64_t g, int64_t c, int64_t t0,
                        int64_t q, const float* xc, int64_t ldx, float* Lm, float* Xw, float* Y, float* S) {
  const int64_t P = v.P, N = v.N, Q = v.Q, G = v.G;
  const float* Cc = v.crow(b, t0, g);
  const float* Bc = v.brow(b, t0, g);
  // Chunk scan, diagonal block: Y = (CB o Lmask o dt'_j) x (lower-triangular left operand).
  dc.decay_matrix(v.cb(b, g, c), Q, q, Lm, dc.dtp.data());
  gemm(q, P, q, Lm, q, 1, xc, ldx, Y, P, false, kLower);
  // Off-diagonal: Y += e o (C S_prev), the entering state read by C and decayed to each position.
  bool any_e = false;
  for (int64_t i = 0; i < q; ++i) any_e |= dc.e[i] != 0.f;
  if (any_e) gemm(q, P, N, Cc, G * N, 1, S, P, Y, P, true, kFull, dc.e.data());
  // Chunk state and state passing: S = e_last S + B^T ((w o dt') x).
  scale(S, dc.e_last, N * P);
  for (int64_t i = 0; i < q; ++i) {
    const Vec wd(dc.w[i] * dc.dtp[i]);
    for (int64_t j = 0; j < P; j += VL) {
      const int64_t k = std::min(VL, P - j);
      (Vec::loadu(xc + i * ldx + j, k) * wd).store(&Xw[i * P + j], k);
    }
  }
  gemm(N, P, q, Bc, 1, G * N, Xw, P, S, P, true);
}

#if defined(CPU_CAPABILITY_AVX512)
// ---- bf16 chunk products on AMX tiles -----------------------------------------------------------------
// For bf16 inputs where the CPU has AMX (p.amx: the glue's amx_usable(), chunk % 32, dstate % 32 and
// headdim % 16 all zero), the four products run on the tiles (TDPBF16PS: bf16 operands, exact products,
// fp32 accumulation) with the operands mamba_ssm's Triton kernels give tl.dot:
//   bmm            CB = C B^T                       C, B: the bf16 inputs              (fp32 CB)
//   chunk scan     Y  = bf16(CB o Lmask o dt') x     the decay-masked CB rounded once, x the bf16 input
//                  Y += e o (C bf16(S_prev))         the fp32 state rounded for the product only
//   chunk state    S  = e_last S + bf16((w o dt') o B)^T x
// Everything else (the decays, cumsum, document masks, D skip, z gate) is the fp32 path's, and the state
// itself stays fp32 across chunks (only the copy the product reads is rounded). Operand layouts (see
// amx_tiles.h): x as pair rows along time (the B operand of both products with x), CB's right-hand side
// B^T as the transposed words of B's rows, the state's left operand ((w o dt') o B)^T as the transposed
// pair rows. A chunk shorter than Q is zero-padded to the next multiple of 32 (zero operand rows / columns
// add nothing; the padded output rows are not read).
inline const uint16_t* bits(const c10::BFloat16* ptr) { return reinterpret_cast<const uint16_t*>(ptr); }
inline int64_t round32(int64_t v) { return (v + 31) / 32 * 32; }

// fp32 lanes rounded to bf16 (nearest even; NaN stays NaN), as the bf16 bits in the upper half of each word.
inline __m512i bf16_hi(const Vec& v) {
  const __m512i r = _mm512_and_si512(_mm512_castps_si512(__m512(round_bf16(v))), _mm512_set1_epi32(int(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(__m512(v), __m512(v), _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc00000));
}

// dst[0:n] = pair words (bf16(s0 r0[j]), bf16(s1 r1[j])) of two rows of S (fp32 or bf16) scaled by s0, s1;
// a null row is zero. n % 16 == 0.
template <typename S>
inline void pack_pair_scaled(const S* r0, float s0, const S* r1, float s1, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i lo = r0 ? _mm512_srli_epi32(bf16_hi(load_f(r0 + j) * Vec(s0)), 16) : _mm512_setzero_si512();
    const __m512i hi = r1 ? bf16_hi(load_f(r1 + j) * Vec(s1)) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + j, _mm512_or_si512(lo, hi));
  }
}

// The q rows of one chunk of a bf16 (b, l, g, n)-like tensor as a tile operand with rows ld elements apart:
// in place when the chunk fills whole 32-row blocks, else copied into pad (q32 x n, zero rows past q).
inline const uint16_t* chunk_rows(const c10::BFloat16* src, int64_t ld, int64_t q, int64_t n, uint16_t* pad,
                                  int64_t& ld_out) {
  const int64_t q32 = round32(q);
  if (q == q32) {
    ld_out = ld;
    return bits(src);
  }
  for (int64_t i = 0; i < q; ++i) std::memcpy(pad + i * n, src + i * ld, n * sizeof(uint16_t));
  std::fill(pad + q * n, pad + q32 * n, uint16_t(0));
  ld_out = n;
  return pad;
}

// Stage "bmm" on tiles: CB[b, g, c] = C_c B_c^T (fp32, q32 x q32 of the Q x Q block).
inline void chunk_bmm_amx(const ScanView<c10::BFloat16>& v) {
  const int64_t nb = v.p.batch, N = v.N, G = v.G, Q = v.Q;
#pragma omp parallel
  {
    amx_configure();
    TileVector<uint16_t> pad(Q * N);
    TileVector<uint32_t> Bt(N / 2 * Q);
#pragma omp for schedule(dynamic)
    for (int64_t idx = 0; idx < nb * G * v.nc; ++idx) {
      const int64_t c = idx % v.nc, g = (idx / v.nc) % G, b = idx / (v.nc * G);
      const int64_t t0 = c * Q, q = std::min(Q, v.L - t0), q32 = round32(q);
      const int64_t off = ((b * v.L + t0) * G + g) * N;
      int64_t lda;
      const uint16_t* Ca = chunk_rows(v.C + off, G * N, q, N, pad.data(), lda);
      amx_transpose_words(reinterpret_cast<const uint32_t*>(v.B + off), G * N / 2, q, q32, N / 2, Bt.data(), q32);
      amx_gemm(q32, q32, N, Ca, lda, Bt.data(), q32, const_cast<float*>(v.cb(b, g, c)), Q, false);
    }
    amx_release();
  }
}

// Per-thread operand buffers of chunk_products_amx (sizes for a full chunk).
struct AmxChunkBuffers {
  TileVector<uint32_t> xp, Sp, Bw, Bt;
  TileVector<uint16_t> Lb, Cpad;
  AmxChunkBuffers(int64_t Q, int64_t P, int64_t N)
      : xp(Q / 2 * P), Sp(N / 2 * P), Bw(Q / 2 * N), Bt(N * Q / 2), Lb(Q * Q), Cpad(Q * N) {}
};

// chunk_products_f32 on tiles (see above); Y holds round32(q) rows.
inline void chunk_products_amx(const ScanView<c10::BFloat16>& v, const ChunkDecay& dc, int64_t b, int64_t h,
                               int64_t g, int64_t c, int64_t t0, int64_t q, AmxChunkBuffers& w, float* Y, float* S) {
  const int64_t L = v.L, H = v.H, P = v.P, N = v.N, Q = v.Q, G = v.G, q32 = round32(q);
  // x of this head as pair rows along time: the right-hand operand of the diagonal block and the state.
  amx_pack_pair_rows(bits(v.x + ((b * L + t0) * H + h) * P), H * P, q, q32, P, w.xp.data(), P);
  // Off-diagonal: Y = e o (C bf16(S_prev)).
  bool any_e = false;
  for (int64_t i = 0; i < q; ++i) any_e |= dc.e[i] != 0.f;
  if (any_e) {
    for (int64_t kk = 0; kk < N / 2; ++kk)
      pack_pair_scaled(S + 2 * kk * P, 1.f, S + (2 * kk + 1) * P, 1.f, P, w.Sp.data() + kk * P);
    int64_t lda;
    const uint16_t* Ca = chunk_rows(v.C + ((b * L + t0) * G + g) * N, G * N, q, N, w.Cpad.data(), lda);
    amx_gemm(q32, P, N, Ca, lda, w.Sp.data(), P, Y, P, false);
    for (int64_t i = 0; i < q; ++i) scale(Y + i * P, dc.e[i], P);
  }
  // Diagonal block: Y += bf16(CB o Lmask o dt'_j) x (lower triangular; padded rows and columns zero).
  auto* Lb = reinterpret_cast<c10::BFloat16*>(w.Lb.data());
  dc.decay_matrix(v.cb(b, g, c), Q, q, Lb, dc.dtp.data(), q32);
  std::fill(w.Lb.begin() + q * q32, w.Lb.begin() + q32 * q32, uint16_t(0));
  amx_gemm(q32, P, q32, w.Lb.data(), q32, w.xp.data(), P, Y, P, any_e, true);
  // Chunk state: S = e_last S + bf16((w o dt') o B)^T x.
  const c10::BFloat16* Bc = v.B + ((b * L + t0) * G + g) * N;
  for (int64_t kk = 0; kk < q32 / 2; ++kk) {
    const int64_t t = 2 * kk;
    pack_pair_scaled(t < q ? Bc + t * G * N : nullptr, t < q ? dc.w[t] * dc.dtp[t] : 0.f,
                     t + 1 < q ? Bc + (t + 1) * G * N : nullptr, t + 1 < q ? dc.w[t + 1] * dc.dtp[t + 1] : 0.f, N,
                     w.Bw.data() + kk * N);
  }
  amx_transpose_words(w.Bw.data(), N, q32 / 2, q32 / 2, N, w.Bt.data(), q32 / 2);
  scale(S, dc.e_last, N * P);
  amx_gemm(N, P, q32, reinterpret_cast<const uint16_t*>(w.Bt.data()), q32, w.xp.data(), P, S, P, true);
}
#endif

template <typename T>
void scan_fwd(const ScanParams& p) {
  const ScanView<T> v(p);
  const int64_t L = v.L, H = v.H, P = v.P, N = v.N, Q = v.Q;
  bool amx = false;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) amx = p.amx;
#endif
  if (amx) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) chunk_bmm_amx(v);
#endif
  } else {
    chunk_bmm(v);
  }
  T* out = static_cast<T*>(p.out);
#pragma omp parallel
  {
    FlushDenormals ftz;
    ChunkDecay dc(Q);
    std::vector<float> X, Xw, Lm;
    TileVector<float> Y(Q * P), S(N * P);  // tile accumulators on the AMX path
#if defined(CPU_CAPABILITY_AVX512)
    std::optional<AmxChunkBuffers> amx_buf;
    if (amx) {
      amx_configure();
      amx_buf.emplace(Q, P, N);
    }
#endif
    if (!amx) {
      X.resize(std::is_same_v<T, float> ? 0 : Q * P);
      Xw.resize(Q * P);
      Lm.resize(Q * Q);
    }
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < p.batch * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / v.hpg;
      // The state entering chunk 0, as (n, p).
      if (p.initial_states) {
        transpose(p.initial_states + bh * P * N, P, N, N, S.data());
      } else {
        std::fill(S.begin(), S.end(), 0.f);
      }
      int32_t prev_doc = v.doc(b, 0);
      for (int64_t c = 0; c < v.nc; ++c) {
        const int64_t t0 = c * Q, q = std::min(Q, L - t0);
        if (amx) dc.compute<true>(v, b, h, t0, q, prev_doc);
        else dc.compute(v, b, h, t0, q, prev_doc);
        if (amx) {
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (std::is_same_v<T, c10::BFloat16>)
            chunk_products_amx(v, dc, b, h, g, c, t0, q, *amx_buf, Y.data(), S.data());
#endif
        } else if constexpr (std::is_same_v<T, float>) {
          // x rows of this head read in place (rows H * P apart)
          chunk_products_f32(v, dc, b, g, c, t0, q, v.x + ((b * L + t0) * H + h) * P, H * P, Lm.data(), Xw.data(),
                             Y.data(), S.data());
        } else {
          load_head_rows(v, v.x, b, h, t0, q, X.data());
          chunk_products_f32(v, dc, b, g, c, t0, q, X.data(), P, Lm.data(), Xw.data(), Y.data(), S.data());
        }
        prev_doc = dc.doc[q - 1];

        // out = (Y + D x) * silu(z), x and z read and out written in their dtype (one rounding)
        for (int64_t i = 0; i < q; ++i) {
          const int64_t off = ((b * L + t0 + i) * H + h) * P;
          const float* y = &Y[i * P];
          for (int64_t j = 0; j < P; j += VL) {
            const int64_t k = std::min(VL, P - j);
            Vec yv = Vec::loadu(y + j, k);
            if (p.D) yv = at::vec::fmadd(Vec::loadu(p.D + h * P + j, k), load_n(v.x + off + j, k), yv);
            if (v.z) {
              const Vec zv = load_n(v.z + off + j, k);
              yv = yv * zv / (Vec(1.f) + zv.neg().exp());
            }
            store_n(out + off + j, yv, k);
          }
        }
      }
      // Final state, back to (p, n).
      transpose(S.data(), N, P, P, p.final_states + bh * P * N);
    }
#if defined(CPU_CAPABILITY_AVX512)
    if (amx) amx_release();
#endif
  }
}

void selective_scan_fwd_kernel(const ScanParams& p) {
  switch (p.dtype) {
    case ScanDtype::f32: return scan_fwd<float>(p);
    case ScanDtype::bf16: return scan_fwd<c10::BFloat16>(p);
    default: return scan_fwd<c10::Half>(p);
  }
}

// ---- backward -----------------------------------------------------------------------------------------
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  for (int64_t i = 0; i < n; i += VL) {
    const int64_t k = std::min(VL, n - i);
    acc = at::vec::fmadd(Vec::loadu(a + i, k), Vec::loadu(b + i, k), acc);
  }
  return hsum(acc);
}

// dst += s * src over n floats.
inline void axpy(float* dst, float s, const float* src, int64_t n) {
  const Vec vs(s);
  for (int64_t i = 0; i < n; i += VL) {
    const int64_t k = std::min(VL, n - i);
    at::vec::fmadd(vs, Vec::loadu(src + i, k), Vec::loadu(dst + i, k)).store(dst + i, k);
  }
}

// Per (batch, head): pass 1 re-runs the state recurrence and keeps the state entering each chunk; pass 2
// walks the chunks backwards carrying dS (the gradient of the state leaving the chunk) and differentiates
// the four products of the forward (see the file header) plus the decays, chunk cumsum and dt processing:
//   dY   = dout silu(z);                         dz = dout y silu'(z);    dD += x . dY
//   off-diagonal  Y += (e o C) S_prev:           dS_prev  = C^T (e o dY); dC += e o (dY S_prev^T); de = C . (dY S_prev^T)
//   chunk state   S = e_last S_prev + B^T (w o Xs): dS_prev += e_last dS; dXs += w o (B dS); dw = Xs . (B dS);
//                                                dB += (w o Xs) dS^T;    de_last += <dS, S_prev>
//   diagonal      Y = (CB o Lmask) Xs:           dXs += (CB o Lmask)^T dY; dGL = dY Xs^T; dC += (dGL o Lmask) B;
//                                                dB += (dGL o Lmask)^T C; dcs from dGL o CB o Lmask
//   decays        e = exp(cs), w = exp(cs_last - cs), Lmask = exp(cs_i - cs_j) -> dcs -> da (reverse cumsum)
//   Xs = dt' x, a = dt' A                        dx += dt' dXs; ddt' = x . dXs + A da; dA += dt' . da
template <typename T>
void scan_bwd(const ScanParams& p) {
  const ScanView<T> v(p);
  const int64_t L = v.L, H = v.H, P = v.P, N = v.N, Q = v.Q, nc = v.nc, GN = v.G * v.N;
  chunk_bmm(v);
  const T* dout = static_cast<const T*>(p.dout);
#pragma omp parallel
  {
    FlushDenormals ftz;
    ChunkDecay dc(Q);
    std::vector<float> X(Q * P), Xs(Q * P), Xw(Q * P), XsT(P * Q), Dm(Q * Q), Lm(Q * Q),
        dGL(Q * Q), dY(Q * P), dYe(Q * P), Yr(Q * P), dXs(Q * P), BdS(Q * P), T1(Q * N), dCc(Q * N), dBc(Q * N),
        S(N * P), dS(N * P), dSp(N * P), SpT(P * N), dST(P * N), zr(P), dcs(Q), de(Q), dw(Q), colacc(Q), dDh(P);
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < p.batch * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / v.hpg;
      const float A = p.A[h];
      float* states = p.chunk_states + bh * nc * N * P;
      // Pass 1: the state entering each chunk.
      if (p.initial_states) {
        transpose(p.initial_states + bh * P * N, P, N, N, S.data());
      } else {
        std::fill(S.begin(), S.end(), 0.f);
      }
      int32_t prev_doc = v.doc(b, 0);
      std::vector<int32_t> prev_docs(nc);
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t t0 = c * Q, q = std::min(Q, L - t0);
        std::copy(S.begin(), S.end(), states + c * N * P);
        prev_docs[c] = prev_doc;
        dc.compute(v, b, h, t0, q, prev_doc);
        load_head_rows(v, v.x, b, h, t0, q, X.data());
        for (int64_t i = 0; i < q; ++i)
          for (int64_t j = 0; j < P; ++j) Xw[i * P + j] = X[i * P + j] * dc.dtp[i] * dc.w[i];
        scale(S.data(), dc.e_last, N * P);
        gemm(N, P, q, v.brow(b, t0, g), 1, GN, Xw.data(), P, S.data(), P, true);
        prev_doc = dc.doc[q - 1];
      }

      // Pass 2: backwards over the chunks.
      if (p.dfinal_states) transpose(p.dfinal_states + bh * P * N, P, N, N, dS.data());
      else std::fill(dS.begin(), dS.end(), 0.f);
      std::fill(dDh.begin(), dDh.end(), 0.f);
      float dA_acc = 0.f, dbias_acc = 0.f;
      for (int64_t c = nc - 1; c >= 0; --c) {
        const int64_t t0 = c * Q, q = std::min(Q, L - t0);
        const float* Sp = states + c * N * P;
        dc.compute(v, b, h, t0, q, prev_docs[c]);
        load_head_rows(v, v.x, b, h, t0, q, X.data());
        for (int64_t i = 0; i < q; ++i)
          for (int64_t j = 0; j < P; ++j) Xs[i * P + j] = X[i * P + j] * dc.dtp[i];
        const float* Cf = v.crow(b, t0, g);
        const float* Bf = v.brow(b, t0, g);
        dc.decay_matrix(nullptr, 0, q, Dm.data());
        const float* cb = v.cb(b, g, c);
        for (int64_t i = 0; i < q; ++i)
          for (int64_t j = 0; j <= i; ++j) Lm[i * q + j] = Dm[i * q + j] * cb[i * Q + j];
        for (int64_t i = 0; i < q; ++i) std::fill(&Lm[i * q + i + 1], &Lm[i * q + q], 0.f);

        // Gate: recompute y = Y_diag + Y_off + D x where z needs it; dY = dout silu(z), dz = dout y silu'(z).
        load_head_rows(v, dout, b, h, t0, q, dY.data());
        if (v.z) {
          gemm(q, P, q, Lm.data(), q, 1, Xs.data(), P, Yr.data(), P, false, kLower);
          gemm(q, P, N, Cf, GN, 1, Sp, P, Yr.data(), P, true, kFull, dc.e.data());
          for (int64_t i = 0; i < q; ++i) {
            const int64_t off = ((b * L + t0 + i) * H + h) * P;
            to_float(v.z + off, zr.data(), P);
            float* dzo = p.dz + off;
            for (int64_t j = 0; j < P; ++j) {
              const float y = Yr[i * P + j] + (p.D ? p.D[h * P + j] * X[i * P + j] : 0.f);
              const float zz = zr[j], sg = 1.f / (1.f + std::exp(-zz));
              const float go = dY[i * P + j];
              dzo[j] = go * y * sg * (1.f + zz * (1.f - sg));
              dY[i * P + j] = go * zz * sg;
            }
          }
        }
        // Skip connection: dD += x . dY, dx = D dY (+ the scan's part below).
        if (p.D)
          for (int64_t i = 0; i < q; ++i) {
            for (int64_t j = 0; j < P; ++j) dDh[j] += X[i * P + j] * dY[i * P + j];
          }

        // Off-diagonal: dS_prev = C^T (e o dY); T1 = dY S_prev^T; dC = e o T1; de = C . T1.
        for (int64_t i = 0; i < q; ++i) {
          std::copy(&dY[i * P], &dY[i * P] + P, &dYe[i * P]);
          scale(&dYe[i * P], dc.e[i], P);
        }
        gemm(N, P, q, Cf, 1, GN, dYe.data(), P, dSp.data(), P, false);
        transpose(Sp, N, P, P, SpT.data());
        gemm(q, N, P, dY.data(), P, 1, SpT.data(), N, T1.data(), N, false);
        for (int64_t i = 0; i < q; ++i) {
          de[i] = dot(&T1[i * N], Cf + i * GN, N);
          for (int64_t n = 0; n < N; ++n) dCc[i * N + n] = dc.e[i] * T1[i * N + n];
        }

        // Chunk state: dS_prev += e_last dS; BdS = B dS; dXs = w o BdS; dw = Xs . BdS; dB = (w o Xs) dS^T.
        de[q - 1] += dot(dS.data(), Sp, N * P);
        axpy(dSp.data(), dc.e_last, dS.data(), N * P);
        gemm(q, P, N, Bf, GN, 1, dS.data(), P, BdS.data(), P, false);
        for (int64_t i = 0; i < q; ++i) {
          dw[i] = dot(&BdS[i * P], &Xs[i * P], P);
          for (int64_t j = 0; j < P; ++j) {
            dXs[i * P + j] = dc.w[i] * BdS[i * P + j];
            Xw[i * P + j] = dc.w[i] * Xs[i * P + j];
          }
        }
        transpose(dS.data(), N, P, P, dST.data());
        gemm(q, N, P, Xw.data(), P, 1, dST.data(), N, dBc.data(), N, false);

        // Diagonal: dXs += Lm^T dY; dGL = dY Xs^T; dG = dGL o Lmask; dC += dG B; dB += dG^T C;
        // t = dGL o Lm gives dcs_i += sum_j t_ij, dcs_j -= sum_i t_ij.
        gemm(q, P, q, Lm.data(), 1, q, dY.data(), P, dXs.data(), P, true, kUpper);
        transpose(Xs.data(), q, P, P, XsT.data());
        gemm(q, q, P, dY.data(), P, 1, XsT.data(), q, dGL.data(), q, false);
        std::fill(colacc.begin(), colacc.begin() + q, 0.f);
        for (int64_t i = 0; i < q; ++i) {
          float rs = 0.f;
          for (int64_t j = 0; j <= i; ++j) {
            const float t = dGL[i * q + j] * Lm[i * q + j];
            rs += t;
            colacc[j] += t;
            dGL[i * q + j] *= Dm[i * q + j];
          }
          std::fill(&dGL[i * q + i + 1], &dGL[i * q + q], 0.f);
          dcs[i] = rs;
        }
        for (int64_t j = 0; j < q; ++j) dcs[j] -= colacc[j];
        gemm(q, N, q, dGL.data(), q, 1, Bf, GN, dCc.data(), N, true, kLower);
        gemm(q, N, q, dGL.data(), 1, q, Cf, GN, dBc.data(), N, true, kUpper);

        // Decays: e_i = exp(cs_i) -> dcs_i += de_i e_i; w_j = exp(cs_last - cs_j) -> dcs_last += dw_j w_j,
        // dcs_j -= dw_j w_j. Then da = reverse cumsum of dcs.
        for (int64_t i = 0; i < q; ++i) {
          dcs[i] += de[i] * dc.e[i];
          const float t = dw[i] * dc.w[i];
          dcs[q - 1] += t;
          dcs[i] -= t;
        }
        float run = 0.f;
        for (int64_t i = q - 1; i >= 0; --i) {
          run += dcs[i];
          // run = da_i: a_i = dt'_i A; Xs_i = dt'_i x_i.
          float ddtp = A * run + dot(&X[i * P], &dXs[i * P], P);
          dA_acc += dc.dtp[i] * run;
          // back through clamp and softplus
          const int64_t tok = (b * L + t0 + i) * H + h;
          float raw = static_cast<float>(v.dt[tok]) + (p.dt_bias ? p.dt_bias[h] : 0.f);
          float pre = p.dt_softplus ? softplus(raw) : raw;
          if (clamp_dt(p) && (pre < p.dt_min || pre > p.dt_max)) ddtp = 0.f;
          if (p.dt_softplus) ddtp *= 1.f / (1.f + std::exp(-raw));
          p.ddt[tok] = ddtp;
          dbias_acc += ddtp;
          // dx = dt' dXs + D dY
          float* dxo = p.dx + tok * P;
          for (int64_t j = 0; j < P; ++j)
            dxo[j] = dc.dtp[i] * dXs[i * P + j] + (p.D ? p.D[h * P + j] * dY[i * P + j] : 0.f);
        }
        for (int64_t i = 0; i < q; ++i) {
          const int64_t tok = (b * L + t0 + i) * H + h;
          std::copy(&dBc[i * N], &dBc[i * N] + N, p.dB + tok * N);
          std::copy(&dCc[i * N], &dCc[i * N] + N, p.dC + tok * N);
        }
        std::swap(dS, dSp);
      }
      if (p.dinitial_states) transpose(dS.data(), N, P, P, p.dinitial_states + bh * P * N);
      p.dA[bh] = dA_acc;
      if (p.ddt_bias) p.ddt_bias[bh] = dbias_acc;
      if (p.dD) std::copy(dDh.begin(), dDh.end(), p.dD + bh * P);
    }
  }
}

void selective_scan_bwd_kernel(const ScanParams& p) {
  switch (p.dtype) {
    case ScanDtype::f32: return scan_bwd<float>(p);
    case ScanDtype::bf16: return scan_bwd<c10::BFloat16>(p);
    default: return scan_bwd<c10::Half>(p);
  }
}

// ---- decode step --------------------------------------------------------------------------------------
// For each (batch, head): dt' and the decay exp(dt' A) once, then for every channel row of the state
// (n contiguous): s = decay s + (dt' x) B, y = s . C (vectorized over n), out = (y + D x) silu(z).
// State elements (batch x heads x headdim x dstate) below which the decode step runs on one thread.
constexpr int64_t kStateUpdateParallelWork = int64_t(1) << 18;

// How far ahead of the row being updated the state is prefetched (with write intent). One core streams
// the state at only ~14 GB/s read + write on its own (bound by its outstanding misses, not by the memory:
// two cores stream twice that); requests ~4 KiB ahead, across the end of a head into the next (batch,
// head)'s state (wherever its slot is: the hardware prefetcher stops at the 4 KiB page), keep more lines
// in flight: 64 x 16 x 64 x 128 bf16 states, one thread, 2.5 -> 1.6 ms.
constexpr int64_t kStatePrefetchBytes = 4096;

// One (batch, head) of the decode step: dt' and the decay once, then every channel row of its state, narrowed
// back to TS by the policy Cvt (narrow_store.h). A bf16 state on AVX512-BF16 CPUs takes vcvtneps2bf16 (one
// instruction per vector, the same bits as ATen's ~8-instruction software rounding): without it the bf16
// state update is bound by its rounding, not by memory.
template <typename T, typename TS, typename Cvt>
inline void state_update_head(const StateUpdateParams& p, int64_t bh, float* Bf, float* Cf, float* yr) {
  const int64_t H = p.nheads, P = p.headdim, G = p.ngroups, N = p.dstate, hpg = H / G;
  const int64_t b = bh / H, h = bh % H, g = h / hpg;
  const int64_t row = p.state_batch_indices ? p.state_batch_indices[b] : b;
  const T* z = p.z ? static_cast<const T*>(p.z) + b * p.z_bstride + h * P : nullptr;
  T* o = static_cast<T*>(p.out) + bh * P;
  if (row < 0) {  // padded slot: no state to update
    for (int64_t i = 0; i < P; ++i) o[i] = static_cast<T>(0.f);
    return;
  }
  float d = static_cast<float>(static_cast<const T*>(p.dt)[b * p.dt_bstride + h]) + (p.dt_bias ? p.dt_bias[h] : 0.f);
  if (p.dt_softplus) d = softplus(d);
  const Vec decay(std::exp(d * p.A[h]));
  to_float(static_cast<const T*>(p.B) + b * p.B_bstride + g * N, Bf, N);
  to_float(static_cast<const T*>(p.C) + b * p.C_bstride + g * N, Cf, N);
  TS* s = static_cast<TS*>(p.state) + (row * H + h) * P * N;
  const T* xr = static_cast<const T*>(p.x) + b * p.x_bstride + h * P;
  // rows ahead to prefetch, and the next (batch, head)'s state, where the prefetch runs on past this one's end
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(TS));
  const int64_t pf = std::max<int64_t>(1, kStatePrefetchBytes / row_bytes);
  const TS* next = nullptr;
  if (bh + 1 < p.batch * H) {
    const int64_t nb = (bh + 1) / H, nh = (bh + 1) % H;
    const int64_t nrow = p.state_batch_indices ? p.state_batch_indices[nb] : nb;
    if (nrow >= 0) next = static_cast<const TS*>(p.state) + (nrow * H + nh) * P * N;
  }
  for (int64_t i = 0; i < P; ++i, s += N) {
    const TS* ahead = i + pf < P ? s + pf * N : next ? next + std::min(i + pf - P, P - 1) * N : nullptr;
    if (ahead)
      for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(reinterpret_cast<const char*>(ahead) + c, 1, 3);
    const float xv = static_cast<float>(xr[i]);
    const Vec dx(d * xv);
    // The state row in TS (fp32 / bf16 / fp16) is widened to fp32 lanes, updated in fp32 and narrowed
    // back one vector at a time, so a 16-bit state streams half the bytes of an fp32 one.
    Vec acc(0.f);
    for_lanes(N, [&](int64_t n, int64_t k) {
      Vec sv = load_n(s + n, k);
      sv = at::vec::fmadd(sv, decay, dx * Vec::loadu(&Bf[n], k));
      Cvt::store(s + n, sv, k);
      acc = at::vec::fmadd(sv, Vec::loadu(&Cf[n], k), acc);
    });
    float y = hsum(acc);
    if (p.D) y += p.D[h * P + i] * xv;
    if (z) {
      const float zv = static_cast<float>(z[i]);
      y *= zv / (1.f + std::exp(-zv));
    }
    yr[i] = y;
  }
  from_float(yr, o, P);
}

template <typename T, typename TS>
void state_update(const StateUpdateParams& p) {
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate;
  // A decode step of a small batch is ~0.1 ms of work: opening an OpenMP team for it costs more than that
  // (and far more on a loaded machine, where the team waits for a descheduled thread), so the team is
  // only opened when the state to stream is large enough to repay it.
  const int64_t work = p.batch * H * P * N;
  const bool parallel = p.batch * H > 1 && work >= kStateUpdateParallelWork;
#pragma omp parallel if (parallel)
  {
    FlushDenormals ftz;
    std::vector<float> Bf(N), Cf(N), yr(P);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < p.batch * H; ++bh) {
      with_cvt<TS>(p.hw_bf16, [&](auto cvt) {
        state_update_head<T, TS, decltype(cvt)>(p, bh, Bf.data(), Cf.data(), yr.data());
      });
    }
  }
}

template <typename T>
void state_update_by_state(const StateUpdateParams& p) {
  switch (p.state_dtype) {
    case ScanDtype::f32: return state_update<T, float>(p);
    case ScanDtype::bf16: return state_update<T, c10::BFloat16>(p);
    default: return state_update<T, c10::Half>(p);
  }
}

void selective_state_update_kernel(const StateUpdateParams& p) {
  switch (p.dtype) {
    case ScanDtype::f32: return state_update_by_state<float>(p);
    case ScanDtype::bf16: return state_update_by_state<c10::BFloat16>(p);
    default: return state_update_by_state<c10::Half>(p);
  }
}

}  // namespace h1r::cpu::H1R_ISA
