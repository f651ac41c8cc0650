// bn_act on CUDA: per-channel statistics (Welford, merged with warp shuffles), fused
// normalize + residual + ReLU with a bit-packed mask, and the two backward passes.
// Math shared with the CPU kernels in csrc/bn_act.h.
//
// Reductions run in two steps: a partial kernel (grid: channels x splits) writes one
// partial per (split, channel) to a workspace, a finalize kernel merges the splits.
//   NCHW: one block per (channel, split of the N planes); threads stride the H*W plane
//         (16-byte loads when aligned), warp shuffle then shared memory merge.
//   channels_last: blocks of 32 channels x 8 rows; lanes read 32 consecutive channels
//         of a row (coalesced), rows are merged through shared memory.
// Elementwise kernels give each thread 8 consecutive elements = one mask byte, loaded
// and stored as packs of 8 (16 bytes for half types, 2 x 16 bytes for float) when
// every pointer is aligned to the pack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "bn_act.h"
#include "common.h"
#include "cuda/cuda_utils.cuh"

namespace skipfast {
namespace {

using namespace bn_act;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kTileC = 32;  // channels_last: channels per block
constexpr int kTileR = 8;   // channels_last: rows per block step

// ---- accumulators: K floats, a push and a merge ----

template <typename acc_t>
struct WelfordAcc {
  static constexpr int K = 3;
  acc_t v[K] = {0, 0, 0};  // n, mean, m2
  __device__ void push(acc_t x, acc_t /*unused*/, bool /*unused*/) {
    Welford<acc_t> w{v[0], v[1], v[2]};
    w = welford_push(w, x);
    v[0] = w.n, v[1] = w.mean, v[2] = w.m2;
  }
  __device__ void merge(const WelfordAcc& o) {
    Welford<acc_t> a{v[0], v[1], v[2]}, b{o.v[0], o.v[1], o.v[2]};
    a = welford_merge(a, b);
    v[0] = a.n, v[1] = a.mean, v[2] = a.m2;
  }
};

// sum(dy'), sum(dy' * (x - mean)); push(x - mean, dy, passes)
template <typename acc_t>
struct GradAcc {
  static constexpr int K = 2;
  acc_t v[K] = {0, 0};
  __device__ void push(acc_t xc, acc_t dy, bool pass) {
    const acc_t g = pass ? dy : acc_t(0);
    v[0] += g;
    v[1] += g * xc;
  }
  __device__ void merge(const GradAcc& o) {
    v[0] += o.v[0];
    v[1] += o.v[1];
  }
};

template <typename Acc>
__device__ Acc warp_merge(Acc a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    Acc o;
#pragma unroll
    for (int k = 0; k < Acc::K; ++k) o.v[k] = __shfl_down_sync(0xffffffffu, a.v[k], off);
    a.merge(o);
  }
  return a;
}

// Merge across a 1-D block: warp shuffles, then warp 0 merges the warps' results.
template <typename Acc>
__device__ Acc block_merge(Acc a) {
  __shared__ char raw[sizeof(Acc) * (kThreads / kWarp)];
  Acc* shared = reinterpret_cast<Acc*>(raw);
  a = warp_merge(a);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < int(blockDim.x / kWarp) ? shared[lane] : Acc();
    a = warp_merge(a);
  }
  return a;
}

// One element's contribution. Stats: push(x - pivot). Grad: push(x - mean, dy, mask bit).
// The statistics are accumulated around a pivot, each channel's first value (the same
// shifted data as the CPU kernels): float Welford on raw values of mean 1e4 and std 1e-2
// would lose the variance to rounding.
template <typename scalar_t, typename Acc>
struct Source {
  const scalar_t* x;
  const scalar_t* dy;     // null for stats
  const uint8_t* mask;    // null: no ReLU
  const float* mean;      // null for stats
  int64_t channel_stride; // stats: x[c * channel_stride] is channel c's pivot
  __device__ float pivot(int64_t c) const { return dy == nullptr ? static_cast<float>(x[c * channel_stride]) : 0.f; }
  __device__ void push(Acc& a, int64_t i, int64_t c, float pivot) const {
    const float xv = static_cast<float>(x[i]);
    if (dy == nullptr) {
      a.push(xv - pivot, 0.f, true);
    } else {
      const bool pass = mask == nullptr || mask_bit(mask, i);
      a.push(xv - mean[c], static_cast<float>(dy[i]), pass);
    }
  }
};

// NCHW partial: grid (C, S).
template <typename scalar_t, typename Acc>
__global__ void partial_nchw_kernel(Source<scalar_t, Acc> src, Acc* partial, int64_t N, int64_t C, int64_t HW) {
  const int64_t c = blockIdx.x;
  const float piv = src.pivot(c);
  Acc a;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t base = (n * C + c) * HW;
    constexpr int V = vec16<scalar_t>();
    const bool vec = src.dy == nullptr && HW % V == 0 && (reinterpret_cast<uintptr_t>(src.x + base) & 15) == 0;
    if (vec) {  // 16-byte loads of x (statistics pass)
      using P = Pack<scalar_t, V>;
      const P* xp = reinterpret_cast<const P*>(src.x + base);
      for (int64_t p = threadIdx.x; p < HW / V; p += blockDim.x) {
        const P pk = xp[p];
#pragma unroll
        for (int k = 0; k < V; ++k) a.push(static_cast<float>(pk.v[k]) - piv, 0.f, true);
      }
    } else {
      for (int64_t j = threadIdx.x; j < HW; j += blockDim.x) src.push(a, base + j, c, piv);
    }
  }
  a = block_merge(a);
  if (threadIdx.x == 0) partial[blockIdx.y * C + c] = a;
}

// channels_last partial: grid (ceil(C / 32), S), block (32, 8).
template <typename scalar_t, typename Acc>
__global__ void partial_cl_kernel(Source<scalar_t, Acc> src, Acc* partial, int64_t rows, int64_t C) {
  __shared__ char raw[sizeof(Acc) * kTileC * kTileR];
  Acc* shared = reinterpret_cast<Acc*>(raw);
  const int64_t c = int64_t(blockIdx.x) * kTileC + threadIdx.x;
  Acc a;
  if (c < C) {
    const float piv = src.pivot(c);
    for (int64_t r = int64_t(blockIdx.y) * kTileR + threadIdx.y; r < rows; r += int64_t(gridDim.y) * kTileR) {
      src.push(a, r * C + c, c, piv);
    }
  }
  shared[threadIdx.y * kTileC + threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int y = 1; y < kTileR; ++y) a.merge(shared[y * kTileC + threadIdx.x]);
    partial[blockIdx.y * C + c] = a;
  }
}

template <typename scalar_t, typename acc_out_t>
__global__ void finalize_stats_kernel(const WelfordAcc<float>* partial, int S, int64_t C, const scalar_t* x,
                                      int64_t channel_stride, double eps, bool want_invstd, acc_out_t* mean,
                                      acc_out_t* var, acc_out_t* invstd) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  WelfordAcc<float> a = partial[c];
  for (int s = 1; s < S; ++s) a.merge(partial[s * C + c]);
  const Welford<float> w{a.v[0], a.v[1], a.v[2]};
  const float v = biased_var(w);
  mean[c] = acc_out_t(static_cast<float>(x[c * channel_stride]) + w.mean);
  var[c] = acc_out_t(v);
  if (want_invstd) invstd[c] = acc_out_t(invstd_of<float>(v, float(eps)));
}

__global__ void finalize_grad_kernel(const GradAcc<float>* partial, int S, int64_t C, const float* invstd,
                                     float* sum_dy, float* sum_dy_xhat) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  GradAcc<float> a = partial[c];
  for (int s = 1; s < S; ++s) a.merge(partial[s * C + c]);
  sum_dy[c] = a.v[0];
  sum_dy_xhat[c] = a.v[1] * invstd[c];
}

// Runs the partial kernel for x's layout; returns the workspace and the number of splits.
template <typename scalar_t, typename Acc>
std::pair<at::Tensor, int> channel_partials(const at::Tensor& xc, bool cl, Source<scalar_t, Acc> src) {
  const int64_t N = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int S;
  if (cl) {
    const int64_t rows = N * HW;
    const int64_t tiles = (C + kTileC - 1) / kTileC;
    S = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, std::max<int64_t>(1, 1024 / tiles))));
    auto ws = at::empty({int64_t(S) * C * int64_t(sizeof(Acc))}, xc.options().dtype(at::kByte));
    partial_cl_kernel<scalar_t, Acc><<<dim3(tiles, S), dim3(kTileC, kTileR), 0, stream>>>(
        src, reinterpret_cast<Acc*>(ws.mutable_data_ptr()), rows, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {ws, S};
  }
  S = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(N, std::max<int64_t>(1, 1024 / C))));
  auto ws = at::empty({int64_t(S) * C * int64_t(sizeof(Acc))}, xc.options().dtype(at::kByte));
  partial_nchw_kernel<scalar_t, Acc><<<dim3(C, S), kThreads, 0, stream>>>(
      src, reinterpret_cast<Acc*>(ws.mutable_data_ptr()), N, C, HW);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ws, S};
}

// ---- elementwise ----

struct ChannelOf {
  int64_t C, HW;
  bool cl;
  __device__ int64_t operator()(int64_t i) const { return cl ? i % C : (i / HW) % C; }
};

template <typename scalar_t>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, scalar_t* __restrict__ out,
                             uint8_t* __restrict__ mask, const float* __restrict__ mean,
                             const float* __restrict__ invstd, const float* __restrict__ weight,
                             const float* __restrict__ bias, int64_t n, ChannelOf ch, bool vectorized) {
  using P = Pack<scalar_t, 8>;
  const int64_t groups = (n + 7) / 8;
  for (int64_t gi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; gi < groups; gi += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = gi * 8;
    const bool full = vectorized && i0 + 8 <= n;
    P xv, rv, ov;
    if (full) {
      xv = reinterpret_cast<const P*>(x)[gi];
      if (r) rv = reinterpret_cast<const P*>(r)[gi];
    }
    uint8_t bits = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t i = i0 + k;
      if (!full && i >= n) break;
      const int64_t c = ch(i);
      float y = normalize<float>(static_cast<float>(full ? xv.v[k] : x[i]), mean[c],
                                 scale_of<float>(weight, c, invstd[c]), bias_of<float>(bias, c));
      if (r) y += static_cast<float>(full ? rv.v[k] : r[i]);
      if (mask) {
        bits |= uint8_t(passes(y)) << k;
        y = relu(y);
      }
      if (full) {
        ov.v[k] = static_cast<scalar_t>(y);
      } else {
        out[i] = static_cast<scalar_t>(y);
      }
    }
    if (full) reinterpret_cast<P*>(out)[gi] = ov;
    if (mask) mask[gi] = bits;
  }
}

template <typename scalar_t>
__global__ void elemt_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                             const uint8_t* __restrict__ mask, const float* __restrict__ mean,
                             const float* __restrict__ invstd, const float* __restrict__ weight,
                             const float* __restrict__ sum_dy, const float* __restrict__ sum_dy_xhat, float inv_count,
                             scalar_t* __restrict__ dx, scalar_t* __restrict__ dr, int64_t n, ChannelOf ch,
                             bool vectorized) {
  using P = Pack<scalar_t, 8>;
  const int64_t groups = (n + 7) / 8;
  const bool has_sums = sum_dy != nullptr;
  for (int64_t gi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; gi < groups; gi += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = gi * 8;
    const bool full = vectorized && i0 + 8 <= n;
    P gv, xv, dxv, drv;
    if (full) {
      gv = reinterpret_cast<const P*>(dy)[gi];
      xv = reinterpret_cast<const P*>(x)[gi];
    }
    const uint8_t bits = mask ? mask[gi] : uint8_t(0xff);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t i = i0 + k;
      if (!full && i >= n) break;
      const int64_t c = ch(i);
      const float g = ((bits >> k) & 1) ? static_cast<float>(full ? gv.v[k] : dy[i]) : 0.f;
      const auto co = backward_coefs<float>(weight, c, invstd[c], has_sums, has_sums ? sum_dy[c] : 0.f,
                                            has_sums ? sum_dy_xhat[c] : 0.f, inv_count);
      const float d = grad_input<float>(g, static_cast<float>(full ? xv.v[k] : x[i]), mean[c], co);
      if (full) {
        dxv.v[k] = static_cast<scalar_t>(d);
        drv.v[k] = static_cast<scalar_t>(g);
      } else {
        dx[i] = static_cast<scalar_t>(d);
        if (dr) dr[i] = static_cast<scalar_t>(g);
      }
    }
    if (full) {
      reinterpret_cast<P*>(dx)[gi] = dxv;
      if (dr) reinterpret_cast<P*>(dr)[gi] = drv;
    }
  }
}

// ---- host entry points ----

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return opt(t) ? opt(t)->contiguous() : at::Tensor();
}

// Whether 8-element packs of scalar_t can be loaded and stored at p.
template <typename scalar_t>
bool pack8_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(Pack<scalar_t, 8>)) == 0;
}

ChannelOf channel_of(const at::Tensor& xc) {
  return ChannelOf{xc.size(1), xc.size(2) * xc.size(3), layout_of(xc) == at::MemoryFormat::ChannelsLast};
}

void check_not_double(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": float64 is not supported by the CUDA kernels; use "
              "SKIPFAST_BACKEND=reference or float32/float16/bfloat16");
}

void stats_into(const at::Tensor& xc, double eps, at::Tensor& mean, at::Tensor& var, at::Tensor* invstd) {
  const bool cl = layout_of(xc) == at::MemoryFormat::ChannelsLast;
  const int64_t C = xc.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_act_stats_cuda", [&] {
    using Acc = WelfordAcc<float>;
    const int64_t channel_stride = cl ? 1 : xc.size(2) * xc.size(3);
    Source<scalar_t, Acc> src{xc.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, channel_stride};
    auto [ws, S] = channel_partials<scalar_t, Acc>(xc, cl, src);
    finalize_stats_kernel<scalar_t, float><<<blocks_for(C, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<const Acc*>(ws.const_data_ptr()), S, C, xc.const_data_ptr<scalar_t>(), channel_stride, eps,
        invstd != nullptr,
        mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(),
        invstd ? invstd->mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void apply_into(const at::Tensor& xc, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& w,
                const at::Tensor& b, const at::Tensor& rc, at::Tensor& out, at::Tensor& mask) {
  const int64_t n = xc.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_act_apply_cuda", [&] {
    const bool vec = pack8_aligned<scalar_t>(xc.const_data_ptr()) && pack8_aligned<scalar_t>(out.data_ptr()) &&
                     (!rc.defined() || pack8_aligned<scalar_t>(rc.const_data_ptr()));
    apply_kernel<scalar_t><<<blocks_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), mask.numel() ? mask.mutable_data_ptr<uint8_t>() : nullptr,
        mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), ptr_or_null<float>(w), ptr_or_null<float>(b),
        n, channel_of(xc), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& x) {
  constexpr const char* op = "skipfast.bn_act_stats";
  check_x(op, x);
  check_not_double(op, x);
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(layout_of(x));
  auto opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({x.size(1)}, opts), var = at::empty({x.size(1)}, opts);
  if (x.numel() == 0) return {mean.fill_(NAN), var.fill_(NAN)};
  stats_into(xc, 0.0, mean, var, nullptr);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "skipfast.bn_act_apply";
  check_x(op, x);
  check_not_double(op, x);
  check_apply_args(op, x, mean, invstd, weight, bias, residual);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto out = at::empty_like(xc, xc.options().memory_format(fmt));
  auto mask = at::empty({relu ? mask_bytes(x.numel()) : 0}, x.options().dtype(at::kByte));
  auto rc = opt(residual) ? opt(residual)->contiguous(fmt) : at::Tensor();
  apply_into(xc, mean.contiguous(), invstd.contiguous(), contiguous_or_undefined(weight),
             contiguous_or_undefined(bias), rc, out, mask);
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu) {
  constexpr const char* op = "skipfast.bn_act_train";
  check_x(op, x);
  check_not_double(op, x);
  check_train_args(op, x, weight, bias, residual);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  const int64_t C = x.size(1);
  auto opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({C}, opts), var = at::empty({C}, opts), invstd = at::empty({C}, opts);
  auto out = at::empty_like(xc, xc.options().memory_format(fmt));
  auto mask = at::empty({relu ? mask_bytes(x.numel()) : 0}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {out, mean, var, invstd, mask};
  stats_into(xc, eps, mean, var, &invstd);
  auto rc = opt(residual) ? opt(residual)->contiguous(fmt) : at::Tensor();
  apply_into(xc, mean, invstd, contiguous_or_undefined(weight), contiguous_or_undefined(bias), rc, out, mask);
  return {out, mean, var, invstd, mask};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& mean, const at::Tensor& invstd,
                                                        const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "skipfast.bn_act_backward_reduce";
  check_x(op, x);
  check_not_double(op, x);
  check_backward_reduce_args(op, grad_out, x, mean, invstd, mask);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto gc = grad_out.contiguous(fmt);
  const int64_t C = x.size(1);
  auto opts = x.options().dtype(at::kFloat);
  auto sum_dy = at::zeros({C}, opts), sum_dy_xhat = at::zeros({C}, opts);
  if (x.numel() == 0) return {sum_dy, sum_dy_xhat};
  auto mc = mean.contiguous(), ic = invstd.contiguous();
  auto mk = contiguous_or_undefined(mask);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    using Acc = GradAcc<float>;
    Source<scalar_t, Acc> src{xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), ptr_or_null<uint8_t>(mk),
                              mc.const_data_ptr<float>()};
    auto [ws, S] = channel_partials<scalar_t, Acc>(xc, cl, src);
    finalize_grad_kernel<<<blocks_for(C, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<const Acc*>(ws.const_data_ptr()), S, C, ic.const_data_ptr<float>(),
        sum_dy.mutable_data_ptr<float>(), sum_dy_xhat.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xhat};
}

std::tuple<at::Tensor, at::Tensor> backward_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& invstd,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& mask,
                                                       const std::optional<at::Tensor>& sum_dy,
                                                       const std::optional<at::Tensor>& sum_dy_xhat, int64_t count,
                                                       bool grad_residual) {
  constexpr const char* op = "skipfast.bn_act_backward_elemt";
  check_x(op, x);
  check_not_double(op, x);
  check_backward_elemt_args(op, grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto gc = grad_out.contiguous(fmt);
  auto dx = at::empty_like(xc, xc.options().memory_format(fmt));
  auto dr = grad_residual ? at::empty_like(xc, xc.options().memory_format(fmt)) : at::empty({0}, xc.options());
  const int64_t n = xc.numel();
  if (n == 0) return {dx, dr};
  auto mc = mean.contiguous(), ic = invstd.contiguous();
  auto wc = contiguous_or_undefined(weight), mk = contiguous_or_undefined(mask);
  auto s1 = contiguous_or_undefined(sum_dy), s2 = contiguous_or_undefined(sum_dy_xhat);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_elemt_cuda", [&] {
    const bool vec = pack8_aligned<scalar_t>(xc.const_data_ptr()) && pack8_aligned<scalar_t>(gc.const_data_ptr()) &&
                     pack8_aligned<scalar_t>(dx.data_ptr()) && (!grad_residual || pack8_aligned<scalar_t>(dr.data_ptr()));
    elemt_kernel<scalar_t><<<blocks_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), ptr_or_null<uint8_t>(mk),
        mc.const_data_ptr<float>(), ic.const_data_ptr<float>(), ptr_or_null<float>(wc), ptr_or_null<float>(s1),
        ptr_or_null<float>(s2), s1.defined() ? 1.f / float(count) : 0.f, dx.mutable_data_ptr<scalar_t>(),
        grad_residual ? dr.mutable_data_ptr<scalar_t>() : nullptr, n, channel_of(xc), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CUDA, m) {
  m.impl("bn_act_stats", &stats_cuda);
  m.impl("bn_act_apply", &apply_cuda);
  m.impl("bn_act_train", &train_cuda);
  m.impl("bn_act_backward_reduce", &backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &backward_elemt_cuda);
}

}  // namespace skipfast
