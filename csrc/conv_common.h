// Host-side argument checks of conv2d_bias_act, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "common.h"

namespace skipfast {

// Returns whether the activation is relu; rejects anything but relu / none.
inline bool conv_check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t groups, const std::optional<c10::string_view>& activation) {
  constexpr const char* op = "skipfast.conv2d_bias_act";
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [K, C/groups, R, S], got ", weight.dim(), "-D");
  TORCH_CHECK(groups >= 1 && x.size(1) == weight.size(1) * groups, op, ": x has ", x.size(1),
              " channels but weight expects ", weight.size(1), " x groups=", groups);
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": weight's ", weight.size(0), " output channels are not divisible by groups=", groups);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (", x.scalar_type(), "), got ",
              weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [", weight.size(0),
                "], got ", bias->sizes());
  }
  const bool relu_on = activation.has_value() && *activation == "relu";
  TORCH_CHECK(!activation.has_value() || relu_on || *activation == "none", op,
              ": activation must be 'relu' or None, got '", std::string(*activation), "'");
  return relu_on;
}

inline std::vector<int64_t> conv_output_size(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> size{x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t kernel = dilation[d] * (weight.size(d + 2) - 1) + 1;
    size[d + 2] = (x.size(d + 2) + 2 * padding[d] - kernel) / stride[d] + 1;
    TORCH_CHECK(size[d + 2] > 0, "skipfast.conv2d_bias_act: the kernel (", kernel, ") does not fit x's padded size ",
                x.size(d + 2) + 2 * padding[d], " in spatial dim ", d);
  }
  return size;
}

// Checked before any work, so a rejected call does nothing.
inline void conv_check_residual(at::IntArrayRef out_size, const at::Tensor& x, const at::Tensor& residual) {
  TORCH_CHECK(residual.sizes() == out_size, "skipfast.conv2d_bias_act: residual must have the output's shape ",
              out_size, ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "skipfast.conv2d_bias_act: residual must have dtype ",
              x.scalar_type(), ", got ", residual.scalar_type());
  TORCH_CHECK(residual.device() == x.device(), "skipfast.conv2d_bias_act: residual must be on ", x.device(), ", got ",
              residual.device());
}

}  // namespace skipfast
