// bn_act on CPU: batch-norm statistics, fused normalize + residual + ReLU (with a
// bit-packed ReLU mask), and the two backward passes. Math in csrc/bn_act.h.
//
// The kernels see x in its dense layout as `nseg` segments of `len` contiguous
// elements: NCHW planes (segment s is channel s % C) or channels_last rows (lane j of a
// row is channel j). A group of 8 elements is one 8-lane vector and one mask byte. The
// elementwise passes walk NCHW in flat groups (a group may cross planes, its per-channel
// values are then blended lane by lane) and channels_last row by row (groups of a row; when
// C is not a multiple of 8 the mask bits go through a sequential bit writer). Parallel
// chunks start at multiples of 8 elements (rows: multiples of 8 rows), so every mask byte
// has exactly one writer.
// Reductions: NCHW sums each plane in memory order and then adds the planes of a channel
// (planes under kSmallPlane elements: a task keeps accumulators for a range of channels
// and walks their planes in memory order); channels_last gives each thread per-channel
// accumulators over its rows (C a multiple of 8: in tiles of a few rows by up to 32
// channels, accumulators in registers). Elementwise passes that move 32 MiB or more (8 MiB
// in a training step) use streaming stores; their optional parts (residual, mask, residual
// gradient) are template flags of the loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "bn_act.h"
#include "common.h"

namespace skipfast {
namespace {

using namespace bn_act;
using Vec = at::vec::Vectorized<float>;

constexpr int kG = 8;                   // elements per group = bits per mask byte
constexpr int64_t kGrainElems = 32768;  // elements per parallel task, at least
constexpr int64_t kFold = 4096;         // NCHW: elements summed in fp32 before folding into double
// NCHW: planes below this many elements are summed into per-channel accumulators
// (channel_sums_small_planes). Measured (2-core EPYC, same process, order alternated):
// 7x7 planes 1.04-1.29x faster that way than plane by plane, warm or cold cache; 14x14 and
// 28x28 the same either way.
constexpr int64_t kSmallPlane = 128;
constexpr int64_t kBlockElems = 8192;   // channels_last: about this many elements per fp32 partial
constexpr int64_t kTileElems = 2048;    // channels_last: elements of a tile's rows (8 KB of float)
// An elementwise pass that moves at least this many bytes (all full-size tensors it reads
// and writes) cannot keep them in a last-level cache: it writes float outputs with
// streaming stores, which skip reading the destination lines into the cache first.
constexpr int64_t kStreamBytes = int64_t(32) << 20;
// The passes of a training step (bn_act_train's normalize, bn_act_backward_elemt with the
// batch sums) stream from 8 MiB: between them a training step's other tensors push theirs
// out of the cache anyway. Measured (2-core EPYC, 32 MB L3, one process, 30 interleaved
// rounds, threshold 4 MiB, which streams the same passes at these shapes): BatchNormAct2d
// forward + backward [32, 256, 14, 14] channels_last 5.88 -> 4.71 ms, NCHW 3.95 -> 3.45,
// [32, 512, 7, 7] 2.19 -> 1.83 and 2.94 -> 2.67; ResNet-18 and ResNet-50 training steps
// within 2% with 4 MiB (8 MiB streams a subset of those passes). The apply op keeps 32 MiB:
// ResNet-50 eval was 3% slower with 4 MiB (the next convolution reads the output, which
// plain stores leave in the cache).
constexpr int64_t kStreamBytesTraining = int64_t(8) << 20;

template <typename scalar_t>
constexpr bool vectorized() {
  return Vec::size() == kG && !std::is_same_v<scalar_t, double>;
}

// ---- 8-lane helpers: n <= 8 valid lanes, loads zero-fill the others ----

// kFirstLanes[n]: the first n lanes all-ones (a maskload mask).
alignas(32) constexpr int32_t kFirstLanes[kG][kG] = {
    {0, 0, 0, 0, 0, 0, 0, 0},     {-1, 0, 0, 0, 0, 0, 0, 0},     {-1, -1, 0, 0, 0, 0, 0, 0},
    {-1, -1, -1, 0, 0, 0, 0, 0},  {-1, -1, -1, -1, 0, 0, 0, 0},  {-1, -1, -1, -1, -1, 0, 0, 0},
    {-1, -1, -1, -1, -1, -1, 0, 0}, {-1, -1, -1, -1, -1, -1, -1, 0}};

template <typename T>
inline Vec load_f(const T* p, int n = kG) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX2)
    if (n < kG) return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kFirstLanes[n])));
#endif
    return Vec::loadu(p, n);
  } else {
    Vec out;
    if (n == kG) {
      at::vec::load_to_float<T>(p, out);
    } else {
      T buf[kG] = {};
      std::copy_n(p, n, buf);
      at::vec::load_to_float<T>(buf, out);
    }
    return out;
  }
}

// stream: a non-temporal store where the group is whole and 32-byte aligned (float only);
// a pass that streams ends with end_streams().
template <typename T>
inline void store_f(T* p, const Vec& v, int n = kG, bool stream = false) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX2)
    if (stream && n == kG && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, v);
      return;
    }
#endif
    v.store(p, n);
  } else {
    auto lo = at::vec::convert_from_float<T>(v, v);
    if (n == kG) {
      lo.store(p, kG);
    } else {
      T buf[2 * kG];
      lo.store(buf);
      std::copy_n(buf, n, p);
    }
  }
}

// Orders a thread's streaming stores before whatever follows the pass.
inline void end_streams(bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#endif
}

// Whether an elementwise pass over `tensors` full-size tensors like t streams its stores.
inline bool streams(const at::Tensor& t, int tensors, bool training) {
  return t.scalar_type() == at::kFloat &&
         t.numel() * int64_t(sizeof(float)) * tensors >= (training ? kStreamBytesTraining : kStreamBytes);
}

inline uint32_t low_bits(int n) { return (1u << n) - 1u; }

// The mask byte of element i >= 0 (a shift: i / kG on a signed index costs a sign fixup).
inline int64_t byte_of(int64_t i) { return int64_t(uint64_t(i) / kG); }

// 8 mask bits of y: bit k set when !(y[k] <= 0).
inline uint32_t pass_bits(const Vec& y) {
#if defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_NLE_UQ)));
#else
  float tmp[kG];
  y.store(tmp);
  uint32_t b = 0;
  for (int k = 0; k < kG; ++k) b |= uint32_t(passes(tmp[k])) << k;
  return b;
#endif
}

// A mask byte expanded to 8 lanes of all-ones / all-zeros.
struct MaskLut {
  alignas(32) uint32_t v[256][kG];
  MaskLut() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < kG; ++k) v[b][k] = ((b >> k) & 1) ? 0xFFFFFFFFu : 0u;
  }
};
const MaskLut kLut;

inline Vec masked(const Vec& dy, uint32_t bits) {
  return Vec::blendv(Vec(0.f), dy, Vec::loadu(kLut.v[bits]));
}

// n <= 8 mask bits starting at element i (any bit offset).
inline uint32_t read_bits(const uint8_t* mask, int64_t i, int n) {
  const int64_t byte = i >> 3;
  const int shift = int(i & 7);
  uint32_t v = mask[byte];
  if (shift + n > 8) v |= uint32_t(mask[byte + 1]) << 8;
  return (v >> shift) & low_bits(n);
}

// Appends bits to a mask from a byte boundary on; flush() writes a last partial byte.
struct BitWriter {
  uint8_t* p;
  uint32_t acc = 0;
  int n = 0;
  void push(uint32_t bits, int count) {
    acc |= bits << n;
    n += count;
    if (n >= 8) {
      *p++ = uint8_t(acc);
      acc >>= 8;
      n -= 8;
    }
  }
  void flush() {
    if (n > 0) *p = uint8_t(acc);
  }
};

struct Geo {
  int64_t C, len, nseg, numel;
  bool cl;
  explicit Geo(const at::Tensor& x)
      : C(x.size(1)), numel(x.numel()), cl(layout_of(x) == at::MemoryFormat::ChannelsLast) {
    len = cl ? C : x.size(2) * x.size(3);
    nseg = len > 0 ? numel / len : 0;
  }
};

// Runs fn(s0, s1) over chunks of segments that start at multiples of 8, so that every
// mask byte (bit offset s * len) lies in one chunk.
template <typename F>
void parallel_segments(const Geo& g, F fn) {
  if (g.numel == 0) return;
  const int64_t units = (g.nseg + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (8 * g.len));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) { fn(u0 * 8, std::min(u1 * 8, g.nseg)); });
}

// Runs fn(e0, e1) over chunks of [0, numel) that start at multiples of 8 elements.
template <typename F>
void parallel_groups(int64_t numel, F fn) {
  if (numel == 0) return;
  at::parallel_for(0, (numel + kG - 1) / kG, kGrainElems / kG,
                   [&](int64_t u0, int64_t u1) { fn(u0 * kG, std::min(u1 * kG, numel)); });
}

// NCHW walked in flat groups of 8 elements, so that every group is a whole vector and a
// whole mask byte: per-channel values are broadcast while a group lies in one plane and
// blended lane by lane where it crosses into the next one. Needs planes of at least 8
// elements (a group then crosses at most one boundary). The walker keeps the current
// plane's channel c and the flat index where that plane ends.
struct PlaneWalk {
  int64_t len, C, c, end;
  PlaneWalk(int64_t len_, int64_t C_, int64_t i0) : len(len_), C(C_), c((i0 / len_) % C_), end((i0 / len_ + 1) * len_) {}
  // For the group at i (visited in increasing order): false when it lies in the current
  // plane; otherwise moves to the next plane and sets `from` to the lanes that belong to it.
  bool crosses(int64_t i, Vec& from) {
    if (i + kG <= end) return false;
    from = Vec::loadu(kLut.v[(0xFFu << (end - i)) & 0xFFu]);
    c = c + 1 == C ? 0 : c + 1;
    end += len;
    return true;
  }
};

// Splits [0, n) into at most get_num_threads() contiguous chunks and runs fn(chunk, begin, end).
template <typename F>
int64_t for_chunks(int64_t n, int64_t min_per_chunk, F fn) {
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / std::max<int64_t>(min_per_chunk, 1)));
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) fn(t, n * t / chunks, n * (t + 1) / chunks);
  });
  return chunks;
}

inline double hsum(const Vec& v) {
  float tmp[kG];
  v.store(tmp);
  double s = 0;
  for (int k = 0; k < kG; ++k) s += tmp[k];
  return s;
}

// Calls body(j, n) for the groups of a segment of len elements: n is the compile-time
// constant 8 for whole groups, then once the int remainder.
template <typename B>
inline void for_groups(int64_t len, B&& body) {
  int64_t j = 0;
  for (; j + kG <= len; j += kG) body(j, std::integral_constant<int, kG>{});
  if (j < len) body(j, int(len - j));
}

// Calls f(A, B, S) with std::bool_constant values of a, b, s: the optional parts of an
// elementwise pass (residual / gradient outputs, mask, streaming stores) become template
// flags of its loop instead of tests in every group.
template <typename F>
void with_flags(bool a, bool b, bool s, F&& f) {
  auto last = [&](auto A, auto B) { s ? f(A, B, std::true_type{}) : f(A, B, std::false_type{}); };
  auto middle = [&](auto A) { b ? last(A, std::true_type{}) : last(A, std::false_type{}); };
  a ? middle(std::true_type{}) : middle(std::false_type{});
}

// Per-channel values in a buffer padded to a multiple of 8 (zeros), so that channels_last
// groups load them as whole vectors.
template <typename T>
std::vector<T> padded(int64_t C) {
  return std::vector<T>((C + kG - 1) / kG * kG, T(0));
}

// ---------------------------------------------------------------------------------
// Two per-channel sums, s1 and s2, of a per-element pair of terms around a per-channel
// center. Terms: group(i, n, center, a1, a2) adds n <= 8 elements from flat index i
// into vector accumulators (lanes >= n add 0); scalar(i, center, s1, s2) adds one.
// ---------------------------------------------------------------------------------

// Statistics: x - shift[c] and its square.
template <typename scalar_t>
struct StatsTerms {
  using acc_t = at::opmath_type<scalar_t>;
  // NCHW small planes: samples read side by side, one stream each. Measured (2-core EPYC,
  // one process, alternated): statistics of [32, 512, 7, 7], [64, 512, 7, 7] and
  // [32, 2048, 7, 7] 8-18% faster with 4 than with 1, warm or cold cache.
  static constexpr int64_t kSamples = 4;
  const scalar_t* x;
  void prefetch(int64_t i) const { __builtin_prefetch(x + i); }
  void group(int64_t i, int n, const Vec& center, Vec& a1, Vec& a2) const {
    Vec d = load_f(x + i, n) - center;
    if (n < kG) d = Vec::set(Vec(0.f), d, n);
    a1 = a1 + d;
    a2 = at::vec::fmadd(d, d, a2);
  }
  void scalar(int64_t i, acc_t center, acc_t& s1, acc_t& s2) const {
    const acc_t d = acc_t(x[i]) - center;
    s1 += d;
    s2 += d * d;
  }
};

// Backward: dy' (dy masked by the ReLU) and dy' * (x - mean[c]).
template <typename scalar_t>
struct GradTerms {
  using acc_t = at::opmath_type<scalar_t>;
  // Two or three streams a sample already: four samples side by side were no faster at
  // [32, 512, 7, 7] and [64, 512, 7, 7], and up to 1.9x slower at [32, 2048, 7, 7], whose
  // samples lie a multiple of 4 KiB apart.
  static constexpr int64_t kSamples = 1;
  const scalar_t* dy;
  const scalar_t* x;
  const uint8_t* mask;  // null: no ReLU
  void prefetch(int64_t i) const {
    __builtin_prefetch(dy + i);
    __builtin_prefetch(x + i);
  }
  void group(int64_t i, int n, const Vec& center, Vec& a1, Vec& a2) const {
    Vec g = load_f(dy + i, n);  // lanes >= n are 0
    if (mask) g = masked(g, read_bits(mask, i, n));
    a1 = a1 + g;
    a2 = at::vec::fmadd(g, load_f(x + i, n) - center, a2);
  }
  void scalar(int64_t i, acc_t center, acc_t& s1, acc_t& s2) const {
    const acc_t g = (mask == nullptr || mask_bit(mask, i)) ? acc_t(dy[i]) : acc_t(0);
    s1 += g;
    s2 += g * (acc_t(x[i]) - center);
  }
};

// NCHW with small planes (7x7, 10x10): a horizontal sum per plane would cost as much as
// the plane itself, so each task owns a range of channels with a set of vector
// accumulators per channel (folded into double every kFold elements or so) and walks its
// planes in memory order, Terms::kSamples samples side by side. (Walking one channel's N
// planes at a time, a stride of C planes, summed in the same order but read memory
// 1.6-1.7x slower from DRAM:
// [32, 512, 7, 7] statistics 0.77 -> 0.49 ms and backward sums 1.11 -> 0.65 ms with a cold
// cache, 0.24 -> 0.22 and 0.37 -> 0.29 ms warm; [64, 1024, 7, 7] 2.1-2.7x.)
template <typename scalar_t, typename Terms>
void channel_sums_small_planes(const Geo& g, const Terms& t, const at::opmath_type<scalar_t>* center,
                               double* out1, double* out2) {
  const int64_t C = g.C, len = g.len, N = g.nseg / g.C;
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElems / (N * len)), [&](int64_t c0, int64_t c1) {
    const int64_t nc = c1 - c0;
    std::vector<float> acc(size_t(4 * kG * nc), 0.f);  // per channel: a1, a2, b1, b2
    std::vector<double> d(size_t(2 * nc), 0.0);
    int64_t pending = 0;
    for (int64_t n0 = 0; n0 < N; n0 += Terms::kSamples) {
      const int64_t n1 = std::min(N, n0 + Terms::kSamples);
      for (int64_t c = c0; c < c1; ++c) {
        float* ac = acc.data() + 4 * kG * (c - c0);
        const Vec vc(center[c]);
        Vec a1 = Vec::loadu(ac), a2 = Vec::loadu(ac + kG), b1 = Vec::loadu(ac + 2 * kG), b2 = Vec::loadu(ac + 3 * kG);
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t base = (n * C + c) * len;
          int64_t j = 0;
          for (; j + kG <= len; j += kG) t.group(base + j, kG, vc, a1, a2);
          if (j < len) t.group(base + j, int(len - j), vc, b1, b2);
        }
        a1.store(ac), a2.store(ac + kG), b1.store(ac + 2 * kG), b2.store(ac + 3 * kG);
      }
      pending += (n1 - n0) * len;
      if (pending >= kFold || n1 == N) {
        for (int64_t c = c0; c < c1; ++c) {
          float* ac = acc.data() + 4 * kG * (c - c0);
          d[2 * (c - c0)] += hsum(Vec::loadu(ac) + Vec::loadu(ac + 2 * kG));
          d[2 * (c - c0) + 1] += hsum(Vec::loadu(ac + kG) + Vec::loadu(ac + 3 * kG));
          std::fill(ac, ac + 4 * kG, 0.f);
        }
        pending = 0;
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      out1[c] = d[2 * (c - c0)];
      out2[c] = d[2 * (c - c0) + 1];
    }
  });
}

// NCHW: each plane summed in memory order (fp32 vector partials of at most kFold
// elements, folded into double), then the planes of each channel added up.
template <typename scalar_t, typename Terms>
void channel_sums_nchw(const Geo& g, const Terms& t, const at::opmath_type<scalar_t>* center, double* out1,
                       double* out2) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (vectorized<scalar_t>()) {
    if (g.len < kSmallPlane) {
      channel_sums_small_planes<scalar_t>(g, t, center, out1, out2);
      return;
    }
  }
  std::vector<double> plane(2 * g.nseg);
  at::parallel_for(0, g.nseg, std::max<int64_t>(1, kGrainElems / g.len), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t base = s * g.len;
      const acc_t ctr = center[s % g.C];
      double d1 = 0, d2 = 0;
      if constexpr (vectorized<scalar_t>()) {
        const Vec vc(ctr);
        for (int64_t j0 = 0; j0 < g.len; j0 += kFold) {
          const int64_t j1 = std::min(g.len, j0 + kFold);
          Vec a1(0.f), a2(0.f), b1(0.f), b2(0.f);
          int64_t j = j0;
          for (; j + 2 * kG <= j1; j += 2 * kG) {
            t.group(base + j, kG, vc, a1, a2);
            t.group(base + j + kG, kG, vc, b1, b2);
          }
          for (; j < j1; j += kG) t.group(base + j, int(std::min<int64_t>(kG, j1 - j)), vc, a1, a2);
          d1 += hsum(a1 + b1);
          d2 += hsum(a2 + b2);
        }
      } else {
        acc_t a1 = 0, a2 = 0;
        for (int64_t j = 0; j < g.len; ++j) t.scalar(base + j, ctr, a1, a2);
        d1 = double(a1);
        d2 = double(a2);
      }
      plane[2 * s] = d1;
      plane[2 * s + 1] = d2;
    }
  });
  std::fill(out1, out1 + g.C, 0.0);
  std::fill(out2, out2 + g.C, 0.0);
  for (int64_t s = 0; s < g.nseg; ++s) {
    out1[s % g.C] += plane[2 * s];
    out2[s % g.C] += plane[2 * s + 1];
  }
}

// channels_last, C a multiple of 8: adds rows [rb, re) of the kN channel groups from
// channel j0 on into the fp32 partials acc1/acc2, their kN accumulator pairs in registers
// across the rows (rows of a tile are few enough to stay in L1 from one tile to the next).
// Meanwhile the next tile is prefetched in memory order: the column blocks of a tile
// together take one prefetch step per row, and step k fetches the next tile's k-th stretch
// of kN groups, so that memory sees one sequential stream rather than a strided walk.
// Measured (2-core EPYC, one process, variants alternated, L3 flushed before each call),
// against prefetching the same columns of the next tile's rows: channels_last statistics
// [16, 64, 56, 56] 0.59 -> 0.41 ms, [32, 128, 28, 28] 0.60 -> 0.42, [32, 256, 14, 14]
// 0.30 -> 0.24; backward sums 1.14 -> 0.83, 1.04 -> 0.88, 0.56 -> 0.45; warm cache the same
// or better. Two or three tiles ahead, or tiles of half or twice the size, were slower.
template <int kN, typename Terms>
inline void tile_rows(const Terms& t, int64_t C, int64_t rb, int64_t re, int64_t j0, const float* center,
                      float* acc1, float* acc2) {
  Vec a1[kN], a2[kN], ctr[kN];
  for (int u = 0; u < kN; ++u) {
    a1[u] = Vec::loadu(acc1 + j0 + u * kG);
    a2[u] = Vec::loadu(acc2 + j0 + u * kG);
    ctr[u] = Vec::loadu(center + j0 + u * kG);
  }
  // The blocks before j0 took j0 * (re - rb) elements of the next tile, which starts at re * C.
  const int64_t ahead = re * C + j0 * (re - rb);
  for (int64_t r = rb; r < re; ++r) {
    const int64_t i = r * C + j0;
    const int64_t next = ahead + (r - rb) * (kN * kG);
    for (int u = 0; u < kN; u += 2) t.prefetch(next + u * kG);  // a 64-byte line per 2 groups
    for (int u = 0; u < kN; ++u) t.group(i + u * kG, kG, ctr[u], a1[u], a2[u]);
  }
  for (int u = 0; u < kN; ++u) {
    a1[u].store(acc1 + j0 + u * kG);
    a2[u].store(acc2 + j0 + u * kG);
  }
}

// channels_last: each thread sums its own rows into per-channel fp32 accumulators, folded
// into per-thread double arrays after each block of rows; the threads' arrays are added at
// the end. With C a multiple of 8 a block is walked in tiles (tile_rows: 8 KB worth of
// rows and at least 4, up to 32 channels at a time, accumulators in registers); otherwise
// row by row, the accumulators loaded and stored per group.
template <typename scalar_t, typename Terms>
void channel_sums_cl(const Geo& g, const Terms& t, const at::opmath_type<scalar_t>* center, double* out1,
                     double* out2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, rows = g.nseg;
  const int64_t block = std::clamp<int64_t>(kBlockElems / C, 16, 512);
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> part(2 * C * max_chunks, 0.0);
  const int64_t chunks = for_chunks(rows, std::max<int64_t>(1, kGrainElems / C), [&](int64_t c, int64_t r0, int64_t r1) {
    double* p1 = part.data() + 2 * C * c;
    double* p2 = p1 + C;
    auto acc1 = padded<acc_t>(C), acc2 = padded<acc_t>(C);
    for (int64_t rb = r0; rb < r1; rb += block) {
      const int64_t re = std::min(r1, rb + block);
      std::fill(acc1.begin(), acc1.end(), acc_t(0));
      std::fill(acc2.begin(), acc2.end(), acc_t(0));
      if constexpr (vectorized<scalar_t>()) {
        if (C % kG == 0) {
          // At least 4 rows a tile: with C > 512 a tile of kTileElems holds 1 or 2 rows,
          // and the per-tile work (accumulators loaded and stored, the prefetch walk) is
          // paid every row or two. Measured (2-core EPYC, alternated processes, 12 rounds,
          // medians, statistics / backward sums, warm cache): [16, 2048, 7, 7] 246 / 406 ->
          // 150 / 285 us, [32, 2048, 7, 7] 473 / 875 -> 282 / 656, [32, 1024, 14, 14]
          // 925 / 2320 -> 904 / 2223; L3 flushed before each call 455 / 691 -> 412 / 624,
          // 778 / 1324 -> 722 / 1183, 1459 / 2555 -> 1383 / 2415. 8 rows was no better.
          const int64_t R = std::max<int64_t>(4, kTileElems / C);
          for (int64_t rt = rb; rt < re; rt += R) {
            const int64_t rte = std::min(re, rt + R);
            int64_t j0 = 0;
            for (; j0 + 4 * kG <= C; j0 += 4 * kG) tile_rows<4>(t, C, rt, rte, j0, center, acc1.data(), acc2.data());
            switch ((C - j0) / kG) {
              case 3: tile_rows<3>(t, C, rt, rte, j0, center, acc1.data(), acc2.data()); break;
              case 2: tile_rows<2>(t, C, rt, rte, j0, center, acc1.data(), acc2.data()); break;
              case 1: tile_rows<1>(t, C, rt, rte, j0, center, acc1.data(), acc2.data()); break;
              default: break;
            }
          }
        } else {
          for (int64_t r = rb; r < re; ++r) {
            for_groups(C, [&](int64_t j, auto n) {
              Vec a1 = Vec::loadu(acc1.data() + j), a2 = Vec::loadu(acc2.data() + j);
              t.group(r * C + j, n, Vec::loadu(center + j), a1, a2);
              a1.store(acc1.data() + j);
              a2.store(acc2.data() + j);
            });
          }
        }
      } else {
        for (int64_t r = rb; r < re; ++r)
          for (int64_t j = 0; j < C; ++j) t.scalar(r * C + j, center[j], acc1[j], acc2[j]);
      }
      for (int64_t j = 0; j < C; ++j) {
        p1[j] += double(acc1[j]);
        p2[j] += double(acc2[j]);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      t1 += part[2 * C * k + c];
      t2 += part[2 * C * k + C + c];
    }
    out1[c] = t1;
    out2[c] = t2;
  }
}

template <typename scalar_t, typename Terms>
void channel_sums(const Geo& g, const Terms& t, const at::opmath_type<scalar_t>* center, double* out1,
                  double* out2) {
  if (g.numel == 0) {
    std::fill(out1, out1 + g.C, 0.0);
    std::fill(out2, out2 + g.C, 0.0);
  } else if (g.cl) {
    channel_sums_cl<scalar_t>(g, t, center, out1, out2);
  } else {
    channel_sums_nchw<scalar_t>(g, t, center, out1, out2);
  }
}

// Per-channel Welford statistics of a dense x (layout_of(x)), from sums shifted by the mean
// of each channel's first (up to) 16 values in memory. The variance is the shifted sum of
// squares less the square of the shifted mean, which loses digits as the shift moves away
// from the mean: shifted by its first value alone, a channel whose first value lay 5
// standard deviations out got a float32 variance 190 ulps off, against eager batch norm's
// 11 at most; 4.5 with this shift. (Folding the float partials 4x as often made it 2, at a
// cost that runs in alternated processes could not tell from their +-5% noise: not done.)
template <typename scalar_t>
std::vector<Welford<double>> channel_stats(const at::Tensor& xc) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geo g(xc);
  const scalar_t* x = xc.const_data_ptr<scalar_t>();
  std::vector<Welford<double>> w(g.C);
  if (g.numel == 0) return w;
  auto shift = padded<acc_t>(g.C);
  const int64_t first = std::min<int64_t>(16, g.cl ? g.nseg : g.len);  // rows, or values of the first plane
  std::vector<double> sum(g.C, 0.0);
  for (int64_t k = 0; k < first; ++k)  // channels innermost: independent sums, no serial chain
    for (int64_t c = 0; c < g.C; ++c) sum[c] += double(x[g.cl ? k * g.C + c : c * g.len + k]);
  for (int64_t c = 0; c < g.C; ++c) shift[c] = acc_t(sum[c] / double(first));
  std::vector<double> s1(g.C), s2(g.C);
  channel_sums<scalar_t>(g, StatsTerms<scalar_t>{x}, shift.data(), s1.data(), s2.data());
  const double n = double(g.numel / g.C);
  for (int64_t c = 0; c < g.C; ++c) w[c] = welford_from_shifted<double>(n, double(shift[c]), s1[c], s2[c]);
  return w;
}

// ---------------------------------------------------------------------------------
// Elementwise passes
// ---------------------------------------------------------------------------------

// out = relu?((x - mean) * scale + bias + residual), mask bits, over segments [s0, s1), for
// what apply_rows and apply_planes leave: channels_last rows of C % 8 != 0 channels, NCHW
// planes under 8 elements, float64. Mask bits go through the bit writer. Pointers and sizes
// arrive as parameters: a mask-byte store may alias any object in memory, so values read
// through a closure would be reloaded after every store.
template <typename scalar_t, bool kCL>
void apply_segments(int64_t s0, int64_t s1, int64_t len, int64_t C, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ r, scalar_t* __restrict__ out, uint8_t* __restrict__ mask,
                    const at::opmath_type<scalar_t>* __restrict__ mean,
                    const at::opmath_type<scalar_t>* __restrict__ scale,
                    const at::opmath_type<scalar_t>* __restrict__ bias, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  BitWriter bw{mask ? mask + s0 * len / 8 : nullptr};
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = s * len;
    const int64_t c = kCL ? 0 : s % C;
    if constexpr (vectorized<scalar_t>()) {
      const Vec m0(mean[c]), sc0(scale[c]), b0(bias[c]);
      for_groups(len, [&](int64_t j, auto n) {
        Vec m = m0, sc = sc0, b = b0;
        if constexpr (kCL) {
          m = Vec::loadu(mean + j);
          sc = Vec::loadu(scale + j);
          b = Vec::loadu(bias + j);
        }
        Vec y = at::vec::fmadd(load_f(x + base + j, n) - m, sc, b);
        if (r) y = y + load_f(r + base + j, n);
        if (mask) {
          bw.push(pass_bits(y) & low_bits(n), n);
          y = at::vec::clamp_min(y, Vec(0.f));
        }
        store_f(out + base + j, y, n, stream);
      });
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = base + j, ch = kCL ? j : c;
        acc_t y = normalize<acc_t>(acc_t(x[i]), mean[ch], scale[ch], bias[ch]);
        if (r) y += acc_t(r[i]);
        if (mask) {
          bw.push(uint32_t(passes(y)), 1);
          y = relu(y);
        }
        out[i] = scalar_t(y);
      }
    }
  }
  bw.flush();
  end_streams(stream);
}

// apply for NCHW float/half/bfloat16 over the flat range [e0, e1) (e0 a multiple of 8).
template <typename scalar_t, bool kRes, bool kMask, bool kStream>
void apply_planes(int64_t e0, int64_t e1, int64_t len, int64_t C, const scalar_t* __restrict__ x,
                  const scalar_t* __restrict__ r, scalar_t* __restrict__ out, uint8_t* __restrict__ mask,
                  const float* mean, const float* scale, const float* bias) {
  PlaneWalk w(len, C, e0);
  Vec m(mean[w.c]), sc(scale[w.c]), b(bias[w.c]);
  for_groups(e1 - e0, [&](int64_t j, auto n) {
    const int64_t i = e0 + j;
    Vec gm = m, gsc = sc, gb = b, from;
    if (w.crosses(i, from)) {
      m = Vec(mean[w.c]), sc = Vec(scale[w.c]), b = Vec(bias[w.c]);
      gm = Vec::blendv(gm, m, from), gsc = Vec::blendv(gsc, sc, from), gb = Vec::blendv(gb, b, from);
    }
    Vec y = at::vec::fmadd(load_f(x + i, n) - gm, gsc, gb);
    if constexpr (kRes) y = y + load_f(r + i, n);
    if constexpr (kMask) {
      mask[byte_of(i)] = uint8_t(pass_bits(y) & low_bits(n));
      y = at::vec::clamp_min(y, Vec(0.f));
    }
    store_f(out + i, y, n, kStream);
  });
  end_streams(kStream);
}

// apply for channels_last rows [s0, s1) of C channels, C a multiple of 8: whole groups,
// whole mask bytes.
template <typename scalar_t, bool kRes, bool kMask, bool kStream>
void apply_rows(int64_t s0, int64_t s1, int64_t C, const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                scalar_t* __restrict__ out, uint8_t* __restrict__ mask, const float* __restrict__ mean,
                const float* __restrict__ scale, const float* __restrict__ bias) {
  for (int64_t base = s0 * C; base < s1 * C; base += C) {
    for (int64_t j = 0; j < C; j += kG) {
      const int64_t i = base + j;
      Vec y = at::vec::fmadd(load_f(x + i) - Vec::loadu(mean + j), Vec::loadu(scale + j), Vec::loadu(bias + j));
      if constexpr (kRes) y = y + load_f(r + i);
      if constexpr (kMask) {
        mask[byte_of(i)] = uint8_t(pass_bits(y));
        y = at::vec::clamp_min(y, Vec(0.f));
      }
      store_f(out + i, y, kG, kStream);
    }
  }
  end_streams(kStream);
}

// Runs pass(A, B, S, i0, i1) over parallel chunks of x when the flagged loops serve it:
// channels_last rows of a multiple of 8 channels ([i0, i1) rows) or NCHW planes of at least
// 8 elements ([i0, i1) flat elements), float/half/bfloat16. A, B, S: with_flags's
// constants for a, b, s. False (nothing run) otherwise: the *_segments loops take it.
template <typename scalar_t, bool kCL, typename Pass>
bool flagged_pass(const Geo& g, bool a, bool b, bool s, Pass&& pass) {
  if constexpr (vectorized<scalar_t>()) {
    if (kCL ? g.C % kG == 0 : g.len >= kG) {
      with_flags(a, b, s, [&](auto A, auto B, auto S) {
        auto chunk = [&](int64_t i0, int64_t i1) { pass(A, B, S, i0, i1); };
        if constexpr (kCL) {
          parallel_segments(g, chunk);
        } else {
          parallel_groups(g.numel, chunk);
        }
      });
      return true;
    }
  }
  return false;
}

template <typename scalar_t, bool kCL>
void apply_kernel(const Geo& g, const scalar_t* x, const scalar_t* r, scalar_t* out, uint8_t* mask,
                  const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* scale,
                  const at::opmath_type<scalar_t>* bias, bool stream) {
  const bool done = flagged_pass<scalar_t, kCL>(g, r != nullptr, mask != nullptr, stream,
                                                [&](auto kRes, auto kMask, auto kStream, int64_t i0, int64_t i1) {
    constexpr bool res = decltype(kRes)::value, msk = decltype(kMask)::value, st = decltype(kStream)::value;
    if constexpr (kCL) {
      apply_rows<scalar_t, res, msk, st>(i0, i1, g.C, x, r, out, mask, mean, scale, bias);
    } else {
      apply_planes<scalar_t, res, msk, st>(i0, i1, g.len, g.C, x, r, out, mask, mean, scale, bias);
    }
  });
  if (done) return;
  parallel_segments(g, [&](int64_t s0, int64_t s1) {
    apply_segments<scalar_t, kCL>(s0, s1, g.len, g.C, x, r, out, mask, mean, scale, bias, stream);
  });
}

// dx = dy' * k + (x - mean) * a + b0; grad_residual = dy'.
template <typename scalar_t, bool kDr, bool kMask, bool kStream>
void grad_planes(int64_t e0, int64_t e1, int64_t len, int64_t C, const scalar_t* __restrict__ dy,
                 const scalar_t* __restrict__ x, const uint8_t* __restrict__ mask, scalar_t* __restrict__ dx,
                 scalar_t* __restrict__ dr, const float* mean, const float* k, const float* a, const float* b0) {
  PlaneWalk w(len, C, e0);
  Vec m(mean[w.c]), vk(k[w.c]), va(a[w.c]), vb(b0[w.c]);
  for_groups(e1 - e0, [&](int64_t j, auto n) {
    const int64_t i = e0 + j;
    Vec gm = m, gk = vk, ga = va, gb = vb, from;
    if (w.crosses(i, from)) {
      m = Vec(mean[w.c]), vk = Vec(k[w.c]), va = Vec(a[w.c]), vb = Vec(b0[w.c]);
      gm = Vec::blendv(gm, m, from), gk = Vec::blendv(gk, vk, from);
      ga = Vec::blendv(ga, va, from), gb = Vec::blendv(gb, vb, from);
    }
    Vec gv = load_f(dy + i, n);
    if constexpr (kMask) gv = masked(gv, mask[byte_of(i)] & low_bits(n));
    store_f(dx + i, at::vec::fmadd(load_f(x + i, n) - gm, ga, at::vec::fmadd(gv, gk, gb)), n, kStream);
    if constexpr (kDr) store_f(dr + i, gv, n, kStream);
  });
  end_streams(kStream);
}

// grad for channels_last rows [s0, s1) of C channels, C a multiple of 8.
template <typename scalar_t, bool kDr, bool kMask, bool kStream>
void grad_rows(int64_t s0, int64_t s1, int64_t C, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
               const uint8_t* __restrict__ mask, scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
               const float* __restrict__ mean, const float* __restrict__ k, const float* __restrict__ a,
               const float* __restrict__ b0) {
  for (int64_t base = s0 * C; base < s1 * C; base += C) {
    for (int64_t j = 0; j < C; j += kG) {
      const int64_t i = base + j;
      Vec gv = load_f(dy + i);
      if constexpr (kMask) gv = masked(gv, mask[byte_of(i)]);
      const Vec t = at::vec::fmadd(gv, Vec::loadu(k + j), Vec::loadu(b0 + j));
      store_f(dx + i, at::vec::fmadd(load_f(x + i) - Vec::loadu(mean + j), Vec::loadu(a + j), t), kG, kStream);
      if constexpr (kDr) store_f(dr + i, gv, kG, kStream);
    }
  }
  end_streams(kStream);
}

// dx and grad_residual over segments [s0, s1), for what grad_rows and grad_planes leave:
// channels_last rows of C % 8 != 0 channels, NCHW planes under 8 elements, float64.
template <typename scalar_t, bool kCL>
void grad_segments(int64_t s0, int64_t s1, int64_t len, int64_t C, const scalar_t* __restrict__ dy,
                   const scalar_t* __restrict__ x, const uint8_t* __restrict__ mask, scalar_t* __restrict__ dx,
                   scalar_t* __restrict__ dr, const at::opmath_type<scalar_t>* __restrict__ mean,
                   const at::opmath_type<scalar_t>* __restrict__ k, const at::opmath_type<scalar_t>* __restrict__ a,
                   const at::opmath_type<scalar_t>* __restrict__ b0, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = s * len;
    const int64_t c = kCL ? 0 : s % C;
    if constexpr (vectorized<scalar_t>()) {
      Vec m(mean[c]), vk(k[c]), va(a[c]), vb(b0[c]);
      for_groups(len, [&](int64_t j, auto n) {
        const int64_t i = base + j;
        if constexpr (kCL) {
          m = Vec::loadu(mean + j);
          vk = Vec::loadu(k + j);
          va = Vec::loadu(a + j);
          vb = Vec::loadu(b0 + j);
        }
        Vec gv = load_f(dy + i, n);
        if (mask) gv = masked(gv, read_bits(mask, i, n));
        store_f(dx + i, at::vec::fmadd(load_f(x + i, n) - m, va, at::vec::fmadd(gv, vk, vb)), n, stream);
        if (dr) store_f(dr + i, gv, n, stream);
      });
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = base + j, ch = kCL ? j : c;
        const acc_t gv = (mask == nullptr || mask_bit(mask, i)) ? acc_t(dy[i]) : acc_t(0);
        const BackwardCoefs<acc_t> co{k[ch], a[ch], b0[ch]};
        dx[i] = scalar_t(grad_input<acc_t>(gv, acc_t(x[i]), mean[ch], co));
        if (dr) dr[i] = scalar_t(gv);
      }
    }
  }
  end_streams(stream);
}

template <typename scalar_t, bool kCL>
void grad_kernel(const Geo& g, const scalar_t* dy, const scalar_t* x, const uint8_t* mask, scalar_t* dx,
                 scalar_t* dr, const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* k,
                 const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b0, bool stream) {
  const bool done = flagged_pass<scalar_t, kCL>(g, dr != nullptr, mask != nullptr, stream,
                                                [&](auto kDr, auto kMask, auto kStream, int64_t i0, int64_t i1) {
    constexpr bool d = decltype(kDr)::value, msk = decltype(kMask)::value, st = decltype(kStream)::value;
    if constexpr (kCL) {
      grad_rows<scalar_t, d, msk, st>(i0, i1, g.C, dy, x, mask, dx, dr, mean, k, a, b0);
    } else {
      grad_planes<scalar_t, d, msk, st>(i0, i1, g.len, g.C, dy, x, mask, dx, dr, mean, k, a, b0);
    }
  });
  if (done) return;
  parallel_segments(g, [&](int64_t s0, int64_t s1) {
    grad_segments<scalar_t, kCL>(s0, s1, g.len, g.C, dy, x, mask, dx, dr, mean, k, a, b0, stream);
  });
}

// Apply with already-computed per-channel statistics; writes out and mask.
void apply_impl(const at::Tensor& xc, const at::Tensor& mean, const at::Tensor& invstd,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& residual, at::Tensor& out, at::Tensor& mask, bool training) {
  const Geo g(xc);
  at::Tensor rc = opt(residual) ? opt(residual)->contiguous(layout_of(xc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto mc = mean.contiguous(), ic = invstd.contiguous();
    auto wc = opt(weight) ? opt(weight)->contiguous() : at::Tensor();
    auto bc = opt(bias) ? opt(bias)->contiguous() : at::Tensor();
    const acc_t* w = ptr_or_null<acc_t>(wc);
    const acc_t* b = ptr_or_null<acc_t>(bc);
    const acc_t* mp = mc.const_data_ptr<acc_t>();
    const acc_t* ip = ic.const_data_ptr<acc_t>();
    auto m = padded<acc_t>(g.C), scale = padded<acc_t>(g.C), shift = padded<acc_t>(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      m[c] = mp[c];
      scale[c] = scale_of<acc_t>(w, c, ip[c]);
      shift[c] = bias_of<acc_t>(b, c);
    }
    const bool stream = streams(xc, rc.defined() ? 3 : 2, training);
    auto run = [&](auto cl) {
      apply_kernel<scalar_t, decltype(cl)::value>(g, xc.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(rc),
                                                  out.mutable_data_ptr<scalar_t>(),
                                                  mask.numel() ? mask.mutable_data_ptr<uint8_t>() : nullptr,
                                                  m.data(), scale.data(), shift.data(), stream);
    };
    g.cl ? run(std::true_type{}) : run(std::false_type{});
  });
}

// ---------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x) {
  constexpr const char* op = "skipfast.bn_act_stats";
  check_x(op, x);
  auto xc = x.contiguous(layout_of(x));
  const int64_t C = x.size(1);
  auto opts = x.options().dtype(stat_dtype(x));
  auto mean = at::empty({C}, opts), var = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto w = channel_stats<scalar_t>(xc);
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = acc_t(w[c].n > 0 ? w[c].mean : std::nan(""));
      vp[c] = acc_t(w[c].n > 0 ? biased_var(w[c]) : std::nan(""));
    }
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "skipfast.bn_act_apply";
  check_x(op, x);
  check_apply_args(op, x, mean, invstd, weight, bias, residual);
  auto xc = x.contiguous(layout_of(x));
  auto [out, mask] = new_out_and_mask(xc, relu);
  apply_impl(xc, mean, invstd, weight, bias, residual, out, mask, /*training=*/false);
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, bool relu) {
  constexpr const char* op = "skipfast.bn_act_train";
  check_x(op, x);
  check_train_args(op, x, weight, bias, residual);
  auto xc = x.contiguous(layout_of(x));
  const int64_t C = x.size(1);
  auto opts = x.options().dtype(stat_dtype(x));
  auto mean = at::empty({C}, opts), var = at::empty({C}, opts), invstd = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto w = channel_stats<scalar_t>(xc);
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    acc_t* ip = invstd.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double v = biased_var(w[c]);
      mp[c] = acc_t(w[c].mean);
      vp[c] = acc_t(v);
      ip[c] = acc_t(invstd_of<double>(v, eps));
    }
  });
  auto [out, mask] = new_out_and_mask(xc, relu);
  apply_impl(xc, mean, invstd, weight, bias, residual, out, mask, /*training=*/true);
  return {out, mean, var, invstd, mask};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& invstd,
                                                       const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "skipfast.bn_act_backward_reduce";
  check_x(op, x);
  check_backward_reduce_args(op, grad_out, x, mean, invstd, mask);
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto gc = grad_out.contiguous(fmt);
  const Geo g(xc);
  auto opts = x.options().dtype(stat_dtype(x));
  auto sum_dy = at::empty({g.C}, opts), sum_dy_xhat = at::empty({g.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto mc = mean.contiguous(), ic = invstd.contiguous();
    auto mkc = opt(mask) ? opt(mask)->contiguous() : at::Tensor();
    auto m = padded<acc_t>(g.C);
    std::copy_n(mc.const_data_ptr<acc_t>(), g.C, m.begin());
    std::vector<double> s1(g.C), s2(g.C);
    GradTerms<scalar_t> t{gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), ptr_or_null<uint8_t>(mkc)};
    channel_sums<scalar_t>(g, t, m.data(), s1.data(), s2.data());
    acc_t* dyp = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* dxp = sum_dy_xhat.mutable_data_ptr<acc_t>();
    const acc_t* ip = ic.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      dyp[c] = acc_t(s1[c]);
      dxp[c] = acc_t(s2[c] * double(ip[c]));
    }
  });
  return {sum_dy, sum_dy_xhat};
}

std::tuple<at::Tensor, at::Tensor> backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& mean, const at::Tensor& invstd,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& mask,
                                                      const std::optional<at::Tensor>& sum_dy,
                                                      const std::optional<at::Tensor>& sum_dy_xhat, int64_t count,
                                                      bool grad_residual) {
  constexpr const char* op = "skipfast.bn_act_backward_elemt";
  check_x(op, x);
  check_backward_elemt_args(op, grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count);
  const auto fmt = layout_of(x);
  auto xc = x.contiguous(fmt);
  auto gc = grad_out.contiguous(fmt);
  const Geo g(xc);
  auto dx = at::empty_like(xc, xc.options().memory_format(fmt));
  auto dr = grad_residual ? at::empty_like(xc, xc.options().memory_format(fmt)) : at::empty({0}, xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto mc = mean.contiguous(), ic = invstd.contiguous();
    auto wc = opt(weight) ? opt(weight)->contiguous() : at::Tensor();
    auto mkc = opt(mask) ? opt(mask)->contiguous() : at::Tensor();
    const bool has_sums = opt(sum_dy) != nullptr;
    auto s1 = has_sums ? opt(sum_dy)->contiguous() : at::Tensor();
    auto s2 = has_sums ? opt(sum_dy_xhat)->contiguous() : at::Tensor();
    const acc_t* w = ptr_or_null<acc_t>(wc);
    auto m = padded<acc_t>(g.C), k = padded<acc_t>(g.C), a = padded<acc_t>(g.C), b0 = padded<acc_t>(g.C);
    const acc_t inv_count = has_sums ? acc_t(1) / acc_t(count) : acc_t(0);
    const acc_t* mp = mc.const_data_ptr<acc_t>();
    const acc_t* ip = ic.const_data_ptr<acc_t>();
    const acc_t* s1p = ptr_or_null<acc_t>(s1);
    const acc_t* s2p = ptr_or_null<acc_t>(s2);
    for (int64_t c = 0; c < g.C; ++c) {
      auto co = backward_coefs<acc_t>(w, c, ip[c], has_sums, has_sums ? s1p[c] : acc_t(0),
                                      has_sums ? s2p[c] : acc_t(0), inv_count);
      m[c] = mp[c];
      k[c] = co.k;
      a[c] = co.a;
      b0[c] = co.b0;
    }
    const bool stream = streams(xc, grad_residual ? 4 : 3, has_sums);
    auto run = [&](auto cl) {
      grad_kernel<scalar_t, decltype(cl)::value>(g, gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                                 ptr_or_null<uint8_t>(mkc), dx.mutable_data_ptr<scalar_t>(),
                                                 grad_residual ? dr.mutable_data_ptr<scalar_t>() : nullptr, m.data(),
                                                 k.data(), a.data(), b0.data(), stream);
    };
    g.cl ? run(std::true_type{}) : run(std::false_type{});
  });
  return {dx, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CPU, m) {
  m.impl("bn_act_stats", &stats_cpu);
  m.impl("bn_act_apply", &apply_cpu);
  m.impl("bn_act_train", &train_cpu);
  m.impl("bn_act_backward_reduce", &backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &backward_elemt_cpu);
}

}  // namespace skipfast
