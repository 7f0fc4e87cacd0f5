// The CUDA implementations of the torch.ops.h1r.* ops (schemas in csrc/registration.cpp), one
// function per op, defined in csrc/cuda/<family>_api.cpp and registered there for the CUDA key.
// The tests' emulator extension binds the same functions for CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace h1r::cuda {

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    int64_t chunk_size, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx, bool dt_softplus, double dt_min, double dt_max);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd(const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_states, const at::Tensor& x,
                   const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                   int64_t chunk_size, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                   const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
                   const std::optional<at::Tensor>& seq_idx, bool dt_softplus, double dt_min, double dt_max);

at::Tensor selective_state_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const std::optional<at::Tensor>& state_batch_indices);

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& seq_idx,
                                                     const std::optional<at::Tensor>& initial_states,
                                                     bool return_final_states, bool silu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_states, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& seq_idx,
    const std::optional<at::Tensor>& initial_states, bool silu);

at::Tensor causal_conv1d_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu,
                                const std::optional<at::Tensor>& conv_state_indices);

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping);

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);

at::Tensor paged_attention_prefill(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& cu_seqlens_q, double scale);

}  // namespace h1r::cuda
