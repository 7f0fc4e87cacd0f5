// How a streaming kernel narrows its fp32 lanes to the element type T and stores them.
//
// The narrowing is a policy type, so that the same kernel body is compiled once with ATen's software
// rounding and once with AVX512-BF16's vcvtneps2bf16:
//   SoftCvt     float_io's store_n / round_to: ATen's round to nearest even (for bf16, ~8 integer
//               instructions per vector, a third of them on the shuffle port).
//   HwBf16Cvt   (AVX-512 build only) bf16 through vcvtneps2bf16, one instruction per vector. It rounds to
//               nearest even too, but treats denormal inputs as zero and quiets NaNs keeping their payload,
//               where the software path keeps denormals and writes NaNs its own way: a vector holding a
//               denormal or a NaN (one vfpclassps test, rarely taken) takes the software path, so both
//               policies write the same bits for every input. fp32 / fp16 take the software path.
// Use (as the norms, rotary, linear's AMX epilogue and the state update do): the kernel body is a template on the
// policy; with_cvt<T>(hw, body) runs body(HwBf16Cvt{}) inside a function compiled for avx512bf16 with
// flatten (the body and its callees inlined there, where the instruction is allowed) when T is bf16 and hw
// is set (the glue passes cpu_has_avx512_bf16(): the CPU has it and H1R_CPU_NO_AVX512_BF16 is unset), and
// body(SoftCvt{}) otherwise. The body must not open an OpenMP region (its outlined function would not be
// flattened): call with_cvt inside the region, per row or per block of rows.
//
// Outputs larger than the cache are written with non-temporal stores (put<true>, where stream_rows() allows
// it): a line written whole need not be read for ownership first, which saves a third of the memory
// traffic of a kernel that reads one row and writes one.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/float_io.h"

namespace h1r::cpu::H1R_ISA {

struct SoftCvt {
  template <typename T>
  static VF round(const VF& v) { return round_to<T>(v); }  // v rounded to T, kept in fp32 lanes
  template <typename T>
  static void store(T* p, const VF& v, int64_t n) { store_n(p, v, n); }  // n <= kLanes values as T
  // kLanes values as T with a non-temporal store (p aligned to kLanes * sizeof(T) bytes); the caller ends
  // its stores with stream_fence().
  template <typename T>
  static void stream(T* p, const VF& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, __m512(v));
    else _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow<T>(v));
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, __m256(v));
    else _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow<T>(v));
#else
    store_f(p, v);
#endif
  }
};

// Orders a thread's non-temporal stores before whatever it does next (e.g. leaving the parallel region).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
struct HwBf16Cvt {
  // The lanes vcvtneps2bf16 would round differently from the software path: denormals, quiet and signaling NaNs.
  __attribute__((target("avx512bf16"))) static bool special(const VF& v) {
    return _mm512_fpclass_ps_mask(__m512(v), 0x01 | 0x20 | 0x80) != 0;
  }
  template <typename T>
  __attribute__((target("avx512bf16"))) static VF round(const VF& v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (__builtin_expect(special(v), 0)) return round_to<T>(v);
      const __m512i r = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(__m512(v)));
      return VF(_mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
    } else {
      return round_to<T>(v);
    }
  }
  template <typename T>
  __attribute__((target("avx512bf16"))) static void stream(T* p, const VF& v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (__builtin_expect(special(v), 0)) return SoftCvt::stream(p, v);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(__m512(v)));
    } else {
      SoftCvt::stream(p, v);
    }
  }
  template <typename T>
  __attribute__((target("avx512bf16"))) static void store(T* p, const VF& v, int64_t n) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (__builtin_expect(special(v), 0)) return store_n(p, v, n);
      const __m256i r = (__m256i)_mm512_cvtneps_pbh(__m512(v));
      if (n == kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
      else _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), r);
    } else {
      store_n(p, v, n);
    }
  }
};

// body(HwBf16Cvt{}) with every call inlined, in a function allowed to use AVX512-BF16.
template <typename Body>
__attribute__((target("avx512bf16"), flatten)) void call_hw_bf16(const Body& body) {
  body(HwBf16Cvt{});
}
#endif

// Store n <= kLanes values; a full vector non-temporally when kStream (stream_rows() said the rows may).
template <bool kStream, typename Cvt, typename T>
inline void put(T* p, const VF& v, int64_t n) {
  if constexpr (kStream) {
    if (n == kLanes) return Cvt::template stream<T>(p, v);
  }
  Cvt::store(p, v, n);
}

// Whether a kernel writing `rows` rows of `row_bytes` from `out` should store them non-temporally
// (put<true>, then stream_fence()): the output is larger than kStreamMinBytes, so that it would not stay in
// the cache for its reader anyway and its lines are better not read for ownership, and every row starts on
// a 64-byte line. (Full vectors are then aligned: the tail of a row, if any, takes ordinary stores.)
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;
inline bool stream_rows(const void* out, int64_t rows, int64_t row_bytes) {
  return rows * row_bytes >= kStreamMinBytes && reinterpret_cast<uintptr_t>(out) % 64 == 0 && row_bytes % 64 == 0;
}

// body(HwBf16Cvt{}) when T is bf16 and hw is set (AVX-512 build), else body(SoftCvt{}).
template <typename T, typename Body>
inline void with_cvt([[maybe_unused]] bool hw, const Body& body) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (hw) return call_hw_bf16(body);
  }
#endif
  body(SoftCvt{});
}

}  // namespace h1r::cpu::H1R_ISA
