// Helpers of the torch-facing CPU glue (csrc/cpu/<family>.cpp), never of the per-ISA kernel files.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/float_io.h"

namespace h1r::cpu {

// The raw-pointer kernels' element type for a (checked) fp32 / bf16 / fp16 tensor.
inline FloatType float_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return FloatType::bf16;
    case at::kHalf: return FloatType::f16;
    default: return FloatType::f32;
  }
}

}  // namespace h1r::cpu
