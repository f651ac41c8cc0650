// bn_act on CPU: batch-norm statistics, fused normalize + residual + ReLU (with a
// bit-packed ReLU mask), and the two backward passes. Math in csrc/bn_act.h.
//
// Every kernel walks x in its dense layout (NCHW or channels_last) by flat index i.
// A walk over [begin, end) is cut into segments of one channel (NCHW: one H*W plane)
// or one row of C channels (channels_last); inside a segment, groups of 8 elements
// whose index is a multiple of 8 take the vector path (one mask byte each), the rest
// the scalar path. Parallel ranges start at multiples of 8, so every mask byte has
// exactly one writer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "bn_act.h"
#include "common.h"

namespace skipfast {
namespace {

using namespace bn_act;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kGrainBytes = 4096;  // mask bytes (x 8 elements) per parallel task
constexpr int64_t kChunk = 4096;       // elements summed in fp32 before folding into double
// The vector path handles 8 floats = one mask byte at a time.
constexpr bool kVec8 = Vec::size() == 8;

template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

template <typename T>
inline void store_f(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, Vec::size());
  }
}

// 8 mask bits of y: bit k set when !(y[k] <= 0).
inline uint8_t pass_bits(const Vec& y) {
#if defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_NLE_UQ)));
#else
  float tmp[Vec::size()];
  y.store(tmp);
  uint8_t b = 0;
  for (int k = 0; k < 8; ++k) b |= uint8_t(passes(tmp[k])) << k;
  return b;
#endif
}

// A mask byte expanded to 8 lanes of all-ones / all-zeros.
struct MaskLut {
  alignas(32) uint32_t v[256][8];
  MaskLut() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> k) & 1) ? 0xFFFFFFFFu : 0u;
  }
};
const MaskLut kLut;

inline Vec masked(const Vec& dy, uint8_t bits) {
  const Vec m = Vec::loadu(kLut.v[bits]);
  return Vec::blendv(Vec(0.f), dy, m);
}

inline void set_bit(uint8_t* mask, int64_t i, bool bit) {
  // Elements are visited in increasing order by the byte's only writer.
  if ((i & 7) == 0) {
    mask[i >> 3] = uint8_t(bit);
  } else {
    mask[i >> 3] |= uint8_t(bit) << (i & 7);
  }
}

struct Geo {
  int64_t C, HW, numel;
  bool cl;
  explicit Geo(const at::Tensor& x)
      : C(x.size(1)), HW(x.size(2) * x.size(3)), numel(x.numel()), cl(layout_of(x) == at::MemoryFormat::ChannelsLast) {}
};

// Calls f.scalar(i, c) / f.vec8(i, c) over [begin, end); for channels_last, vec8's c is
// the channel of element i and the group covers channels c..c+7.
template <bool kVector, typename F>
inline void walk(const Geo& g, int64_t begin, int64_t end, F& f) {
  int64_t i = begin;
  while (i < end) {
    int64_t c, seg_end;
    if (g.cl) {
      const int64_t row = i / g.C;
      c = i - row * g.C;
      seg_end = std::min(end, (row + 1) * g.C);
    } else {
      const int64_t plane = i / g.HW;
      c = plane % g.C;
      seg_end = std::min(end, (plane + 1) * g.HW);
    }
    if constexpr (kVector && kVec8) {
      for (; i < seg_end && (i & 7); ++i) f.scalar(i, g.cl ? c++ : c);
      for (; i + 8 <= seg_end; i += 8) {
        f.vec8(i, c);
        if (g.cl) c += 8;
      }
    }
    for (; i < seg_end; ++i) f.scalar(i, g.cl ? c++ : c);
  }
}

template <typename scalar_t>
constexpr bool vectorized() {
  return !std::is_same_v<scalar_t, double>;
}

inline double hsum(const Vec& v) {
  float tmp[Vec::size()];
  v.store(tmp);
  double s = 0;
  for (int k = 0; k < Vec::size(); ++k) s += tmp[k];
  return s;
}

// Splits [0, n) into at most get_num_threads() contiguous chunks and runs fn(chunk, begin, end).
template <typename F>
void for_chunks(int64_t n, int64_t min_per_chunk, F fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / std::max<int64_t>(min_per_chunk, 1)));
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) fn(t, n * t / chunks, n * (t + 1) / chunks);
  });
}

// ---------------------------------------------------------------------------------
// Two per-channel sums over x (or dy and x), accumulated in fp32 over chunks of at most
// kChunk elements and folded into double. Used by statistics and by backward-reduce.
// ---------------------------------------------------------------------------------

// Statistics: s1 = sum(x - shift[c]), s2 = sum((x - shift[c])^2).
template <typename scalar_t, bool kCL>
struct StatsSums {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const acc_t* shift;
  acc_t* a1;  // kCL: per-channel arrays
  acc_t* a2;
  acc_t s1 = 0, s2 = 0;  // NCHW: one channel
  Vec v1 = Vec(0.f), v2 = Vec(0.f);

  void scalar(int64_t i, int64_t c) {
    const acc_t d = acc_t(x[i]) - shift[c];
    if constexpr (kCL) {
      a1[c] += d;
      a2[c] += d * d;
    } else {
      s1 += d;
      s2 += d * d;
    }
  }
  void vec8(int64_t i, int64_t c) {
    if constexpr (vectorized<scalar_t>()) {
      if constexpr (kCL) {
        const Vec d = load_f(x + i) - Vec::loadu(shift + c);
        (Vec::loadu(a1 + c) + d).store(a1 + c);
        at::vec::fmadd(d, d, Vec::loadu(a2 + c)).store(a2 + c);
      } else {
        const Vec d = load_f(x + i) - Vec(shift[c]);
        v1 = v1 + d;
        v2 = at::vec::fmadd(d, d, v2);
      }
    }
  }
  double total1() const { return double(s1) + hsum(v1); }
  double total2() const { return double(s2) + hsum(v2); }
};

// Backward reduce: s1 = sum(dy'), s2 = sum(dy' * (x - mean[c])), dy' = dy masked by ReLU.
template <typename scalar_t, bool kCL>
struct GradSums {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;
  const uint8_t* mask;  // null: no ReLU
  acc_t* a1;
  acc_t* a2;
  acc_t s1 = 0, s2 = 0;
  Vec v1 = Vec(0.f), v2 = Vec(0.f);

  void scalar(int64_t i, int64_t c) {
    const acc_t g = (mask == nullptr || mask_bit(mask, i)) ? acc_t(dy[i]) : acc_t(0);
    const acc_t p = g * (acc_t(x[i]) - mean[c]);
    if constexpr (kCL) {
      a1[c] += g;
      a2[c] += p;
    } else {
      s1 += g;
      s2 += p;
    }
  }
  void vec8(int64_t i, int64_t c) {
    if constexpr (vectorized<scalar_t>()) {
      Vec g = load_f(dy + i);
      if (mask != nullptr) g = masked(g, mask[i >> 3]);
      const Vec m = kCL ? Vec::loadu(mean + c) : Vec(mean[c]);
      const Vec xc = load_f(x + i) - m;
      if constexpr (kCL) {
        (Vec::loadu(a1 + c) + g).store(a1 + c);
        at::vec::fmadd(g, xc, Vec::loadu(a2 + c)).store(a2 + c);
      } else {
        v1 = v1 + g;
        v2 = at::vec::fmadd(g, xc, v2);
      }
    }
  }
  double total1() const { return double(s1) + hsum(v1); }
  double total2() const { return double(s2) + hsum(v2); }
};

// Per-channel double sums (out1, out2, each [C]) of the functor's two quantities, and the
// number of values per channel summed by each partial (for Welford's merge).
template <typename scalar_t, template <typename, bool> class Sums, typename MakeSums>
void channel_sums_nchw(const Geo& g, int64_t N, MakeSums make, std::vector<Welford<double>>* stats_out,
                       double* out1, double* out2, const double* shift) {
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Welford<double> w;
      double t1 = 0, t2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * g.C + c) * g.HW;
        for (int64_t j = 0; j < g.HW; j += kChunk) {
          const int64_t len = std::min(kChunk, g.HW - j);
          Sums<scalar_t, false> f = make(nullptr, nullptr);
          walk<vectorized<scalar_t>()>(g, base + j, base + j + len, f);
          if (stats_out) {
            w = welford_merge(w, welford_from_shifted<double>(double(len), shift[c], f.total1(), f.total2()));
          } else {
            t1 += f.total1();
            t2 += f.total2();
          }
        }
      }
      if (stats_out) {
        (*stats_out)[c] = w;
      } else {
        out1[c] = t1;
        out2[c] = t2;
      }
    }
  });
}

template <typename scalar_t, template <typename, bool> class Sums, typename MakeSums>
void channel_sums_cl(const Geo& g, MakeSums make, std::vector<Welford<double>>* stats_out, double* out1,
                     double* out2, const double* shift) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, rows = g.numel / C;
  const int64_t rows_per_fold = std::max<int64_t>(1, kChunk / C);
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<double>> p1(max_chunks), p2(max_chunks);
  std::vector<int64_t> counts(max_chunks, 0);
  for_chunks(rows, 64, [&](int64_t t, int64_t r0, int64_t r1) {
    std::vector<acc_t> a1(C), a2(C);
    std::vector<double> d1(C, 0.0), d2(C, 0.0);
    for (int64_t r = r0; r < r1; r += rows_per_fold) {
      std::fill(a1.begin(), a1.end(), acc_t(0));
      std::fill(a2.begin(), a2.end(), acc_t(0));
      Sums<scalar_t, true> f = make(a1.data(), a2.data());
      walk<vectorized<scalar_t>()>(g, r * C, std::min(r1, r + rows_per_fold) * C, f);
      for (int64_t c = 0; c < C; ++c) {
        d1[c] += a1[c];
        d2[c] += a2[c];
      }
    }
    p1[t] = std::move(d1);
    p2[t] = std::move(d2);
    counts[t] = r1 - r0;
  });
  for (int64_t c = 0; c < C; ++c) {
    Welford<double> w;
    double t1 = 0, t2 = 0;
    for (int64_t t = 0; t < max_chunks; ++t) {
      if (p1[t].empty()) continue;
      if (stats_out) {
        w = welford_merge(w, welford_from_shifted<double>(double(counts[t]), shift[c], p1[t][c], p2[t][c]));
      } else {
        t1 += p1[t][c];
        t2 += p2[t][c];
      }
    }
    if (stats_out) {
      (*stats_out)[c] = w;
    } else {
      out1[c] = t1;
      out2[c] = t2;
    }
  }
}

// Per-channel Welford statistics of a dense x (layout_of(x)).
template <typename scalar_t>
std::vector<Welford<double>> channel_stats(const at::Tensor& xc) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geo g(xc);
  const scalar_t* x = xc.const_data_ptr<scalar_t>();
  std::vector<Welford<double>> w(g.C);
  if (g.numel == 0) return w;
  // Shift each channel by one of its own values (the first in memory).
  std::vector<acc_t> shift(g.C);
  std::vector<double> shift_d(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    shift[c] = acc_t(g.cl ? x[c] : x[c * g.HW]);
    shift_d[c] = double(shift[c]);
  }
  auto make = [&](acc_t* a1, acc_t* a2) { return StatsSums<scalar_t, false>{x, shift.data(), a1, a2}; };
  auto make_cl = [&](acc_t* a1, acc_t* a2) { return StatsSums<scalar_t, true>{x, shift.data(), a1, a2}; };
  if (g.cl) {
    channel_sums_cl<scalar_t, StatsSums>(g, make_cl, &w, nullptr, nullptr, shift_d.data());
  } else {
    channel_sums_nchw<scalar_t, StatsSums>(g, xc.size(0), make, &w, nullptr, nullptr, shift_d.data());
  }
  return w;
}

// ---------------------------------------------------------------------------------
// Elementwise passes
// ---------------------------------------------------------------------------------

// out = relu?((x - mean) * scale + bias + residual), mask bits.
template <typename scalar_t>
struct Apply {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* r;  // null: no residual
  scalar_t* out;
  uint8_t* mask;  // null: no ReLU
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* bias;
  bool cl;

  void scalar(int64_t i, int64_t c) {
    acc_t y = normalize<acc_t>(acc_t(x[i]), mean[c], scale[c], bias[c]);
    if (r) y += acc_t(r[i]);
    if (mask) {
      set_bit(mask, i, passes(y));
      y = relu(y);
    }
    out[i] = scalar_t(y);
  }
  void vec8(int64_t i, int64_t c) {
    if constexpr (vectorized<scalar_t>()) {
      const Vec m = cl ? Vec::loadu(mean + c) : Vec(mean[c]);
      const Vec s = cl ? Vec::loadu(scale + c) : Vec(scale[c]);
      const Vec b = cl ? Vec::loadu(bias + c) : Vec(bias[c]);
      Vec y = at::vec::fmadd(load_f(x + i) - m, s, b);
      if (r) y = y + load_f(r + i);
      if (mask) {
        mask[i >> 3] = pass_bits(y);
        y = at::vec::clamp_min(y, Vec(0.f));
      }
      store_f(out + i, y);
    }
  }
};

// dx = dy' * k + (x - mean) * a + b0; grad_residual = dy'.
template <typename scalar_t>
struct GradElemt {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const uint8_t* mask;
  scalar_t* dx;
  scalar_t* dr;  // null: not requested
  const acc_t* mean;
  const acc_t* k;
  const acc_t* a;
  const acc_t* b0;
  bool cl;

  void scalar(int64_t i, int64_t c) {
    const acc_t g = (mask == nullptr || mask_bit(mask, i)) ? acc_t(dy[i]) : acc_t(0);
    const BackwardCoefs<acc_t> co{k[c], a[c], b0[c]};
    dx[i] = scalar_t(grad_input<acc_t>(g, acc_t(x[i]), mean[c], co));
    if (dr) dr[i] = scalar_t(g);
  }
  void vec8(int64_t i, int64_t c) {
    if constexpr (vectorized<scalar_t>()) {
      Vec g = load_f(dy + i);
      if (mask) g = masked(g, mask[i >> 3]);
      const Vec m = cl ? Vec::loadu(mean + c) : Vec(mean[c]);
      const Vec vk = cl ? Vec::loadu(k + c) : Vec(k[c]);
      const Vec va = cl ? Vec::loadu(a + c) : Vec(a[c]);
      const Vec vb = cl ? Vec::loadu(b0 + c) : Vec(b0[c]);
      store_f(dx + i, at::vec::fmadd(load_f(x + i) - m, va, at::vec::fmadd(g, vk, vb)));
      if (dr) store_f(dr + i, g);
    }
  }
};

template <typename F>
void parallel_walk(const Geo& g, bool vector, F& f) {
  const int64_t nbytes = mask_bytes(g.numel);
  at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
    F local = f;
    if (vector) {
      walk<true>(g, b0 * 8, std::min(b1 * 8, g.numel), local);
    } else {
      walk<false>(g, b0 * 8, std::min(b1 * 8, g.numel), local);
    }
  });
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return opt(t) ? opt(t)->const_data_ptr<T>() : nullptr;
}

// Apply with already-computed per-channel statistics; writes out and mask.
void apply_impl(const at::Tensor& xc, const at::Tensor& mean, const at::Tensor& invstd,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& residual, at::Tensor& out, at::Tensor& mask) {
  const Geo g(xc);
  const auto fmt = layout_of(xc);
  at::Tensor rc = opt(residual) ? opt(residual)->contiguous(fmt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bn_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    auto mc = mean.contiguous();
    auto ic = invstd.contiguous();
    auto wc = opt(weight) ? opt(weight)->contiguous() : at::Tensor();
    auto bc = opt(bias) ? opt(bias)->contiguous() : at::Tensor();
    const acc_t* w = wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* b = bc.defined() ? bc.const_data_ptr<acc_t>() : nullptr;
    std::vector<acc_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = scale_of<acc_t>(w, c, ic.const_data_ptr<acc_t>()[c]);
      shift[c] = bias_of<acc_t>(b, c);
    }
    Apply<scalar_t> f{xc.const_data_ptr<scalar_t>(),
                      rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
                      out.mutable_data_ptr<scalar_t>(),
                      mask.numel() ? mask.mutable_data_ptr<uint8_t>() : nullptr,
                      mc.const_data_ptr<acc_t>(),
                      scale.data(),
                      shift.data(),
                      g.cl};
    parallel_walk(g, vectorized<scalar_t>(), f);
  });
}

std::tuple<at::Tensor, at::Tensor> new_out_and_mask(const at::Tensor& xc, bool relu) {
  const auto fmt = layout_of(xc);
  auto out = at::empty_like(xc, xc.options().memory_format(fmt));
  auto mask = at::empty({relu ? mask_bytes(xc.numel()) : 0}, xc.options().dtype(at::kByte));
  return {out, mask};
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
    for (int64_t c = 0; c < C; ++c) {
      mean.mutable_data_ptr<acc_t>()[c] = acc_t(w[c].n > 0 ? w[c].mean : std::nan(""));
      var.mutable_data_ptr<acc_t>()[c] = acc_t(w[c].n > 0 ? biased_var(w[c]) : std::nan(""));
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
  apply_impl(xc, mean, invstd, weight, bias, residual, out, mask);
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
    for (int64_t c = 0; c < C; ++c) {
      const double v = biased_var(w[c]);
      mean.mutable_data_ptr<acc_t>()[c] = acc_t(w[c].mean);
      var.mutable_data_ptr<acc_t>()[c] = acc_t(v);
      invstd.mutable_data_ptr<acc_t>()[c] = acc_t(invstd_of<double>(v, eps));
    }
  });
  auto [out, mask] = new_out_and_mask(xc, relu);
  apply_impl(xc, mean, invstd, weight, bias, residual, out, mask);
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
    auto mc = mean.contiguous();
    auto ic = invstd.contiguous();
    auto mkc = opt(mask) ? opt(mask)->contiguous() : at::Tensor();
    const scalar_t* dy = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* m = mc.const_data_ptr<acc_t>();
    const uint8_t* mk = mkc.defined() ? mkc.const_data_ptr<uint8_t>() : nullptr;
    std::vector<double> s1(g.C, 0.0), s2(g.C, 0.0);
    if (g.numel > 0) {
      if (g.cl) {
        auto make = [&](acc_t* a1, acc_t* a2) { return GradSums<scalar_t, true>{dy, xp, m, mk, a1, a2}; };
        channel_sums_cl<scalar_t, GradSums>(g, make, nullptr, s1.data(), s2.data(), nullptr);
      } else {
        auto make = [&](acc_t* a1, acc_t* a2) { return GradSums<scalar_t, false>{dy, xp, m, mk, a1, a2}; };
        channel_sums_nchw<scalar_t, GradSums>(g, xc.size(0), make, nullptr, s1.data(), s2.data(), nullptr);
      }
    }
    for (int64_t c = 0; c < g.C; ++c) {
      sum_dy.mutable_data_ptr<acc_t>()[c] = acc_t(s1[c]);
      sum_dy_xhat.mutable_data_ptr<acc_t>()[c] = acc_t(s2[c] * double(ic.const_data_ptr<acc_t>()[c]));
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
    auto mc = mean.contiguous();
    auto ic = invstd.contiguous();
    auto wc = opt(weight) ? opt(weight)->contiguous() : at::Tensor();
    auto mkc = opt(mask) ? opt(mask)->contiguous() : at::Tensor();
    const bool has_sums = opt(sum_dy) != nullptr;
    auto s1 = has_sums ? opt(sum_dy)->contiguous() : at::Tensor();
    auto s2 = has_sums ? opt(sum_dy_xhat)->contiguous() : at::Tensor();
    const acc_t* w = wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr;
    std::vector<acc_t> k(g.C), a(g.C), b0(g.C);
    const acc_t inv_count = has_sums ? acc_t(1) / acc_t(count) : acc_t(0);
    for (int64_t c = 0; c < g.C; ++c) {
      auto co = backward_coefs<acc_t>(w, c, ic.const_data_ptr<acc_t>()[c], has_sums,
                                      has_sums ? s1.const_data_ptr<acc_t>()[c] : acc_t(0),
                                      has_sums ? s2.const_data_ptr<acc_t>()[c] : acc_t(0), inv_count);
      k[c] = co.k;
      a[c] = co.a;
      b0[c] = co.b0;
    }
    GradElemt<scalar_t> f{gc.const_data_ptr<scalar_t>(),
                          xc.const_data_ptr<scalar_t>(),
                          mkc.defined() ? mkc.const_data_ptr<uint8_t>() : nullptr,
                          dx.mutable_data_ptr<scalar_t>(),
                          grad_residual ? dr.mutable_data_ptr<scalar_t>() : nullptr,
                          mc.const_data_ptr<acc_t>(),
                          k.data(),
                          a.data(),
                          b0.data(),
                          g.cl};
    parallel_walk(g, vectorized<scalar_t>(), f);
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
