// Launcher of the Mamba2 decode step (csrc/cuda/selective_state_update.cu); plain C++ for the glue.
#pragma once

#include "launch.h"

namespace h1r::cuda {

struct SelectiveStateUpdateParams {
  void* state;  // (S, h, p, n) contiguous, updated in place
  DType state_dtype;
  const void* x;  // (b, h, p) contiguous
  const void* z;  // (b, h, p) or null
  void* out;      // (b, h, p)
  DType dtype;    // of x, z and out
  const float* dt;       // (b, h)
  const float* A;        // (h,)
  const float* B;        // (b, g, n)
  const float* C;        // (b, g, n)
  const float* D;        // (h, p) or null
  const float* dt_bias;  // (h,) or null
  const int32_t* state_batch_indices;  // (b,) or null; a row outside [0, S) is padding: out = 0
  int64_t batch, nheads, dim, dstate, ngroups, state_rows;
  bool dt_softplus;
};

const char* launch_selective_state_update(const SelectiveStateUpdateParams& p, void* stream);

}  // namespace h1r::cuda
