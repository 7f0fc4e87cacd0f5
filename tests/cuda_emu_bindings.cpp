// Python bindings of the emulator extension (tests/cuda_emu.py): the CUDA glue functions of
// csrc/cuda/api.h on CPU tensors, the emulator's controls, and the test-only kernel variants.
#include <torch/extension.h>

#include "api.h"
#include "emu/control.h"

#include "causal_conv1d.h"
#include "selective_scan.h"

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

namespace h1r::emu_selftest {

const char* launch_collectives(int* out, int threads, int width);
const char* launch_atomics(float* sum, int* max_id, int blocks, int threads);
const char* launch_block_sum(const float* in, float* out, int blocks, int threads);
const char* launch_divergent_barrier(float* out);
const char* launch_too_many_threads();
void convert(const float* in, uint16_t* half_bits, uint16_t* bf16_bits, int64_t n);
void widen(const uint16_t* bits, float* from_half, float* from_bf16, int64_t n);

void check(const char* err) { TORCH_CHECK(err == nullptr, err); }

void bind(pybind11::module_& m) {
  m.def("collectives", [](int threads, int width) {
    at::Tensor out = at::zeros({7, threads}, at::kInt);
    check(launch_collectives(out.data_ptr<int>(), threads, width));
    return out;
  });
  m.def("atomics", [](int blocks, int threads) {
    at::Tensor sum = at::zeros({1}, at::kFloat), max_id = at::full({1}, -1, at::kInt);
    check(launch_atomics(sum.data_ptr<float>(), max_id.data_ptr<int>(), blocks, threads));
    return std::make_tuple(sum, max_id);
  });
  m.def("block_sum", [](const at::Tensor& in, int threads) {
    at::Tensor out = at::empty({in.numel() / threads}, at::kFloat);
    check(launch_block_sum(in.data_ptr<float>(), out.data_ptr<float>(), int(out.numel()), threads));
    return out;
  });
  m.def("divergent_barrier", []() {
    at::Tensor out = at::zeros({64}, at::kFloat);
    check(launch_divergent_barrier(out.data_ptr<float>()));
  });
  m.def("too_many_threads", []() { check(launch_too_many_threads()); });
  m.def("convert", [](const at::Tensor& in) {  // fp32 -> (fp16 bits, bf16 bits) as int16
    at::Tensor h = at::empty(in.sizes(), at::kShort), b = at::empty(in.sizes(), at::kShort);
    convert(in.data_ptr<float>(), reinterpret_cast<uint16_t*>(h.data_ptr()),
            reinterpret_cast<uint16_t*>(b.data_ptr()), in.numel());
    return std::make_tuple(h, b);
  });
  m.def("widen", [](const at::Tensor& bits) {  // int16 bits -> (as fp16, as bf16) in fp32
    at::Tensor h = at::empty(bits.sizes(), at::kFloat), b = at::empty(bits.sizes(), at::kFloat);
    widen(reinterpret_cast<const uint16_t*>(bits.data_ptr()), h.data_ptr<float>(), b.data_ptr<float>(),
          bits.numel());
    return std::make_tuple(h, b);
  });
}

}  // namespace h1r::emu_selftest

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace h1r::cuda;
  h1r::emu_selftest::bind(m);
  m.def("selective_scan_fwd", &selective_scan_fwd);
  m.def("selective_scan_bwd", &selective_scan_bwd);
  m.def("selective_state_update", &selective_state_update);
  m.def("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.def("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.def("causal_conv1d_update", &causal_conv1d_update);
  m.def("reshape_and_cache", &reshape_and_cache);
  m.def("paged_attention_decode", &paged_attention_decode);
  m.def("paged_attention_prefill", &paged_attention_prefill);
  m.def("causal_conv1d_fwd_without_tile_barrier", &h1r::cuda::testing::causal_conv1d_fwd_without_tile_barrier);
  m.def(
      "set_scan_bwd_partial_budget",
      [](int64_t floats) { return std::exchange(selective_scan_bwd_partial_budget(), floats); },
      "Floats of dB, dC partial sums selective_scan_bwd holds at once; returns the previous value");
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
