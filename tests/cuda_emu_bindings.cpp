// Python bindings of the emulator extension (tests/cuda_emu.py): the CUDA glue functions of
// csrc/cuda/api.h on CPU tensors, the emulator's controls, and the test-only kernel variants.
#include <torch/extension.h>

#include "api.h"
#include "emu/control.h"

#include "causal_conv1d.h"

namespace h1r::cuda::testing {

const char* launch_causal_conv1d_fwd_without_tile_barrier(const CausalConv1dFwdParams& p);

// fp32, channel-first, width 4, no options: just what the broken-barrier test needs.
at::Tensor causal_conv1d_fwd_without_tile_barrier(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == at::kFloat && weight.size(1) == 4);
  const at::Tensor wf = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(x);
  CausalConv1dFwdParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.dtype = DType::f32;
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.seqlen = x.size(2);
  p.width = 4;
  p.x_stride_b = p.out_stride_b = x.stride(0);
  p.x_stride_d = p.out_stride_d = x.stride(1);
  p.x_stride_l = p.out_stride_l = x.stride(2);
  p.weight = wf.data_ptr<float>();
  const char* err = launch_causal_conv1d_fwd_without_tile_barrier(p);
  TORCH_CHECK(err == nullptr, err);
  return out;
}

}  // namespace h1r::cuda::testing

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace h1r::cuda;
  m.def("selective_state_update", &selective_state_update);
  m.def("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.def("causal_conv1d_update", &causal_conv1d_update);
  m.def("reshape_and_cache", &reshape_and_cache);
  m.def("paged_attention_decode", &paged_attention_decode);
  m.def("causal_conv1d_fwd_without_tile_barrier", &h1r::cuda::testing::causal_conv1d_fwd_without_tile_barrier);
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
