// skipfast._C: every op schema, once. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in skipfast/ops.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import skipfast._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef SKIPFAST_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
#ifdef CPU_CAPABILITY_AVX2
  PyModule_AddStringConstant(mod, "cpu_capability", "avx2");
#else
  PyModule_AddStringConstant(mod, "cpu_capability", "default");
#endif
  return mod;
}
}

TORCH_LIBRARY(skipfast, m) {
  // ---- add_relu: relu(x + residual) ----
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  m.def("add_relu_backward(Tensor grad_out, Tensor out) -> Tensor");

  // ---- bn_act: batch norm (+ residual) (+ relu) ----
  // Phases (a synchronized BN all-reduces between them; see skipfast/ops/bn_act.py).
  // Per-channel tensors are float32 (float64 for float64 x); mask is 1 bit per element.
  m.def("bn_act_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_act_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
        "bool relu) -> (Tensor out, Tensor mask)");
  m.def("bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? mask) "
        "-> (Tensor sum_dy, Tensor sum_dy_xhat)");
  m.def("bn_act_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? mask, Tensor? sum_dy, Tensor? sum_dy_xhat, int count, bool grad_residual) "
        "-> (Tensor grad_x, Tensor grad_residual)");
  // Training forward in one call: stats, then apply.
  m.def("bn_act_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool relu) "
        "-> (Tensor out, Tensor mean, Tensor var, Tensor invstd, Tensor mask)");
  // Eager-mode training in one call (csrc/bn_act_eager.cpp): bn_act_train with its autograd
  // node, then the in-place running-statistics update. Not traced by torch.compile.
  m.def("bn_act_train_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> Tensor");
  // Eager-mode eval in one call: invstd of the running variance, then bn_act_apply.
  m.def("bn_act_eval_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor running_mean, "
        "Tensor running_var, float eps, bool relu) -> Tensor");
  // Eager-mode training of conv2d(relu(bn(x)), conv_weight) in one call: the activation is
  // recomputed in backward, not kept (skipfast/ops/bn_act.py, batch_norm_relu_conv2d).
  // num_batches_tracked, when given, is counted; momentum None is the cumulative average.
  m.def("bn_act_relu_conv2d_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor conv_weight, float? momentum, float eps, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // BatchNormAct2d.forward in eager mode in one call: the checks of the functional API (same
  // messages), num_batches_tracked counted (when given; momentum None is the cumulative
  // average), then bn_act_train_eager or bn_act_eval_eager's work.
  m.def("bn_act_forward_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, float eps, "
        "bool relu) -> Tensor");
  // running = (1 - momentum) * running + momentum * batch (unbiased variance from count values
  // per channel), in place, in one call.
  m.def("bn_act_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
        "float momentum, int count) -> ()");

  // ---- dense: concat-free dense blocks ----
  // conv1x1(relu(x * scale + shift), weight): x may be a channel prefix of a channels_last
  // block buffer, read in place; the normalized tensor is never materialized.
  m.def("dense_bn_relu_conv1x1(Tensor x, Tensor scale, Tensor shift, Tensor weight) -> Tensor");
  // Accumulates g * scale into grad_x (g = gradient at x * scale + shift) and returns
  // (sum of g * x, sum of g, grad_weight).
  m.def("dense_bn_relu_conv1x1_backward_(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor weight, "
        "Tensor(a!) grad_x) -> (Tensor, Tensor, Tensor)");
  // Per-channel mean and biased variance over (N, H, W).
  m.def("dense_channel_stats(Tensor x) -> (Tensor, Tensor)");

  // ---- conv: convolution with fused bias + residual + relu epilogue ----
  m.def("conv2d_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, Tensor? residual, str? activation) -> Tensor");
  // 3x3, stride 1, padding 1 convolution by Winograd F(2x2, 3x3) (CPU, float32): u is the
  // [16, C, K] transformed weight G g G^T; bias, residual and ReLU as conv2d_bias_act.
  m.def("conv3x3_winograd(Tensor x, Tensor u, Tensor? bias, Tensor? residual, bool relu) -> Tensor");

  // ---- highway: h * t + x * (1 - t) ----
  // t = sigmoid(gate); backward recomputes t from (h, gate, x) and returns (dh, dgate, dx).
  m.def("highway(Tensor h, Tensor gate, Tensor x) -> Tensor");
  m.def("highway_backward(Tensor grad, Tensor h, Tensor gate, Tensor x) -> (Tensor, Tensor, Tensor)");

  // ---- unet: two-source decoder convolution ----
  // concat_conv2d has no C++ kernel: on CPU (and cuDNN) it is an ATen composition and on
  // GPU a Triton triton_op, both registered from skipfast/ops/unet.py.
}
