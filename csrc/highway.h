// Per-element math of the highway family, shared by the CPU and CUDA kernels.
//   t = sigmoid(gate),  y = h * t + x * (1 - t) = x + t * (h - x)
// Backward from (grad, h, gate, x) alone (t is recomputed, never saved):
//   dh = grad * t,  dx = grad * (1 - t),  dgate = grad * (h - x) * t * (1 - t)
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>

namespace skipfast {

template <typename T>
C10_HOST_DEVICE inline T highway_gate(T gate) {
  return T(1) / (T(1) + std::exp(-gate));  // exp overflow gives t = 0, as torch.sigmoid
}

template <typename T>
C10_HOST_DEVICE inline T highway_forward(T h, T gate, T x) {
  const T t = highway_gate(gate);
  return h * t + x * (T(1) - t);
}

template <typename T>
struct HighwayGrads {
  T dh, dgate, dx;
};

template <typename T>
C10_HOST_DEVICE inline HighwayGrads<T> highway_backward(T grad, T h, T gate, T x) {
  const T t = highway_gate(gate);
  const T carry = T(1) - t;
  return {grad * t, grad * (h - x) * t * carry, grad * carry};
}

}  // namespace skipfast
