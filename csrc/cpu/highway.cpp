// Highway gate on CPU: one pass forward (h, gate, x -> y), one pass backward
// (grad, h, gate, x -> dh, dgate, dx). Math in csrc/highway.h; at::vec for the bulk
// (half types widened to float vectors), the scalar header functions for the tail.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "highway.h"

namespace skipfast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename V>
inline V vgate(const V& g) {
  const V one(1);
  return one / (one + g.neg().exp());
}

template <typename V>
inline V vforward(const V& h, const V& g, const V& x) {
  const V t = vgate(g);
  return h * t + x * (V(1) - t);
}

template <typename V>
inline void vbackward(const V& gr, const V& h, const V& g, const V& x, V& dh, V& dg, V& dx) {
  const V t = vgate(g);
  const V carry = V(1) - t;
  dh = gr * t;
  dg = gr * (h - x) * t * carry;
  dx = gr * carry;
}

template <typename scalar_t>
constexpr bool is_reduced() {
  return std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
}

template <typename scalar_t>
void forward_loop(const scalar_t* h, const scalar_t* g, const scalar_t* x, scalar_t* y, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      if constexpr (is_reduced<scalar_t>()) {
        auto [h0, h1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(h + i));
        auto [g0, g1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(g + i));
        auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
        at::vec::convert_from_float<scalar_t>(vforward(h0, g0, x0), vforward(h1, g1, x1)).store(y + i);
      } else {
        vforward(Vec::loadu(h + i), Vec::loadu(g + i), Vec::loadu(x + i)).store(y + i);
      }
    }
    for (; i < end; ++i) {
      y[i] = static_cast<scalar_t>(
          highway_forward<opmath_t>(static_cast<opmath_t>(h[i]), static_cast<opmath_t>(g[i]), static_cast<opmath_t>(x[i])));
    }
  });
}

template <typename scalar_t>
void backward_loop(const scalar_t* gr, const scalar_t* h, const scalar_t* g, const scalar_t* x, scalar_t* dh,
                   scalar_t* dg, scalar_t* dx, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      if constexpr (is_reduced<scalar_t>()) {
        using F = at::vec::Vectorized<float>;
        auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(gr + i));
        auto [h0, h1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(h + i));
        auto [g0, g1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(g + i));
        auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
        F dh0, dg0, dx0, dh1, dg1, dx1;
        vbackward(r0, h0, g0, x0, dh0, dg0, dx0);
        vbackward(r1, h1, g1, x1, dh1, dg1, dx1);
        at::vec::convert_from_float<scalar_t>(dh0, dh1).store(dh + i);
        at::vec::convert_from_float<scalar_t>(dg0, dg1).store(dg + i);
        at::vec::convert_from_float<scalar_t>(dx0, dx1).store(dx + i);
      } else {
        Vec vdh, vdg, vdx;
        vbackward(Vec::loadu(gr + i), Vec::loadu(h + i), Vec::loadu(g + i), Vec::loadu(x + i), vdh, vdg, vdx);
        vdh.store(dh + i);
        vdg.store(dg + i);
        vdx.store(dx + i);
      }
    }
    for (; i < end; ++i) {
      const auto d = highway_backward<opmath_t>(static_cast<opmath_t>(gr[i]), static_cast<opmath_t>(h[i]),
                                                static_cast<opmath_t>(g[i]), static_cast<opmath_t>(x[i]));
      dh[i] = static_cast<scalar_t>(d.dh);
      dg[i] = static_cast<scalar_t>(d.dgate);
      dx[i] = static_cast<scalar_t>(d.dx);
    }
  });
}

void check_inputs(const char* op, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& x) {
  check_floating(op, "x", x);
  check_same_shape(op, "h", h, x);
  check_same_shape(op, "gate", gate, x);
}

at::Tensor highway_cpu(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& x) {
  check_inputs("skipfast.highway", h, gate, x);
  const auto fmt = layout_of(x);
  auto hc = h.contiguous(fmt), gc = gate.contiguous(fmt), xc = x.contiguous(fmt);
  auto y = at::empty_like(xc, xc.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "highway_cpu", [&] {
    forward_loop<scalar_t>(hc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                           y.mutable_data_ptr<scalar_t>(), xc.numel());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> highway_backward_cpu(const at::Tensor& grad, const at::Tensor& h,
                                                                    const at::Tensor& gate, const at::Tensor& x) {
  check_inputs("skipfast.highway_backward", h, gate, x);
  check_same_shape("skipfast.highway_backward", "grad", grad, x);
  const auto fmt = layout_of(x);
  auto rc = grad.contiguous(fmt), hc = h.contiguous(fmt), gc = gate.contiguous(fmt), xc = x.contiguous(fmt);
  auto opts = xc.options().memory_format(fmt);
  auto dh = at::empty_like(xc, opts), dg = at::empty_like(xc, opts), dx = at::empty_like(xc, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "highway_backward_cpu", [&] {
    backward_loop<scalar_t>(rc.const_data_ptr<scalar_t>(), hc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                            xc.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(),
                            dg.mutable_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), xc.numel());
  });
  return {dh, dg, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CPU, m) {
  m.impl("highway", &highway_cpu);
  m.impl("highway_backward", &highway_backward_cpu);
}

}  // namespace skipfast
