// Run-time choice of the SIMD level for the CPU kernels.
//
// Every csrc/cpu/<family>_kernels.cpp is compiled three times (setup.py): with AVX-512, with AVX2+FMA
// and with no SIMD flags, each time into its own namespace h1r::cpu::<isa> (H1R_ISA) and with ATen's
// matching CPU_CAPABILITY, so at::vec::Vectorized<float> is 16, 8 or 1 lanes wide. The torch-facing glue
// (csrc/cpu/<family>.cpp, built once with baseline flags) declares the kernel in all three namespaces
// and calls it through H1R_CPU_DISPATCH, which picks the best level this CPU supports. The kernels
// themselves take raw pointers and sizes only: no torch header beyond at::vec and c10's scalar types.
#pragma once

#include <cstdlib>
#include <cstring>

namespace h1r::cpu {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

// The level in use: the best the CPU supports, lowered (never raised) by H1R_CPU_ISA=avx2|scalar.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::scalar;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = Isa::avx512;
#endif
    if (const char* env = std::getenv("H1R_CPU_ISA")) {
      Isa want = best;
      if (!std::strcmp(env, "scalar")) want = Isa::scalar;
      else if (!std::strcmp(env, "avx2")) want = Isa::avx2;
      else if (!std::strcmp(env, "avx512")) want = Isa::avx512;
      if (want < best) best = want;
    }
    return best;
  }();
  return isa;
}

// Whether the AVX-512 kernels may use AVX512-BF16 (linear's vdpbf16ps dot product, the state update's
// vcvtneps2bf16 rounding): the CPU has it, the level in use is avx512, and H1R_CPU_NO_AVX512_BF16 is not set
// (the tests use it to reach the software paths).
inline bool cpu_has_avx512_bf16() {
  static const bool has = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return cpu_isa() == Isa::avx512 && __builtin_cpu_supports("avx512bf16") &&
           std::getenv("H1R_CPU_NO_AVX512_BF16") == nullptr;
#else
    return false;
#endif
  }();
  return has;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace h1r::cpu

// Declare a kernel entry point in every ISA namespace, e.g.
//   H1R_DECLARE_CPU_KERNEL(void, rms_norm_fwd_kernel, const RmsNormParams&);
#define H1R_DECLARE_CPU_KERNEL(ret, name, ...)     \
  namespace h1r::cpu::avx512 { ret name(__VA_ARGS__); } \
  namespace h1r::cpu::avx2 { ret name(__VA_ARGS__); }   \
  namespace h1r::cpu::scalar { ret name(__VA_ARGS__); }

// Call the kernel for the ISA in use: H1R_CPU_DISPATCH(rms_norm_fwd_kernel, params).
#define H1R_CPU_DISPATCH(name, ...)                                  \
  [&]() -> decltype(auto) {                                          \
    switch (::h1r::cpu::cpu_isa()) {                                 \
      case ::h1r::cpu::Isa::avx512: return ::h1r::cpu::avx512::name(__VA_ARGS__); \
      case ::h1r::cpu::Isa::avx2: return ::h1r::cpu::avx2::name(__VA_ARGS__);     \
      default: return ::h1r::cpu::scalar::name(__VA_ARGS__);         \
    }                                                                \
  }()
