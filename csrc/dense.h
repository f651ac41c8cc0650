// Per-element math of the dense family (BN scale/shift + ReLU applied while loading),
// shared by the CPU kernels and any device kernels.
#pragma once
#include <c10/macros/Macros.h>

namespace skipfast {

// relu(x * scale + shift); NaN propagates, as torch.relu.
template <typename T>
C10_HOST_DEVICE inline T bn_relu(T x, T scale, T shift) {
  const T pre = x * scale + shift;
  return pre < T(0) ? T(0) : pre;
}

// Gradient of relu(pre) w.r.t. pre given the gradient of its output (threshold_backward).
template <typename T>
C10_HOST_DEVICE inline T bn_relu_grad(T grad_h, T x, T scale, T shift) {
  return x * scale + shift > T(0) ? grad_h : T(0);
}

}  // namespace skipfast
