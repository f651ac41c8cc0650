// Per-element math of the add_relu family, shared by the CPU and CUDA kernels.
#pragma once
#include <c10/macros/Macros.h>

namespace skipfast {

// relu that propagates NaN, as torch.relu does.
template <typename T>
C10_HOST_DEVICE inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

template <typename T>
C10_HOST_DEVICE inline T add_relu(T x, T residual) {
  return relu(x + residual);
}

// Gradient of relu given its output, as torch's threshold_backward(grad, out, 0).
template <typename T>
C10_HOST_DEVICE inline T relu_backward(T grad, T out) {
  return out > T(0) ? grad : T(0);
}

}  // namespace skipfast
