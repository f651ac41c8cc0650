#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "add_relu.h"
#include "common.h"
#include "cuda/cuda_utils.cuh"

namespace skipfast {
namespace {

// Grid-stride loop over 16-byte packs, then a scalar tail.
template <typename scalar_t>
__global__ void add_relu_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                scalar_t* __restrict__ out, int64_t n, bool vectorized) {
  constexpr int V = vec16<scalar_t>();
  using P = Pack<scalar_t, V>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vectorized) {
    const int64_t packs = n / V;
    for (int64_t p = tid; p < packs; p += stride) {
      P a = reinterpret_cast<const P*>(x)[p];
      P b = reinterpret_cast<const P*>(r)[p];
      P o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        o.v[k] = static_cast<scalar_t>(add_relu<acc_t>(static_cast<acc_t>(a.v[k]), static_cast<acc_t>(b.v[k])));
      }
      reinterpret_cast<P*>(out)[p] = o;
    }
    done = packs * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(add_relu<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(r[i])));
  }
}

template <typename scalar_t>
__global__ void relu_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                     scalar_t* __restrict__ gx, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    gx[i] = relu_backward<scalar_t>(g[i], y[i]);
  }
}

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) {
  check_floating("skipfast.add_relu", "x", x);
  check_same_shape("skipfast.add_relu", "residual", residual, x);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto rc = residual.contiguous(fmt);
  auto out = at::empty_like(xc, xc.options().memory_format(fmt));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  constexpr int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cuda", [&] {
    const bool vec = aligned16(xc.const_data_ptr()) && aligned16(rc.const_data_ptr()) && aligned16(out.data_ptr());
    const int64_t work = vec ? n / vec16<scalar_t>() + 1 : n;
    add_relu_kernel<scalar_t><<<blocks_for(work, threads), threads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor add_relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out) {
  check_same_shape("skipfast.add_relu_backward", "grad_out", grad_out, out);
  c10::cuda::CUDAGuard guard(out.device());
  const auto fmt = layout_of(out);
  auto gc = grad_out.contiguous(fmt);
  auto yc = out.contiguous(fmt);
  auto gx = at::empty_like(yc, yc.options().memory_format(fmt));
  const int64_t n = yc.numel();
  if (n == 0) return gx;
  constexpr int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_relu_backward_cuda", [&] {
    relu_backward_kernel<scalar_t><<<blocks_for(n, threads), threads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_backward", &add_relu_backward_cuda);
}

}  // namespace skipfast
