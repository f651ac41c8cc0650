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

  // ---- dense: concat-free dense blocks ----

  // ---- conv: convolution with fused bias + residual + relu epilogue ----

  // ---- highway: h * t + x * (1 - t) ----
  // t = sigmoid(gate); backward recomputes t from (h, gate, x) and returns (dh, dgate, dx).
  m.def("highway(Tensor h, Tensor gate, Tensor x) -> Tensor");
  m.def("highway_backward(Tensor grad, Tensor h, Tensor gate, Tensor x) -> (Tensor, Tensor, Tensor)");

  // ---- unet: two-source decoder convolution ----
  // concat_conv2d has no C++ kernel: on CPU (and cuDNN) it is an ATen composition and on
  // GPU a Triton triton_op, both registered from skipfast/ops/unet.py.
}
