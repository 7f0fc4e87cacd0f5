// Floating element types for the raw-pointer CPU kernels, and (inside a per-ISA kernel file) vector
// loads/stores that widen fp32 / bf16 / fp16 to fp32 lanes and narrow back.
//
// The torch-facing glue includes this header only for FloatType (H1R_ISA undefined); the *_kernels.cpp
// files, compiled once per ISA with H1R_ISA set, also get the helpers below in their own ISA namespace
// (Vectorized<float> is 16, 8 or 1 lanes wide depending on the ISA, so the helpers must not be shared).
#pragma once

#include <cstdint>

namespace h1r::cpu {

enum class FloatType : int8_t { f32 = 0, bf16 = 1, f16 = 2 };

}  // namespace h1r::cpu

#ifdef H1R_ISA
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <utility>

namespace h1r::cpu::H1R_ISA {

using VF = at::vec::Vectorized<float>;
constexpr int64_t kLanes = VF::size();

// One fp32 vector <-> kLanes bf16 / fp16 values in a half-width register, with ATen's own rounding
// (round to nearest even). at::vec's generic convert_from_float narrows two vectors at a time; these
// narrow one, which halves the conversion work of a kernel that streams single vectors.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define H1R_NARROW_ONE 1
#if defined(CPU_CAPABILITY_AVX512)
using Native = __m512;   // the register of a VF
using Narrow = __m256i;  // kLanes 16-bit floats
inline void store_narrow(void* p, const Narrow& r) { _mm256_storeu_si256(static_cast<__m256i*>(p), r); }
#else
using Native = __m256;
using Narrow = __m128i;
inline void store_narrow(void* p, const Narrow& r) { _mm_storeu_si128(static_cast<__m128i*>(p), r); }
#endif
template <typename T>
inline Narrow narrow(const VF& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return at::vec::cvtfp32_bf16(Native(v));
  else return at::vec::cvtfp32_fp16(Native(v));
}
template <typename T>
inline VF widen(const Narrow& r) {
  Native o;
  if constexpr (std::is_same_v<T, c10::BFloat16>) at::vec::cvtbf16_fp32(r, o);
  else at::vec::cvtfp16_fp32(r, o);
  return VF(o);
}
#endif

// Call f(T{}) with T the C++ type of `t`.
template <typename F>
inline decltype(auto) with_float_type(FloatType t, F&& f) {
  switch (t) {
    case FloatType::bf16: return f(c10::BFloat16{});
    case FloatType::f16: return f(c10::Half{});
    default: return f(float{});
  }
}

// Load kLanes elements (or n < kLanes, the rest zero) as fp32 lanes.
template <typename T>
inline VF load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return VF::loadu(p);
  } else {
    VF v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}
template <typename T>
inline VF load_f(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return VF::loadu(p, n);
  } else {
    __at_align__ float buf[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return VF::loadu(buf);
  }
}

// Store fp32 lanes as T (round to nearest even for bf16 / fp16).
template <typename T>
inline void store_f(T* p, const VF& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
#ifdef H1R_NARROW_ONE
    store_narrow(p, narrow<T>(v));
#else
    at::vec::convert_from_float<T>(v, v).store(p, kLanes);
#endif
  }
}
template <typename T>
inline void store_f(T* p, const VF& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    __at_align__ float buf[kLanes];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// v rounded to the nearest bf16 (ties to even) and kept in fp32 lanes: the bf16 value is the upper half
// of the fp32 word, so the rounding is integer arithmetic on the word (add 0x7fff plus the lsb of the
// upper half, clear the lower half) with no narrowing and widening. NaN lanes are passed through.
inline VF round_bf16(const VF& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i b = _mm512_castps_si512(Native(v));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                     _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __mmask16 ordered = _mm512_cmp_ps_mask(Native(v), Native(v), _CMP_ORD_Q);
  return VF(_mm512_mask_blend_ps(ordered, Native(v), _mm512_castsi512_ps(r)));
#else
  const __m256i b = _mm256_castps_si256(Native(v));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                     _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 ordered = _mm256_cmp_ps(Native(v), Native(v), _CMP_ORD_Q);
  return VF(_mm256_blendv_ps(Native(v), _mm256_castsi256_ps(r), ordered));
#endif
}
#endif

// v rounded to T and widened back: what storing to T and reloading would give.
template <typename T>
inline VF round_to(const VF& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#ifdef H1R_NARROW_ONE
    if constexpr (std::is_same_v<T, c10::BFloat16>) return round_bf16(v);
    else return widen<T>(narrow<T>(v));
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
#endif
  }
}

// Apply body(i, n) to [0, len) in chunks of kLanes; n == kLanes except for the tail.
template <typename Body>
inline void for_lanes(int64_t len, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) body(i, kLanes);
  if (i < len) body(i, len - i);
}

// Load / store of one chunk, full or partial.
template <typename T>
inline VF load_n(const T* p, int64_t n) { return n == kLanes ? load_f(p) : load_f(p, n); }
template <typename T>
inline void store_n(T* p, const VF& v, int64_t n) {
  if (n == kLanes) store_f(p, v);
  else store_f(p, v, n);
}

}  // namespace h1r::cpu::H1R_ISA
#endif  // H1R_ISA
