// conv2d_bias_act on CUDA: ATen (cuDNN) convolution, then one fused
// bias + residual + ReLU pass over the output. The Triton implicit-GEMM kernel with the
// epilogue fused before its store is skipfast::conv2d_bias_act_triton.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "conv.h"
#include "conv_common.h"
#include "cuda/cuda_utils.cuh"

namespace skipfast {
namespace {

template <typename scalar_t>
__global__ void conv_epilogue_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ bias,
                                     const scalar_t* __restrict__ residual, int64_t n, int64_t C, int64_t HW,
                                     bool channels_last, bool relu_on) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = channels_last ? i % C : (i / HW) % C;
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t b = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
    const acc_t r = residual ? static_cast<acc_t>(residual[i]) : acc_t(0);
    y[i] = static_cast<scalar_t>(conv_epilogue<acc_t>(static_cast<acc_t>(y[i]), b, r, relu_on));
  }
}

at::Tensor conv2d_bias_act_cuda(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                const std::optional<at::Tensor>& residual_in, std::optional<c10::string_view> activation) {
  const bool relu_on = conv_check_args(x_in, weight, bias_in, groups, activation);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const auto out_size = conv_output_size(x, weight, stride, padding, dilation);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) {
    conv_check_residual(out_size, x, *residual_in);
    residual = residual_in->contiguous(fmt);
  }
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  at::Tensor out = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups).contiguous(fmt);
  const int64_t n = out.numel();
  if (n == 0) return out;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv2d_bias_act_cuda", [&] {
    conv_epilogue_kernel<scalar_t><<<blocks_for(n, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), bias ? bias->const_data_ptr<scalar_t>() : nullptr,
        residual ? residual->const_data_ptr<scalar_t>() : nullptr, n, out.size(1), out.size(2) * out.size(3),
        fmt == at::MemoryFormat::ChannelsLast, relu_on);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CUDA, m) { m.impl("conv2d_bias_act", &conv2d_bias_act_cuda); }

}  // namespace skipfast
