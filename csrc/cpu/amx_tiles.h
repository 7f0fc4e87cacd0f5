// AMX tile helpers shared by the kernels that multiply bf16 on tiles (linear_kernels.cpp,
// selective_scan_kernels.cpp). Include inside a *_kernels.cpp; the helpers exist in the AVX-512 build only
// (the other ISA builds never reach AMX code: amx_usable() in cpu/amx.h is false for them).
//
// The tile layout every user configures: palette 1, eight tiles of 16 rows x 64 bytes (16 x 16 fp32
// accumulators, or 16 x 32 bf16 operands; a B operand holds 16 rows of k-pairs: B[kk][j] =
// (b[2 kk][j], b[2 kk + 1][j])).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace h1r::cpu::H1R_ISA {
#if defined(CPU_CAPABILITY_AVX512)
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Load the eight 16 x 64-byte tiles' configuration on the calling thread (once per parallel region).
inline __attribute__((target("amx-tile"))) void amx_configure() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC (12) does not see ldtilecfg read the struct and drops the stores above: make them happen
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

inline __attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// out[j] = column j of the 16 x 16 matrix of 32-bit lanes whose rows are ``rows``, in three shuffle stages
// (pairs of rows, quads, then 128-bit lanes across the four quads); bit patterns move unchanged.
inline void transpose16(const __m512 rows[16], __m512 out[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = rows[2 * i], b = rows[2 * i + 1];
    t[2 * i] = _mm512_unpacklo_ps(a, b);      // lane L: a[4L], b[4L], a[4L+1], b[4L+1]
    t[2 * i + 1] = _mm512_unpackhi_ps(a, b);  // lane L: a[4L+2], b[4L+2], a[4L+3], b[4L+3]
  }
  // u[4g + c], lane L: rows 4g .. 4g+3 of column 4L + c
  for (int g = 0; g < 4; ++g) {
    const __m512d lo = _mm512_castps_pd(t[4 * g]), lo2 = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d hi = _mm512_castps_pd(t[4 * g + 1]), hi2 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, lo2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, lo2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi, hi2));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi, hi2));
  }
  // column 4L + c = lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    out[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    out[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    out[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
    out[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
  }
}

// transpose16 of a 16 x 16 fp32 tile stored with rows of 64 bytes
inline void transpose16(const float* m, __m512 out[16]) {
  __m512 rows[16];
  for (int r = 0; r < 16; ++r) rows[r] = _mm512_load_ps(m + 16 * r);
  transpose16(rows, out);
}


// ---- a small tile GEMM on operands packed in plain row-major buffers --------------------------------
// Operands as raw bits (uint16_t: bf16; uint32_t: a pair of bf16, the first in the low half):
//   A (m x k bf16): row-major, lda elements between rows: an A tile is 16 rows x 32 k, read in place;
//   B (k x n bf16) in "pair rows": Bp[kk][j] = (b[2 kk][j], b[2 kk + 1][j]) as one uint32_t, ldb words
//     between pair rows: a B tile is 16 pair rows x 16 columns, read in place;
//   C (m x n fp32): row-major, ldc floats between rows.

// dst (k_pad / 2 pair rows x n, ldd words) = the pair rows of src (k x n bf16 rows, lds elements apart):
// dst[kk][j] = (src[2 kk][j], src[2 kk + 1][j]), rows k .. k_pad zero. n % 16 == 0, k_pad even.
inline void amx_pack_pair_rows(const uint16_t* src, int64_t lds, int64_t k, int64_t k_pad, int64_t n, uint32_t* dst,
                               int64_t ldd) {
  for (int64_t kk = 0; 2 * kk < k_pad; ++kk) {
    const uint16_t* r0 = src + 2 * kk * lds;
    const uint16_t* r1 = r0 + lds;
    const bool has0 = 2 * kk < k, has1 = 2 * kk + 1 < k;
    for (int64_t j = 0; j < n; j += 16) {
      const __m512i lo = has0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + j)))
                              : _mm512_setzero_si512();
      const __m512i hi = has1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + j)))
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + kk * ldd + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// dst (cols x rows_pad words, ldd apart) = src (rows x cols words, lds apart)^T, columns rows .. rows_pad
// zero; cols % 16 == 0, rows_pad % 16 == 0. With src the bf16 rows of a matrix b (n x k, read as k / 2 words
// per row), dst is the B operand of a product by b^T (pair rows along k); with src pair rows (k / 2 x m), dst
// is the A operand of a product by their matrix's transpose (m rows of k bf16).
inline void amx_transpose_words(const uint32_t* src, int64_t lds, int64_t rows, int64_t rows_pad, int64_t cols,
                                uint32_t* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 in[16], out[16];
      for (int r = 0; r < 16; ++r)
        in[r] = r0 + r < rows ? _mm512_loadu_ps(reinterpret_cast<const float*>(src + (r0 + r) * lds + c0))
                              : _mm512_setzero_ps();
      transpose16(in, out);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (c0 + c) * ldd + r0), out[c]);
    }
}

// One block of MA x NB accumulator tiles (16 x 16 fp32 each; MA, NB in {1, 2}) of C (+)= A B over k in
// [0, kend) (kend % 32 == 0): tiles 0..3 accumulate, 4..5 hold A, 6..7 B.
template <int MA, int NB>
__attribute__((target("amx-tile,amx-bf16"))) void amx_gemm_block(const uint16_t* a, int64_t lda, const uint32_t* b,
                                                                  int64_t ldb, float* c, int64_t ldc, int64_t kend,
                                                                  bool acc) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;
  float* c01 = c + 16;
  float* c10 = c + 16 * ldc;
  float* c11 = c10 + 16;
  if (acc) {
    _tile_loadd(0, c, sc);
    if constexpr (NB == 2) _tile_loadd(1, c01, sc);
    if constexpr (MA == 2) _tile_loadd(2, c10, sc);
    if constexpr (MA == 2 && NB == 2) _tile_loadd(3, c11, sc);
  } else {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (MA == 2) _tile_zero(2);
    if constexpr (MA == 2 && NB == 2) _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < kend; k0 += 32) {
    const uint32_t* bk = b + (k0 / 2) * ldb;
    _tile_loadd(6, bk, sb);
    if constexpr (NB == 2) _tile_loadd(7, bk + 16, sb);
    _tile_loadd(4, a + k0, sa);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MA == 2) {
      _tile_loadd(5, a + 16 * lda + k0, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NB == 2) _tile_stored(1, c01, sc);
  if constexpr (MA == 2) _tile_stored(2, c10, sc);
  if constexpr (MA == 2 && NB == 2) _tile_stored(3, c11, sc);
}

// C (m x n fp32) = A B, or += with acc (C read into the accumulators), on the tiles (configured by
// amx_configure() on this thread): m, n multiples of 16, k of 32. ``lower``: A is lower triangular (A[i][kk]
// = 0 for kk > i), so a block of rows stops at the first multiple of 32 past its last row.
inline void amx_gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                     float* c, int64_t ldc, bool acc, bool lower = false) {
  for (int64_t i0 = 0; i0 < m; i0 += 32) {
    const bool two_a = i0 + 32 <= m;
    const int64_t kend = lower ? std::min(k, (i0 + (two_a ? 32 : 16) + 31) / 32 * 32) : k;
    const uint16_t* ai = a + i0 * lda;
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const bool two_b = j0 + 32 <= n;
      float* cij = c + i0 * ldc + j0;
      if (two_a && two_b) amx_gemm_block<2, 2>(ai, lda, b + j0, ldb, cij, ldc, kend, acc);
      else if (two_a) amx_gemm_block<2, 1>(ai, lda, b + j0, ldb, cij, ldc, kend, acc);
      else if (two_b) amx_gemm_block<1, 2>(ai, lda, b + j0, ldb, cij, ldc, kend, acc);
      else amx_gemm_block<1, 1>(ai, lda, b + j0, ldb, cij, ldc, kend, acc);
    }
  }
}

#endif

// Storage for tile operands and accumulators: 64-byte aligned, so that a 64-byte tile row is one cache line
// (with malloc's 16-byte alignment every row straddles two: 10-20 % slower tile loads, measured in linear).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    if (void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes)) return static_cast<T*>(p);
    throw std::bad_alloc();
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using TileVector = std::vector<T, CacheLineAllocator<T>>;

// Packed tile operands of one kernel call, in storage the calling thread keeps between calls (one buffer per
// Tag, i.e. per kernel): a fresh allocation of a few MiB is mapped and page-faulted in on every call, and a
// std::vector also zero-fills it (measured in linear: ~100 us at 512 x 1024, 10-20 % of a 512-row
// projection). 64-byte aligned (TileVector's reason), contents undefined: the caller writes what it reads.
// A request above keep_bytes gets storage of its own, freed when the lease ends, so a rare huge call does
// not pin its memory for the thread's lifetime.
template <typename T, typename Tag>
class ThreadScratch {
 public:
  ThreadScratch(size_t n, size_t keep_bytes) {
    if (n * sizeof(T) > keep_bytes) {
      own_ = allocate(n);
      data_ = own_.get();
      return;
    }
    thread_local Buffer kept(nullptr, std::free);
    thread_local size_t kept_n = 0;
    if (n > kept_n) {
      kept = allocate(n);
      kept_n = n;
    }
    data_ = kept.get();
  }
  T* data() const { return data_; }

 private:
  using Buffer = std::unique_ptr<T[], void (*)(void*)>;
  static Buffer allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return Buffer(static_cast<T*>(p), std::free);
  }
  Buffer own_{nullptr, std::free};
  T* data_ = nullptr;
};

}  // namespace h1r::cpu::H1R_ISA
