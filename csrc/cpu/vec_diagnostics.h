// GCC 12's false positives on ATen's AVX-512 wrappers, silenced in one place for the SIMD kernel files.
//
// Several intrinsics ATen's vectors are built on take an "undefined" source register (_mm512_undefined_*
// in the bf16 / fp16 widening, vpmovzxwd / vpslld, _mm512_shuffle_f32x4 in vec_reduce_all). Once they are
// inlined into an OpenMP body or into a flattened AVX512-BF16 function, GCC 12 reports that register as
// (maybe) uninitialized, pointing into avx512fintrin.h: not our code, and no value is read from it.
//
// Include this first in a *_kernels.cpp (before the ATen headers: GCC judges a warning by the diagnostic
// state where the inlined line sits). It silences -Wmaybe-uninitialized; a file where GCC goes on to the
// definite form defines H1R_SILENCE_UNINITIALIZED before including it to silence -Wuninitialized too.
// Diagnostic pragmas hold to the end of the translation unit, which is what the kernel files want.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(H1R_SILENCE_UNINITIALIZED)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif
