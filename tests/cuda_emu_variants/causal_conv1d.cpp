// Test-only variants of the kernels of csrc/cuda/causal_conv1d.cu, compiled into its emulator translation unit
// (no torch header here; the torch side is in cuda_emu_bindings.cpp).
//
// The channel-first causal conv1d forward kernel without the __syncthreads between staging its input
// tile in shared memory and reading it: the tests require the emulator to give a wrong result with it,
// which shows that the harness can fail.
namespace h1r::cuda::testing {

const char* launch_causal_conv1d_fwd_without_tile_barrier(const CausalConv1dFwdParams& p) {
  if (p.width != 4 || p.dtype != DType::f32 || p.channel_last) return "test variant: fp32, width 4, channel-first";
  return launch(causal_conv1d_fwd_channel_first_kernel<float, 4, /*kBarrier=*/false>,
                dim3(unsigned(ceil_div(p.seqlen, kFirstTile)), unsigned(p.dim), unsigned(p.batch)),
                dim3(kFirstThreads), 0, nullptr, p);
}

}  // namespace h1r::cuda::testing
