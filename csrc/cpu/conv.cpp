// conv2d_bias_act on CPU: oneDNN convolution with fused post-ops (the
// mkldnn::_convolution_pointwise ops torch's CPU compiler emits; the weight may be
// prepacked by mkldnn::_reorder_convolution_weight), else ATen convolution followed by
// one fused bias + residual + ReLU pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "conv.h"
#include "conv_common.h"

namespace skipfast {
namespace {

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// oneDNN's bfloat16 convolution needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; ATen says which.
bool onednn_bf16_supported() {
  static const bool supported = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("mkldnn::_is_mkldnn_bf16_supported", "")
                                    .typed<bool()>()
                                    .call();
  return supported;
}

bool onednn_usable(const at::Tensor& x, const at::Tensor& weight) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  const auto t = x.scalar_type();
  return (t == at::kFloat || (t == at::kBFloat16 && onednn_bf16_supported())) &&
         (weight.is_mkldnn() || weight.layout() == at::kStrided);
}

at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const std::optional<at::Tensor>& residual, bool relu_on) {
  const c10::IValue none;
  std::vector<c10::IValue> stack;
  if (residual.has_value()) {
    // Where x is not channels_last, ATen's binary op runs convolution, then add_relu_, which
    // has no bfloat16 kernel: there the ReLU is applied here instead.
    const bool relu_after = relu_on && x.scalar_type() == at::kBFloat16 &&
                            !x.is_contiguous(at::MemoryFormat::ChannelsLast);
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
    stack = {x, *residual, weight, bias.has_value() ? c10::IValue(*bias) : none, vec(padding), vec(stride),
             vec(dilation), groups, std::string("add"), none,
             relu_on && !relu_after ? c10::IValue(std::string("relu")) : none,
             c10::List<std::optional<at::Scalar>>(), none};
    op.callBoxed(&stack);
    if (relu_after) stack.back().toTensor().relu_();
  } else {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
    stack = {x, weight, bias.has_value() ? c10::IValue(*bias) : none, vec(padding), vec(stride), vec(dilation),
             groups, std::string(relu_on ? "relu" : "none"), c10::List<std::optional<at::Scalar>>(), none};
    op.callBoxed(&stack);
  }
  return stack.back().toTensor();
}

// out = act(out + bias[c] + residual), in place, one pass.
template <typename scalar_t>
void epilogue(at::Tensor& out, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
              bool relu_on, bool channels_last) {
  const int64_t C = out.size(1), HW = out.size(2) * out.size(3), n = out.numel();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = channels_last ? i % C : (i / HW) % C;
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t bv = b ? static_cast<acc_t>(b[c]) : acc_t(0);
      const acc_t rv = r ? static_cast<acc_t>(r[i]) : acc_t(0);
      y[i] = static_cast<scalar_t>(conv_epilogue<acc_t>(static_cast<acc_t>(y[i]), bv, rv, relu_on));
    }
  });
}

at::Tensor conv2d_bias_act_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               const std::optional<at::Tensor>& residual_in, std::optional<c10::string_view> activation) {
  const bool relu_on = conv_check_args(x_in, weight, bias_in, groups, activation);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = residual_in->contiguous(fmt);

  const auto out_size = conv_output_size(x, weight, stride, padding, dilation);
  if (residual.has_value()) conv_check_residual(out_size, x, *residual);
  if (onednn_usable(x, weight)) {
    return onednn_conv(x, weight, bias, stride, padding, dilation, groups, residual, relu_on);
  }
  TORCH_CHECK(!weight.is_mkldnn(), "skipfast.conv2d_bias_act: a prepacked (mkldnn) weight needs oneDNN and float32/bfloat16 x");
  at::Tensor out = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups).contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv2d_bias_act_epilogue", [&] {
    epilogue<scalar_t>(out, bias, residual, relu_on, fmt == at::MemoryFormat::ChannelsLast);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CPU, m) { m.impl("conv2d_bias_act", &conv2d_bias_act_cpu); }
// A weight prepacked by mkldnn::_reorder_convolution_weight carries the MkldnnCPU key.
TORCH_LIBRARY_IMPL(skipfast, MkldnnCPU, m) { m.impl("conv2d_bias_act", &conv2d_bias_act_cpu); }

}  // namespace skipfast
