// Plain types shared by the CUDA kernel files and their torch-facing glue (no torch, no CUDA headers):
// the glue fills a params struct of raw pointers, sizes and strides and calls the family's launcher.
#pragma once

#include <cstdint>

namespace h1r::cuda {

// Element type of a kernel's floating I/O (accumulation is always fp32).
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

}  // namespace h1r::cuda
