// AMX tile helpers shared by the kernels that multiply bf16 on tiles (linear_kernels.cpp,
// selective_scan_kernels.cpp). Include inside a *_kernels.cpp; the helpers exist in the AVX-512 build only
// (the other ISA builds never reach AMX code: amx_usable() in cpu/amx.h is false for them).
//
// The tile layout every user configures: palette 1, eight tiles of 16 rows x 64 bytes (16 x 16 fp32
// accumulators, or 16 x 32 bf16 operands; a B operand holds 16 rows of k-pairs: B[kk][j] =
// (b[2 kk][j], b[2 kk + 1][j])).
#pragma once

#include <cstdint>
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

#endif
}  // namespace h1r::cpu::H1R_ISA
