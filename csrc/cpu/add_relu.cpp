#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "add_relu.h"
#include "common.h"

namespace skipfast {
namespace {

constexpr int64_t kGrain = 32768;

template <typename scalar_t>
void add_relu_loop(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      const Vec zero(scalar_t(0));
      for (; i + Vec::size() <= end; i += Vec::size()) {
        Vec v = Vec::loadu(x + i) + Vec::loadu(r + i);
        at::vec::clamp_min(v, zero).store(out + i);  // clamp_min propagates NaN
      }
    }
    for (; i < end; ++i) {
      out[i] = static_cast<scalar_t>(add_relu<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(r[i])));
    }
  });
}

template <typename scalar_t>
void relu_backward_loop(const scalar_t* g, const scalar_t* y, scalar_t* gx, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      gx[i] = relu_backward<scalar_t>(g[i], y[i]);
    }
  });
}

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  check_floating("skipfast.add_relu", "x", x);
  check_same_shape("skipfast.add_relu", "residual", residual, x);
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto rc = residual.contiguous(fmt);
  auto out = at::empty_like(xc, xc.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cpu", [&] {
    add_relu_loop<scalar_t>(xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(), xc.numel());
  });
  return out;
}

at::Tensor add_relu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out) {
  check_same_shape("skipfast.add_relu_backward", "grad_out", grad_out, out);
  const auto fmt = layout_of(out);
  auto gc = grad_out.contiguous(fmt);
  auto yc = out.contiguous(fmt);
  auto gx = at::empty_like(yc, yc.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_relu_backward_cpu", [&] {
    relu_backward_loop<scalar_t>(gc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
                                 gx.mutable_data_ptr<scalar_t>(), yc.numel());
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_backward", &add_relu_backward_cpu);
}

}  // namespace skipfast
