// Per-element epilogue of conv2d_bias_act, shared by the CPU and CUDA kernels:
// y = act(acc + bias[c] + residual).
#pragma once
#include <c10/macros/Macros.h>

#include "add_relu.h"

namespace skipfast {

template <typename T>
C10_HOST_DEVICE inline T conv_epilogue(T acc, T bias, T residual, bool relu_on) {
  const T v = acc + bias + residual;
  return relu_on ? relu(v) : v;
}

}  // namespace skipfast
