// Raw-pointer parameters of the sampling kernels (shared by the glue and the per-ISA kernel files).
#pragma once

#include <cstdint>

#include "cpu/float_io.h"

namespace h1r::cpu {

// One token per row of logits (rows, vocab) (row stride `row_stride` elements, unit column stride), the
// row's temperature (0: greedy), top_p and uniform draw u in (0, 1]; the top-k log-probs of the raw
// distribution log_softmax(logits). See the schema of sample_top_p in csrc/registration.cpp.
struct SampleTopPParams {
  const void* logits;
  FloatType dtype;
  int64_t rows, vocab, row_stride;
  const float* temperature;  // (rows,)
  const float* top_p;        // (rows,)
  const float* uniform;      // (rows,)
  int64_t k;                 // top log-probs per row (>= 0)
  int64_t* tokens;           // (rows,)
  float* top_logprobs;       // (rows, k)
  int64_t* top_ids;          // (rows, k)
  float* token_logprob;      // (rows,)
};

}  // namespace h1r::cpu
