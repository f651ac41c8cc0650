// bn_act on CUDA: per-channel sums, fused normalize + residual + ReLU with a bit-packed
// mask, and the two backward passes. Math shared with the CPU kernels in csrc/bn_act.h.
//
// Both reductions accumulate two sums per channel, with adds and multiplies only:
//   statistics: sum(v) and sum(v^2), v = x - pivot, the pivot being the mean of the
//               channel's first (up to) 16 values in memory, as the CPU and Triton kernels
//               (shifted data: a mean of 1e4 with std 1e-2 keeps its variance; the first
//               value alone may lie far out, and E[v^2] - E[v]^2 then loses digits);
//               welford_from_shifted turns the sums into mean and variance;
//   backward:   sum(g) and sum(g * (x - mean)), g = dy where the ReLU passed, else 0.
// Where a channel's data is split over several blocks, the reduction kernel writes one pair
// per (split, channel) to a workspace and a finalize kernel, one warp per channel, adds the
// splits in a fixed order (results are deterministic); where one block reads a whole channel
// (NCHW at 14x14 and 7x7), that block finishes the channel itself (one launch fewer).
// A reduction thread issues the loads of kLoads units before it adds any of them, so that
// many are in flight: a loop that adds each load before its next exit test waits for every
// load in turn (H100, [32, 64, 56, 56] float32 with x evicted from L2: statistics 17.7 ->
// 14.9 us).
//   NCHW: one block per (channel, split of the N planes). The split's planes are walked as
//         one range (no idle threads on 7x7 planes), in 4-element vectors where the plane
//         length allows it.
//   channels_last: a thread owns V = 4 consecutive channels (one vector load per row;
//         V = 1 when C % 4 != 0) and walks rows; the rows of a block are added in shared
//         memory.
// Elementwise kernels (forward apply, backward input gradient): 16 bytes of each input per
// slot, coalesced across the warp (see Slots); the forward apply gives each thread two
// slots per step, their loads issued together (the input gradient measured no faster with
// two: H100, 56x56 to 7x7, -0.4 to +0.4 us); one division finds the channel of
// a thread's first element, the others follow by stepping. After a reduction they walk the
// tensor from its end, so the part of x (and dy) the reduction read last, the part still in
// L2, is read first (H200, [32, 64, 56, 56] float32: forward + backward 85.8 -> 81.5 us).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "bn_act.h"
#include "common.h"
#include "cuda/cuda_utils.cuh"

namespace skipfast {
namespace {

using namespace bn_act;

// float64 is rejected at the entry points (check_not_double), so it is not instantiated.
#define DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                 \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kVec = 4;                 // reductions: elements per vector load
constexpr int64_t kBlockElems = 16384;  // NCHW reductions: fewest elements a partial block reads
constexpr int64_t kSplitBlocks = 2048;  // NCHW reductions: most blocks in a partial grid
constexpr int64_t kRowsPerThread = 8;   // channels_last reductions: fewest rows a thread reads
constexpr int64_t kMaxSplits = 256;     // channels_last reductions: most splits (finalize reads them all)
constexpr int kLoads = 8;               // reductions: units a thread loads before it adds them
constexpr int kApplySlots = 2;          // forward apply: 16-byte slots per thread and step

__device__ inline void add2(float2& a, const float2& b) {
  a.x += b.x;
  a.y += b.y;
}

// V consecutive elements of x (and dy and their mask bits) as loaded.
template <typename scalar_t, int V>
struct Raw {
  Pack<scalar_t, V> x, g;
  unsigned bits;
};

constexpr int kPivotValues = 16;

// The statistics' shift of channel c: the mean of its first (up to) kPivotValues values in
// memory (NCHW: the start of its first plane; channels_last: its values in the first rows),
// added in a fixed order, so every block of a channel and its finalize get the same bits.
template <typename scalar_t>
struct Pivot {
  const scalar_t* x;
  int64_t chan_stride, step;  // value k of channel c: x[c * chan_stride + k * step]
  int count;                  // min(kPivotValues, plane length or rows)

  Pivot() : x(nullptr), chan_stride(0), step(0), count(1) {}  // the backward sums have none
  Pivot(const at::Tensor& xc, bool cl)
      : x(xc.const_data_ptr<scalar_t>()),
        chan_stride(cl ? 1 : xc.size(2) * xc.size(3)),
        step(cl ? xc.size(1) : 1),
        count(static_cast<int>(std::min<int64_t>(kPivotValues, cl ? xc.numel() / xc.size(1) : chan_stride))) {}

  __device__ float operator()(int64_t c) const {
    const scalar_t* p = x + c * chan_stride;
    float v[kPivotValues];
#pragma unroll
    for (int k = 0; k < kPivotValues; ++k) v[k] = k < count ? static_cast<float>(p[k * step]) : 0.f;  // loads in flight
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kPivotValues; ++k) s += v[k];
    return __fdiv_rn(s, static_cast<float>(count));
  }
};

// What elements add to their channel's two sums: kGrad false for the statistics, true for
// the backward sums.
template <typename scalar_t, bool kGrad>
struct Sums {
  const scalar_t* x;
  const scalar_t* dy;     // backward
  const uint8_t* mask;    // backward; null: no ReLU
  const float* mean;      // backward
  Pivot<scalar_t> pivot;  // statistics

  __device__ float center(int64_t c) const { return kGrad ? mean[c] : pivot(c); }

  // Elements i .. i + V - 1 as stored (i a multiple of V, the pointers aligned to V elements).
  template <int V>
  __device__ Raw<scalar_t, V> load(int64_t i) const {
    Raw<scalar_t, V> r;
    r.x = *reinterpret_cast<const Pack<scalar_t, V>*>(x + i);
    if (kGrad) {
      r.g = *reinterpret_cast<const Pack<scalar_t, V>*>(dy + i);
      r.bits = mask ? unsigned(mask[i >> 3]) >> (i & 7) : 0xffu;
    }
    return r;
  }

  // Adds element v of r to the sums s.
  template <int V>
  __device__ static void add(float2& s, const Raw<scalar_t, V>& r, int v, float center) {
    const float xv = static_cast<float>(r.x.v[v]);
    if (kGrad) {
      const float g = ((r.bits >> v) & 1u) ? static_cast<float>(r.g.v[v]) : 0.f;
      s.x += g;
      s.y += g * (xv - center);
    } else {
      const float d = xv - center;
      s.x += d;
      s.y += d * d;
    }
  }
};

__device__ inline float2 warp_sum(float2 a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    a.x += __shfl_down_sync(0xffffffffu, a.x, off);
    a.y += __shfl_down_sync(0xffffffffu, a.y, off);
  }
  return a;
}

// Sum over a 1-D block of kThreads; thread 0 gets the result.
__device__ inline float2 block_sum(float2 a) {
  __shared__ float2 shared[kThreads / kWarp];
  a = warp_sum(a);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = a;
  __syncthreads();
  if (warp == 0) a = warp_sum(lane < int(blockDim.x / kWarp) ? shared[lane] : make_float2(0.f, 0.f));
  return a;
}

// What a reduction does with a channel's total (its sums over all splits).
template <typename scalar_t>
struct FinishStats {
  Pivot<scalar_t> pivot;
  float count, eps;
  float *mean, *var, *invstd;  // invstd null: not wanted

  __device__ void operator()(int64_t c, float2 t) const {
    const Welford<float> w = welford_from_shifted<float>(count, pivot(c), t.x, t.y);
    const float v = biased_var(w);
    mean[c] = w.mean;
    var[c] = v;
    if (invstd) invstd[c] = invstd_of<float>(v, eps);
  }
};

struct FinishGrad {
  const float* invstd;
  float *sum_dy, *sum_dy_xhat;

  __device__ void operator()(int64_t c, float2 t) const {
    sum_dy[c] = t.x;
    sum_dy_xhat[c] = t.y * invstd[c];
  }
};

// NCHW partial: grid (C, S), block kThreads. Split s reads planes n = s, s + S, ..., as one
// range of units (V elements each): unit t is plane m = t / U, offset j = t % U, with m and
// j stepped without dividing. K units per step; those past the end load a unit of the step
// again (in bounds, branch-free) and are not added. Without a workspace (S = 1) the block
// finishes channel c.
template <typename scalar_t, bool kGrad, int V, int K, typename Finish>
__global__ void partial_nchw_kernel(Sums<scalar_t, kGrad> src, Finish finish, float2* partial, int64_t N, int64_t C,
                                    int64_t HW) {
  const int64_t c = blockIdx.x, s = blockIdx.y, S = gridDim.y;
  const int64_t U = HW / V, planes = (N - s + S - 1) / S;
  const float center = src.center(c);
  float2 acc = make_float2(0.f, 0.f);
  int64_t m = threadIdx.x / U, j = threadIdx.x % U;
  const int64_t dm = blockDim.x / U, dj = blockDim.x % U;
  while (m < planes) {
    int64_t idx[K];
    int valid = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const bool ok = m < planes;
      idx[k] = ok ? ((s + m * S) * C + c) * HW + j * V : idx[0];
      valid += ok;
      m += dm;
      j += dj;
      if (j >= U) {
        j -= U;
        ++m;
      }
    }
    Raw<scalar_t, V> raw[K];
#pragma unroll
    for (int k = 0; k < K; ++k) raw[k] = src.template load<V>(idx[k]);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < valid) {
#pragma unroll
        for (int v = 0; v < V; ++v) src.add(acc, raw[k], v, center);
      }
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (partial == nullptr) {
      finish(c, acc);
    } else {
      partial[s * C + c] = acc;
    }
  }
}

// channels_last partial: grid (tiles, S), block (TX, TY) with TX * TY = kThreads, TY a
// power of two. Thread x of tile b owns channels (b * TX + x) * V .. + V - 1 and reads rows
// K at a time (rows past the end load the step's first row again and are not added); the
// rows of a block are added in shared memory. Without a workspace (S = 1) the block
// finishes its channels.
template <typename scalar_t, bool kGrad, int V, int K, typename Finish>
__global__ void partial_cl_kernel(Sums<scalar_t, kGrad> src, Finish finish, float2* partial, int64_t rows,
                                  int64_t C) {
  __shared__ float2 shared[kThreads * V];
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (int64_t(blockIdx.x) * TX + threadIdx.x) * V;
  const bool active = c0 < C;
  float2 acc[V];
  float center[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    acc[v] = make_float2(0.f, 0.f);
    center[v] = active ? src.center(c0 + v) : 0.f;
  }
  if (active) {
    const int64_t step = int64_t(gridDim.y) * TY;
    for (int64_t r = int64_t(blockIdx.y) * TY + threadIdx.y; r < rows; r += K * step) {
      Raw<scalar_t, V> raw[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t rk = r + k * step;
        raw[k] = src.template load<V>((rk < rows ? rk : r) * C + c0);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (r + k * step < rows) {
#pragma unroll
          for (int v = 0; v < V; ++v) src.add(acc[v], raw[k], v, center[v]);
        }
      }
    }
  }
  float2* mine = shared + (threadIdx.y * TX + threadIdx.x) * V;
#pragma unroll
  for (int v = 0; v < V; ++v) mine[v] = acc[v];
  __syncthreads();
  for (int h = TY / 2; h > 0; h /= 2) {
    if (int(threadIdx.y) < h) {
#pragma unroll
      for (int v = 0; v < V; ++v) add2(mine[v], mine[h * TX * V + v]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (partial == nullptr) {
        finish(c0 + v, mine[v]);
      } else {
        partial[blockIdx.y * C + c0 + v] = mine[v];
      }
    }
  }
}

// Adds channel c's S partials (one warp per channel, fixed order); lane 0 gets the total.
__device__ inline float2 split_total(const float2* partial, int S, int64_t C, int64_t c, int lane) {
  float2 a = make_float2(0.f, 0.f);
#pragma unroll 4
  for (int s = lane; s < S; s += kWarp) add2(a, partial[s * C + c]);
  return warp_sum(a);
}

// One warp per channel: finish(c, the sum of c's S partials).
template <typename Finish>
__global__ void finalize_kernel(const float2* partial, int S, int64_t C, Finish finish) {
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (c >= C) return;  // whole warps
  const int lane = threadIdx.x % kWarp;
  const float2 t = split_total(partial, S, C, c, lane);
  if (lane == 0) finish(c, t);
}

int pow2_floor(int64_t v) {
  int p = 1;
  while (int64_t(p) * 2 <= v) p *= 2;
  return p;
}

// Runs the reduction kernel for x's layout, then (when a channel is split over several
// blocks) the finalize kernel; finish(c, total) is called once per channel.
template <typename scalar_t, bool kGrad, typename Finish>
void reduce_channels(const at::Tensor& xc, Sums<scalar_t, kGrad> src, Finish finish) {
  const int64_t N = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  const bool cl = layout_of(xc) == at::MemoryFormat::ChannelsLast;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto vec_aligned = [&](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack<scalar_t, kVec>) == 0;
  };
  const bool aligned = vec_aligned(src.x) && vec_aligned(src.dy);
  int64_t S;
  dim3 grid, block;
  bool vec;
  if (cl) {
    vec = aligned && C % kVec == 0;
    const int64_t groups = vec ? C / kVec : C;
    const int TX = pow2_floor(std::min<int64_t>(kWarp, groups)), TY = kThreads / TX;
    S = std::clamp<int64_t>((N * HW + TY * kRowsPerThread - 1) / (TY * kRowsPerThread), 1, kMaxSplits);
    grid = dim3((groups + TX - 1) / TX, S);
    block = dim3(TX, TY);
  } else {
    vec = aligned && HW % kVec == 0;
    S = std::clamp<int64_t>(std::min({N, (N * HW + kBlockElems - 1) / kBlockElems, kSplitBlocks / C}), 1, 65535);
    grid = dim3(C, S);
    block = dim3(kThreads);
  }
  // One block per channel (S = 1): no workspace, the block finishes its channels.
  at::Tensor ws;
  if (S > 1) ws = at::empty({S * C * 2}, xc.options().dtype(at::kFloat));
  float2* p = S > 1 ? reinterpret_cast<float2*>(ws.mutable_data_ptr<float>()) : nullptr;
  if (cl && vec) {
    partial_cl_kernel<scalar_t, kGrad, kVec, kLoads><<<grid, block, 0, stream>>>(src, finish, p, N * HW, C);
  } else if (cl) {
    partial_cl_kernel<scalar_t, kGrad, 1, kLoads><<<grid, block, 0, stream>>>(src, finish, p, N * HW, C);
  } else if (vec) {
    partial_nchw_kernel<scalar_t, kGrad, kVec, kLoads><<<grid, block, 0, stream>>>(src, finish, p, N, C, HW);
  } else {
    partial_nchw_kernel<scalar_t, kGrad, 1, kLoads><<<grid, block, 0, stream>>>(src, finish, p, N, C, HW);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    finalize_kernel<<<blocks_for(C, kThreads / kWarp, /*max_blocks=*/INT32_MAX), kThreads, 0, stream>>>(
        p, static_cast<int>(S), C, finish);  // one warp per channel, no loop
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- elementwise ----

struct Layout {
  int64_t C, HW;
  bool cl;
};

// The channel of flat element i (and, NCHW, its offset in the plane); step() moves to i + 1.
struct ChannelWalk {
  int64_t c, j = 0;
  __device__ ChannelWalk(const Layout& L, int64_t i) {
    if (i <= UINT32_MAX && L.HW <= UINT32_MAX && L.C <= UINT32_MAX) {  // 32-bit division where it fits
      const uint32_t i32 = uint32_t(i);
      if (L.cl) {
        c = i32 % uint32_t(L.C);
      } else {
        const uint32_t p = i32 / uint32_t(L.HW);
        j = i32 - p * uint32_t(L.HW);
        c = p % uint32_t(L.C);
      }
    } else if (L.cl) {
      c = i % L.C;
    } else {
      const int64_t p = i / L.HW;
      j = i - p * L.HW;
      c = p % L.C;
    }
  }
  __device__ void step(const Layout& L) {
    if (!L.cl && ++j < L.HW) return;
    j = 0;
    if (++c == L.C) c = 0;
  }
};

// Elementwise kernels: a thread takes E = 16 / sizeof(scalar_t) consecutive elements (one
// 16-byte load of each input) per step and a warp 32 consecutive runs of E, so each load
// instruction of a warp reads 512 contiguous bytes. One mask byte covers 8 elements: for
// float (E = 4) lanes 2k and 2k + 1 share a byte and lane 2k stores it with its
// neighbour's bits. The slots of a launch are walked by mask byte, from the last byte when
// `reverse` (the elementwise pass after a reduction reads first what it read last).
template <typename scalar_t>
struct Slots {
  static constexpr int E = vec16<scalar_t>();
  static constexpr int R = 8 / E;  // slots per mask byte
  static_assert(R == 1 || R == 2, "a slot is 4 or 8 elements");
  using P = Pack<scalar_t, E>;
  int64_t n, bytes;
  bool reverse;
  __device__ Slots(int64_t n_, bool reverse_) : n(n_), bytes((n_ + 7) / 8), reverse(reverse_) {}
  // Slot t: its mask byte g, its place r in that byte, its first element i0 and count.
  __device__ void locate(int64_t t, int64_t& g, int& r, int64_t& i0, int& cnt) const {
    const int64_t tg = t / R;
    r = int(t % R);
    g = reverse ? bytes - 1 - tg : tg;
    i0 = (g * R + r) * E;
    cnt = (tg >= bytes || i0 >= n) ? 0 : (n - i0 < E ? int(n - i0) : E);
  }
};

// A warp's step covers 32 * U consecutive slots: lane l takes slots l, l + 32, ..., so each
// load instruction of the warp still reads 512 contiguous bytes, and a thread has the loads
// of its U slots in flight before it computes.
template <int U>
struct WarpSteps {
  int64_t first, step;
  int lane;
  __device__ WarpSteps() {
    lane = threadIdx.x % kWarp;
    first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x - lane) * U;
    step = int64_t(gridDim.x) * blockDim.x * U;
  }
  __device__ int64_t slot(int64_t base, int u) const { return base + u * kWarp + lane; }
};

template <typename scalar_t, int U>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, scalar_t* __restrict__ out,
                             uint8_t* __restrict__ mask, const float* __restrict__ mean,
                             const float* __restrict__ invstd, const float* __restrict__ weight,
                             const float* __restrict__ bias, int64_t n, Layout L, bool vectorized, bool reverse) {
  using S = Slots<scalar_t>;
  using P = typename S::P;
  constexpr int E = S::E;
  const S slots(n, reverse);
  const int64_t total = slots.bytes * S::R;
  const WarpSteps<U> ws;
  // warp-uniform loop: every lane takes part in the mask shuffle
  for (int64_t base = ws.first; base < total; base += ws.step) {
    int64_t g[U], i0[U];
    int sub[U], cnt[U];
    P xv[U], rv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      slots.locate(ws.slot(base, u), g[u], sub[u], i0[u], cnt[u]);
      if (vectorized && cnt[u] == E) {
        xv[u] = *reinterpret_cast<const P*>(x + i0[u]);
        if (r) rv[u] = *reinterpret_cast<const P*>(r + i0[u]);
      } else {
#pragma unroll
        for (int k = 0; k < E; ++k) {  // constant indices keep the packs in registers
          if (k < cnt[u]) {
            xv[u].v[k] = x[i0[u] + k];
            if (r) rv[u].v[k] = r[i0[u] + k];
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      unsigned bits = 0;
      if (cnt[u] > 0) {
        P ov;
        ChannelWalk w(L, i0[u]);
        int64_t cc = -1;
        float m = 0.f, sc = 0.f, b = 0.f;
#pragma unroll
        for (int k = 0; k < E; ++k) {
          if (k < cnt[u]) {
            if (w.c != cc) {
              cc = w.c;
              m = mean[cc];
              sc = scale_of<float>(weight, cc, invstd[cc]);
              b = bias_of<float>(bias, cc);
            }
            float y = normalize<float>(static_cast<float>(xv[u].v[k]), m, sc, b);
            if (r) y += static_cast<float>(rv[u].v[k]);
            if (mask) {
              bits |= unsigned(passes(y)) << k;
              y = relu(y);
            }
            ov.v[k] = static_cast<scalar_t>(y);
            w.step(L);
          }
        }
        if (vectorized && cnt[u] == E) {
          *reinterpret_cast<P*>(out + i0[u]) = ov;
        } else {
#pragma unroll
          for (int k = 0; k < E; ++k) {
            if (k < cnt[u]) out[i0[u] + k] = ov.v[k];
          }
        }
      }
      if (mask) {
        if constexpr (S::R == 2) bits |= __shfl_down_sync(0xffffffffu, bits, 1) << E;
        if (sub[u] == 0 && cnt[u] > 0) mask[g[u]] = uint8_t(bits);
      }
    }
  }
}

template <typename scalar_t>
__global__ void elemt_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                             const uint8_t* __restrict__ mask, const float* __restrict__ mean,
                             const float* __restrict__ invstd, const float* __restrict__ weight,
                             const float* __restrict__ sum_dy, const float* __restrict__ sum_dy_xhat, float inv_count,
                             scalar_t* __restrict__ dx, scalar_t* __restrict__ dr, int64_t n, Layout L,
                             bool vectorized, bool reverse) {
  using S = Slots<scalar_t>;
  using P = typename S::P;
  constexpr int E = S::E;
  const S slots(n, reverse);
  const int64_t total = slots.bytes * S::R;
  const bool has_sums = sum_dy != nullptr;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    int64_t g, i0;
    int sub, cnt;
    slots.locate(t, g, sub, i0, cnt);
    if (cnt == 0) continue;
    const bool full = vectorized && cnt == E;
    P gv, xv, dxv, drv;
    if (full) {
      gv = *reinterpret_cast<const P*>(dy + i0);
      xv = *reinterpret_cast<const P*>(x + i0);
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        if (k < cnt) {
          gv.v[k] = dy[i0 + k];
          xv.v[k] = x[i0 + k];
        }
      }
    }
    const unsigned bits = mask ? unsigned(mask[g]) >> (sub * E) : 0xffu;
    ChannelWalk w(L, i0);
    int64_t cc = -1;
    float m = 0.f;
    BackwardCoefs<float> co{};
#pragma unroll
    for (int k = 0; k < E; ++k) {
      if (k < cnt) {
        if (w.c != cc) {
          cc = w.c;
          m = mean[cc];
          co = backward_coefs<float>(weight, cc, invstd[cc], has_sums, has_sums ? sum_dy[cc] : 0.f,
                                     has_sums ? sum_dy_xhat[cc] : 0.f, inv_count);
        }
        const float gk = ((bits >> k) & 1u) ? static_cast<float>(gv.v[k]) : 0.f;
        dxv.v[k] = static_cast<scalar_t>(grad_input<float>(gk, static_cast<float>(xv.v[k]), m, co));
        drv.v[k] = static_cast<scalar_t>(gk);
        w.step(L);
      }
    }
    if (full) {
      *reinterpret_cast<P*>(dx + i0) = dxv;
      if (dr) *reinterpret_cast<P*>(dr + i0) = drv;
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        if (k < cnt) {
          dx[i0 + k] = dxv.v[k];
          if (dr) dr[i0 + k] = drv.v[k];
        }
      }
    }
  }
}

// ---- host entry points ----

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return opt(t) ? opt(t)->contiguous() : at::Tensor();
}

Layout layout(const at::Tensor& xc) {
  return Layout{xc.size(1), xc.size(2) * xc.size(3), layout_of(xc) == at::MemoryFormat::ChannelsLast};
}

// Elementwise launches: one thread per `slots` 16-byte slots of each input (grid-stride
// beyond the cap).
template <typename scalar_t>
int elementwise_blocks(int64_t n, int slots = 1) {
  constexpr int E = vec16<scalar_t>();
  return blocks_for(((n + 7) / 8 * (8 / E) + slots - 1) / slots, kThreads);
}

void check_not_double(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": float64 is not supported by the CUDA kernels; use "
              "SKIPFAST_BACKEND=reference or float32/float16/bfloat16");
}

void stats_into(const at::Tensor& xc, double eps, at::Tensor& mean, at::Tensor& var, at::Tensor* invstd) {
  const bool cl = layout_of(xc) == at::MemoryFormat::ChannelsLast;
  const int64_t C = xc.size(1);
  DISPATCH_CUDA_FLOATS(xc.scalar_type(), "bn_act_stats_cuda", [&] {
    const Pivot<scalar_t> pivot(xc, cl);
    Sums<scalar_t, false> src{xc.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, pivot};
    FinishStats<scalar_t> finish{pivot,
                                 static_cast<float>(xc.numel() / C),
                                 static_cast<float>(eps),
                                 mean.mutable_data_ptr<float>(),
                                 var.mutable_data_ptr<float>(),
                                 invstd ? invstd->mutable_data_ptr<float>() : nullptr};
    reduce_channels<scalar_t, false>(xc, src, finish);
  });
}

void apply_into(const at::Tensor& xc, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& w,
                const at::Tensor& b, const at::Tensor& rc, at::Tensor& out, at::Tensor& mask, bool reverse) {
  const int64_t n = xc.numel();
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  DISPATCH_CUDA_FLOATS(xc.scalar_type(), "bn_act_apply_cuda", [&] {
    const bool vec = aligned16(xc.const_data_ptr()) && aligned16(out.data_ptr()) &&
                     (!rc.defined() || aligned16(rc.const_data_ptr()));
    apply_kernel<scalar_t, kApplySlots><<<elementwise_blocks<scalar_t>(n, kApplySlots), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), mask.numel() ? mask.mutable_data_ptr<uint8_t>() : nullptr,
        mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), ptr_or_null<float>(w), ptr_or_null<float>(b),
        n, layout(xc), vec, reverse);
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
  auto [out, mask] = new_out_and_mask(xc, relu);
  auto rc = opt(residual) ? opt(residual)->contiguous(fmt) : at::Tensor();
  apply_into(xc, mean.contiguous(), invstd.contiguous(), contiguous_or_undefined(weight),
             contiguous_or_undefined(bias), rc, out, mask, /*reverse=*/false);
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
  auto [out, mask] = new_out_and_mask(xc, relu);
  if (x.numel() == 0) return {out, mean, var, invstd, mask};
  stats_into(xc, eps, mean, var, &invstd);
  auto rc = opt(residual) ? opt(residual)->contiguous(fmt) : at::Tensor();
  apply_into(xc, mean, invstd, contiguous_or_undefined(weight), contiguous_or_undefined(bias), rc, out, mask,
             /*reverse=*/true);
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
  if (x.numel() == 0) return {at::zeros({C}, opts), at::zeros({C}, opts)};
  auto sum_dy = at::empty({C}, opts), sum_dy_xhat = at::empty({C}, opts);
  auto mc = mean.contiguous(), ic = invstd.contiguous();
  auto mk = contiguous_or_undefined(mask);
  DISPATCH_CUDA_FLOATS(x.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    Sums<scalar_t, true> src{xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), ptr_or_null<uint8_t>(mk),
                             mc.const_data_ptr<float>(), Pivot<scalar_t>()};
    reduce_channels<scalar_t, true>(
        xc, src, FinishGrad{ic.const_data_ptr<float>(), sum_dy.mutable_data_ptr<float>(),
                            sum_dy_xhat.mutable_data_ptr<float>()});
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
  DISPATCH_CUDA_FLOATS(x.scalar_type(), "bn_act_backward_elemt_cuda", [&] {
    const bool vec = aligned16(xc.const_data_ptr()) && aligned16(gc.const_data_ptr()) &&
                     aligned16(dx.data_ptr()) && (!grad_residual || aligned16(dr.data_ptr()));
    elemt_kernel<scalar_t><<<elementwise_blocks<scalar_t>(n), kThreads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), ptr_or_null<uint8_t>(mk),
        mc.const_data_ptr<float>(), ic.const_data_ptr<float>(), ptr_or_null<float>(wc), ptr_or_null<float>(s1),
        ptr_or_null<float>(s2), s1.defined() ? 1.f / float(count) : 0.f, dx.mutable_data_ptr<scalar_t>(),
        grad_residual ? dr.mutable_data_ptr<scalar_t>() : nullptr, n, layout(xc), vec,
        /*reverse=*/s1.defined());  // training: the backward sums were read just before
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
