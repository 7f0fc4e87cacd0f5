// Python bindings of the emulator extension (tests/cuda_emu.py): the CUDA glue functions of
// csrc/cuda/api.h on CPU tensors, the emulator's controls, and the test-only kernel variants.
#include <torch/extension.h>

#include "api.h"
#include "emu/control.h"

namespace h1r::cuda::testing {
at::Tensor causal_conv1d_fwd_without_tile_barrier(const at::Tensor& x, const at::Tensor& weight);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace h1r::cuda;
  m.def("selective_state_update", &selective_state_update);
  m.def("set_schedule", &h1r::emu::set_schedule, "Fiber order: 0 forward, 1 reverse, 2 random(seed)",
        pybind11::arg("order"), pybind11::arg("seed") = 0);
  m.def("stats", []() {
    auto s = h1r::emu::stats();
    return std::map<std::string, uint64_t>{{"launches", s.launches},
                                           {"blocks", s.blocks},
                                           {"fiber_switches", s.fiber_switches},
                                           {"block_barriers", s.block_barriers},
                                           {"warp_collectives", s.warp_collectives}};
  });
}
