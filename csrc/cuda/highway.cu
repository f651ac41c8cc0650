// Highway gate on CUDA: one pass forward, one pass backward (math in csrc/highway.h).
// Grid-stride loops over 16-byte packs when every pointer is aligned, then a scalar tail;
// fp32 math for the half types.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cuda/cuda_utils.cuh"
#include "highway.h"

namespace skipfast {
namespace {

template <typename scalar_t>
__global__ void highway_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g,
                               const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, bool vectorized) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec16<scalar_t>();
  using P = Pack<scalar_t, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vectorized) {
    const int64_t packs = n / V;
    for (int64_t p = tid; p < packs; p += stride) {
      const P a = reinterpret_cast<const P*>(h)[p];
      const P b = reinterpret_cast<const P*>(g)[p];
      const P c = reinterpret_cast<const P*>(x)[p];
      P o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        o.v[k] = static_cast<scalar_t>(highway_forward<opmath_t>(a.v[k], b.v[k], c.v[k]));
      }
      reinterpret_cast<P*>(y)[p] = o;
    }
    done = packs * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    y[i] = static_cast<scalar_t>(highway_forward<opmath_t>(h[i], g[i], x[i]));
  }
}

template <typename scalar_t>
__global__ void highway_backward_kernel(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ h,
                                        const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ dh, scalar_t* __restrict__ dg,
                                        scalar_t* __restrict__ dx, int64_t n, bool vectorized) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec16<scalar_t>();
  using P = Pack<scalar_t, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vectorized) {
    const int64_t packs = n / V;
    for (int64_t p = tid; p < packs; p += stride) {
      const P r = reinterpret_cast<const P*>(gr)[p];
      const P a = reinterpret_cast<const P*>(h)[p];
      const P b = reinterpret_cast<const P*>(g)[p];
      const P c = reinterpret_cast<const P*>(x)[p];
      P oh, og, ox;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const auto d = highway_backward<opmath_t>(r.v[k], a.v[k], b.v[k], c.v[k]);
        oh.v[k] = static_cast<scalar_t>(d.dh);
        og.v[k] = static_cast<scalar_t>(d.dgate);
        ox.v[k] = static_cast<scalar_t>(d.dx);
      }
      reinterpret_cast<P*>(dh)[p] = oh;
      reinterpret_cast<P*>(dg)[p] = og;
      reinterpret_cast<P*>(dx)[p] = ox;
    }
    done = packs * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const auto d = highway_backward<opmath_t>(gr[i], h[i], g[i], x[i]);
    dh[i] = static_cast<scalar_t>(d.dh);
    dg[i] = static_cast<scalar_t>(d.dgate);
    dx[i] = static_cast<scalar_t>(d.dx);
  }
}

void check_inputs(const char* op, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& x) {
  check_floating(op, "x", x);
  check_same_shape(op, "h", h, x);
  check_same_shape(op, "gate", gate, x);
}

at::Tensor highway_cuda(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& x) {
  check_inputs("skipfast.highway", h, gate, x);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto hc = h.contiguous(fmt), gc = gate.contiguous(fmt), xc = x.contiguous(fmt);
  auto y = at::empty_like(xc, xc.options().memory_format(fmt));
  const int64_t n = xc.numel();
  if (n == 0) return y;
  constexpr int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "highway_cuda", [&] {
    const bool vec = aligned16(hc.const_data_ptr()) && aligned16(gc.const_data_ptr()) &&
                     aligned16(xc.const_data_ptr()) && aligned16(y.data_ptr());
    const int64_t work = vec ? n / vec16<scalar_t>() + 1 : n;
    highway_kernel<scalar_t><<<blocks_for(work, threads), threads, 0, stream>>>(
        hc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> highway_backward_cuda(const at::Tensor& grad, const at::Tensor& h,
                                                                     const at::Tensor& gate, const at::Tensor& x) {
  check_inputs("skipfast.highway_backward", h, gate, x);
  check_same_shape("skipfast.highway_backward", "grad", grad, x);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto rc = grad.contiguous(fmt), hc = h.contiguous(fmt), gc = gate.contiguous(fmt), xc = x.contiguous(fmt);
  auto opts = xc.options().memory_format(fmt);
  auto dh = at::empty_like(xc, opts), dg = at::empty_like(xc, opts), dx = at::empty_like(xc, opts);
  const int64_t n = xc.numel();
  if (n == 0) return {dh, dg, dx};
  constexpr int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "highway_backward_cuda", [&] {
    const bool vec = aligned16(rc.const_data_ptr()) && aligned16(hc.const_data_ptr()) &&
                     aligned16(gc.const_data_ptr()) && aligned16(xc.const_data_ptr()) && aligned16(dh.data_ptr()) &&
                     aligned16(dg.data_ptr()) && aligned16(dx.data_ptr());
    const int64_t work = vec ? n / vec16<scalar_t>() + 1 : n;
    highway_backward_kernel<scalar_t><<<blocks_for(work, threads), threads, 0, stream>>>(
        rc.const_data_ptr<scalar_t>(), hc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
        xc.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(), dg.mutable_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(), n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dh, dg, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CUDA, m) {
  m.impl("highway", &highway_cuda);
  m.impl("highway_backward", &highway_backward_cuda);
}

}  // namespace skipfast
