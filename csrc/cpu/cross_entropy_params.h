// The row kernels of the cross_entropy family (csrc/cpu/cross_entropy_kernels.cpp) and their glue
// (csrc/cpu/cross_entropy.cpp) share this plain struct; it includes nothing from torch.
//
// A kernel call covers one chunk of tokens: `logits` holds the chunk's raw lm-head output
// x = hidden @ weight^T + bias, (rows, V) row-major, in the input dtype. The math is on
// u = x * scale (scale = logit_scale, divided by the temperature for log-probs) in fp32. When a kernel
// writes gradients it overwrites x in place with dL/dx (same dtype), ready for the two matmuls
// dL/dhidden = dx @ weight and dL/dweight += dx^T @ hidden.
#pragma once

#include <cstdint>

namespace h1r::cpu {

enum class CeDtype : int { f32 = 0, bf16 = 1, f16 = 2 };

struct CeRowsParams {
  void* logits = nullptr;  // (rows, V), read; overwritten with dL/dx when the kernel writes gradients
  CeDtype dtype = CeDtype::f32;
  int64_t rows = 0, V = 0;
  const int64_t* target = nullptr;  // (rows,)
  int64_t ignore_index = -100;
  float scale = 1.f;

  // cross entropy: loss_t = (1 - eps) (lse - u_y) + eps (lse - mean_j u_j) + z_loss_scale lse^2
  float label_smoothing = 0.f, z_loss_scale = 0.f;

  // per-row outputs (fp32, (rows,)); null = not wanted
  float* loss = nullptr;
  float* z_loss = nullptr;
  float* lse = nullptr;
  float* logprobs = nullptr;
  float* entropy = nullptr;

  // gradients. Forward kernels write them when write_grad, every row's loss weighted by grad_scale.
  // Backward kernels read the saved lse_in and the per-row upstream gradients: grad_rows is dL/dloss_t
  // (cross entropy) or dL/dlogprob_t (log-probs); grad_entropy is dL/dentropy_t. Either may be null (0).
  bool write_grad = false;
  float grad_scale = 1.f;
  const float* lse_in = nullptr;
  const float* grad_rows = nullptr;
  const float* grad_entropy = nullptr;
};

}  // namespace h1r::cpu
