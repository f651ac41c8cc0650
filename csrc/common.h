// Checks and helpers shared by every kernel file (CPU and CUDA host code).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace skipfast {

// Layout the kernels write, torch's batch norm's: contiguous for a contiguous x, channels_last
// for a dense channels_last one, otherwise torch's suggest_memory_format() (channels_last
// when the strides are ordered as channels_last's). skipfast/_layout.py (used by the fake
// kernels) has the same rule.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  if (t.dim() != 4 || t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast) || t.suggest_memory_format() == at::MemoryFormat::ChannelsLast)
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& a, const at::Tensor& ref) {
  TORCH_CHECK(a.sizes() == ref.sizes(), op, ": ", name, " must have shape ", ref.sizes(),
              " (the shape of x), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " (the dtype of x), got ", a.scalar_type());
  TORCH_CHECK(a.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              " (the device of x), got ", a.device());
}

// A kernel argument for an optional tensor: its data, or null when it is undefined.
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

}  // namespace skipfast
