// Torch-facing helpers for the CUDA glue (csrc/cuda/*_api.cpp): checks, dtype mapping, stream, errors.
//
// The glue is also compiled into the tests' CPU emulator extension (-DH1R_CUDA_EMULATOR): there the
// kernels run on CPU tensors, so "the kernel device" is the CPU, there is no stream, and the functions
// are bound with pybind instead of being registered for the CUDA dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

#include "checks.h"
#include "launch.h"

#if !defined(H1R_CUDA_EMULATOR)
// c10's stream and guard only (ATen/cuda/CUDAContext.h would pull in the cuBLAS / cuSPARSE headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace h1r::cuda {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  check_float(t, name);
  switch (t.scalar_type()) {
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: return DType::f32;
  }
}

// Every tensor a kernel reads must live on the kernel device, the device of `ref`.
inline void check_device(const at::Tensor& t, const char* name) {
#if defined(H1R_CUDA_EMULATOR)
  TORCH_CHECK_VALUE(t.is_cpu(), "argument '", name, "': the CUDA emulator runs on CPU tensors, got ", t.device());
#else
  TORCH_CHECK_VALUE(t.is_cuda(), "argument '", name, "': expected a CUDA tensor, got ", t.device());
#endif
}

// A named argument that may be absent (an empty optional), for the checks over many arguments below.
struct Arg {
  const char* name;
  const at::Tensor* t;  // null when absent
  Arg(const char* n, const at::Tensor& x) : name(n), t(&x) {}
  Arg(const char* n, const std::optional<at::Tensor>& x) : name(n), t(x ? &*x : nullptr) {}
};
inline void check_devices(std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t) check_device(*a.t, a.name);
}
// An optional int32 index tensor (seq_idx, state indices) of the given shape.
inline void check_index(const std::optional<at::Tensor>& t, const char* name, std::initializer_list<int64_t> shape) {
  if (!t) return;
  check_shape(*t, name, shape);
  check_dtype(*t, name, at::kInt);
}
// A decode-time state cache of `rows` slots (dim 0): addressed through int32 indices (b,), or its first
// b rows.
inline void check_state_cache(const at::Tensor& state, const char* name, const std::optional<at::Tensor>& indices,
                              const char* indices_name, int64_t b) {
  check_contiguous(state, name);
  if (indices) check_index(indices, indices_name, {b});
  else
    TORCH_CHECK_VALUE(state.size(0) >= b, "argument '", name, "': expected at least b = ", b, " rows, got ",
                      state.size(0));
}

// Small fp32 side inputs (dt, A, D, weights, ...) are converted once here so that the kernels are
// templated on the element type of the large tensors only. Returns a contiguous fp32 tensor, or nullopt.
inline at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
inline std::optional<at::Tensor> as_f32(const std::optional<at::Tensor>& t) {
  std::optional<at::Tensor> r;  // (no ternary: g++ warns maybe-uninitialized on one)
  if (t) r = as_f32(*t);
  return r;
}
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  std::optional<at::Tensor> r;
  if (t) r = t->contiguous();
  return r;
}
// D given per head (h,) or per channel (h, p), as fp32 (h, p).
inline std::optional<at::Tensor> per_channel_D(const std::optional<at::Tensor>& D, int64_t h, int64_t p) {
  std::optional<at::Tensor> r;
  if (D) r = as_f32(D->dim() == 1 ? D->unsqueeze(1).expand({h, p}) : *D);
  return r;
}
template <typename T>
inline const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// Sets the device for the glue's allocations and returns the stream to launch on.
struct KernelContext {
#if defined(H1R_CUDA_EMULATOR)
  explicit KernelContext(const at::Tensor&) {}
  void* stream() const { return nullptr; }
#else
  explicit KernelContext(const at::Tensor& t) : guard(t.device()) {}
  void* stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  c10::cuda::CUDAGuard guard;
#endif
};

inline void check_launch(const char* error, const char* kernel) {
  TORCH_CHECK(error == nullptr, "h1r ", kernel, ": kernel launch failed: ", error);
}

}  // namespace h1r::cuda
