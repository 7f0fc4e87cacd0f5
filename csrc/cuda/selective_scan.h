// Launcher of the Mamba2 chunked scan forward (csrc/cuda/selective_scan.cu); plain C++ for the glue.
#pragma once

#include "launch.h"

namespace h1r::cuda {

constexpr int kScanMaxDState = 256;

struct SelectiveScanFwdParams {
  const void* x;  // (b, l, h, p) contiguous
  const void* B;  // (b, l, g, n)
  const void* C;  // (b, l, g, n)
  const void* z;  // (b, l, h, p) or null
  void* out;      // (b, l, h, p)
  DType dtype;    // of x, B, C, z, out
  const float* dt;              // (b, l, h)
  const float* A;               // (h,)
  const float* D;               // (h, p) or null
  const float* dt_bias;         // (h,) or null
  const float* initial_states;  // (b, h, p, n) or null
  const int32_t* seq_idx;       // (b, l) or null
  float* final_states;          // (b, h, p, n)
  int64_t batch, seqlen, nheads, dim, ngroups, dstate;
  bool dt_softplus;
  bool dt_clamp;  // clamp dt' to [dt_min, dt_max] (off for the default (0, inf), as mamba_ssm)
  float dt_min, dt_max;
};

const char* launch_selective_scan_fwd(const SelectiveScanFwdParams& p, void* stream);

}  // namespace h1r::cuda
