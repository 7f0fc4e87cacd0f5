// Argument checks shared by every C++ and CUDA entry point. They raise c10::ValueError (a Python
// ValueError) that names the argument and says what was expected and what was got, so that a direct
// torch.ops.h1r.* call with bad input fails cleanly instead of reading out of bounds. The friendlier,
// user-facing normalization (dtype promotion, D (h,) -> (h, p), ...) lives in h1r_ops/_checks.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace h1r {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// Check t's exact shape; -1 in `want` matches any size.
inline void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> want) {
  std::vector<int64_t> w(want);
  bool ok = t.dim() == (int64_t)w.size();
  for (size_t i = 0; ok && i < w.size(); ++i) ok = w[i] < 0 || t.size(i) == w[i];
  TORCH_CHECK_VALUE(ok, "argument '", name, "': expected shape ", shape_str(w), " (-1 = any), got ",
                    shape_str(t.sizes()));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "argument '", name, "': expected a contiguous tensor, got strides ",
                    shape_str(t.strides()));
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "argument '", name,
                    "': expected dtype float32, bfloat16 or float16, got ", s);
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, "argument '", name, "': expected dtype ", want, ", got ",
                    t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "argument '", name, "': expected device ", ref.device(),
                    " (that of '", ref_name, "'), got ", t.device());
}

// The usual bundle for a floating input of fixed shape on ref's device.
inline void check_input(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                        const at::Tensor& ref, const char* ref_name) {
  check_shape(t, name, shape);
  check_same_device(t, name, ref, ref_name);
  check_contiguous(t, name);
}

inline at::Tensor empty_like_none(const at::Tensor& ref) { return at::empty({0}, ref.options()); }

}  // namespace h1r
