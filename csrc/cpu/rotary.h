// Raw-pointer parameter block shared by the rotary glue (rotary.cpp) and its per-ISA kernels
// (rotary_kernels.cpp).
#pragma once

#include <cstdint>

#include "cpu/float_io.h"

namespace h1r::cpu {

// One of q / k: (batch, heads, seqlen, head_dim) with a unit last stride; `out` may equal `in` (in place).
struct RotaryTensor {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_stride[3];   // batch, head, token (elements)
  int64_t out_stride[3];
};

// NeoX layout: channels [0, rd/2) and [rd/2, rd) are the two halves x1, x2 of the rotated part,
// c and s the cos / sin rows of width rd at the token's position:
//   forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2        (= x * c + rotate_half(x) * s)
//   inverse  y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1        (its transpose: the backward)
// Channels [rd, head_dim) are copied (out != in) or left alone (in place).
struct RotaryParams {
  RotaryTensor q, k;
  int64_t batch, seqlen, head_dim, rot_dim;
  const void* cos;
  const void* sin;
  int64_t cos_batch_stride;     // elements between batch rows of cos/sin (0: shared); rows are rot_dim apart
  const int64_t* position_ids;  // nullable, (batch, seqlen): cos/sin are then tables (max_pos, rot_dim)
  bool inverse;
  FloatType dtype, cos_dtype;
  bool hw_bf16;  // bf16 may be narrowed by AVX512-BF16 (cpu_has_avx512_bf16())
};

}  // namespace h1r::cpu
