// Launchers of the Mamba2 chunked scan forward (csrc/cuda/selective_scan.cu) and backward
// (csrc/cuda/selective_scan_bwd.cu); plain C++ for the glue.
#pragma once

#include "launch.h"

namespace h1r::cuda {

constexpr int kScanMaxDState = 256;

// The inputs of the forward, which the backward reads too.
struct SelectiveScanInputs {
  const void* x;  // (b, l, h, p) contiguous
  const void* B;  // (b, l, g, n)
  const void* C;  // (b, l, g, n)
  const void* z;  // (b, l, h, p) or null
  DType dtype;    // of x, B, C, z and of the (b, l, h, p) outputs
  const float* dt;              // (b, l, h)
  const float* A;               // (h,)
  const float* D;               // (h, p) or null
  const float* dt_bias;         // (h,) or null
  const float* initial_states;  // (b, h, p, n) or null
  const int32_t* seq_idx;       // (b, l) or null
  int64_t batch, seqlen, nheads, dim, ngroups, dstate;
  bool dt_softplus;
  bool dt_clamp;  // clamp dt' to [dt_min, dt_max] (off for the default (0, inf), as mamba_ssm)
  float dt_min, dt_max;
};

struct SelectiveScanFwdParams : SelectiveScanInputs {
  void* out;            // (b, l, h, p)
  float* final_states;  // (b, h, p, n)
};

const char* launch_selective_scan_fwd(const SelectiveScanFwdParams& p, void* stream);

// The backward (csrc/cuda/selective_scan_bwd.cu). The kernels are parallel over (batch, head, tile of
// kRows channels); what sums over the channels of a head (dB, dC, ddt, dA) is written per tile and
// reduced afterwards. Scratch sizes: ntiles = selective_scan_bwd_row_tiles(p), slots =
// selective_scan_bwd_state_slots(p) (checkpointed states, about 2 sqrt(l / 16)), window_tokens =
// selective_scan_bwd_window_tokens(p) (the tokens whose dB, dC partial sums are held at once: bounded by
// selective_scan_bwd_partial_budget() floats, or one checkpoint segment); all need only the sizes.
struct SelectiveScanBwdParams : SelectiveScanInputs {
  const void* dout;             // (b, l, h, p), in dtype
  const float* dfinal_states;   // (b, h, p, n) or null
  int64_t window_tokens;  // = selective_scan_bwd_window_tokens(*this)
  // outputs
  void* dx;                // (b, l, h, p)
  void* dz;                // (b, l, h, p) when z is given
  float* ddt;              // (b, l, h): gradient of the raw dt
  float* dB;               // (b, l, g, n)
  float* dC;               // (b, l, g, n)
  float* dA_partial;       // (b, h, ntiles), zeroed by the caller (the kernels add to it)
  float* dD_partial;       // (b, h, p) or null, zeroed by the caller
  float* dinitial_states;  // (b, h, p, n) or null
  // scratch
  float* chunk_states;  // (b, h, slots, p, n): checkpointed states
  float* dB_partial;    // (ntiles, b, window_tokens, h, n)
  float* dC_partial;    // (ntiles, b, window_tokens, h, n)
  float* ddt_partial;   // (ntiles, b, l, h): gradient of dt' (after softplus / clamp)
};

// Floats of dB, dC partial sums the backward may hold at once (a tuning knob; the tests lower it).
int64_t& selective_scan_bwd_partial_budget();
int64_t selective_scan_bwd_row_tiles(const SelectiveScanBwdParams& p);
int64_t selective_scan_bwd_window_tokens(const SelectiveScanBwdParams& p);
int64_t selective_scan_bwd_state_slots(const SelectiveScanBwdParams& p);
const char* launch_selective_scan_bwd(const SelectiveScanBwdParams& p, void* stream);

}  // namespace h1r::cuda
