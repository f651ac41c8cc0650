// Per-element and per-channel math of the bn_act family (batch norm + residual + ReLU),
// shared by the CPU kernels (csrc/cpu/bn_act.cpp) and the CUDA kernels (csrc/cuda/bn_act.cu).
//
// Notation, per channel c over its n = N*H*W values:
//   mean, var (biased), invstd = 1 / sqrt(var + eps)
//   forward   y   = relu((x - mean) * scale + bias + residual),  scale = weight * invstd
//   mask bit  m   = !(y <= 0)   (torch's threshold_backward keeps grad where !(out <= 0))
//   backward  dy' = m ? dy : 0,  sum_dy = sum(dy'),  sum_dy_xhat = sum(dy' * (x - mean)) * invstd
//             dx  = dy' * k + (x - mean) * a + b0   with the coefficients of backward_coefs()
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace skipfast {
namespace bn_act {

// ---- statistics: Welford / Chan merge of (count, mean, m2) partials ----

template <typename acc_t>
struct Welford {
  acc_t n = 0;
  acc_t mean = 0;
  acc_t m2 = 0;  // sum of squared deviations from mean
};

template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_push(Welford<acc_t> w, acc_t v) {
  w.n += acc_t(1);
  const acc_t d = v - w.mean;
  w.mean += d / w.n;
  w.m2 += d * (v - w.mean);
  return w;
}

// Chan et al.'s parallel merge: exact for any split of the data.
template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return a;
  const acc_t d = b.mean - a.mean;
  const acc_t fb = b.n / n;
  Welford<acc_t> r;
  r.n = n;
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
  return r;
}

// A partial from shifted sums over `n` values: s1 = sum(x - shift), s2 = sum((x - shift)^2).
// Shifting by a value of the same channel keeps s2 - s1^2/n free of cancellation when
// |mean| >> std (the plain sum-of-squares formula is not).
template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_from_shifted(acc_t n, acc_t shift, acc_t s1, acc_t s2) {
  Welford<acc_t> w;
  if (n == acc_t(0)) return w;
  const acc_t d = s1 / n;
  w.n = n;
  w.mean = shift + d;
  const acc_t m2 = s2 - s1 * d;
  w.m2 = m2 < acc_t(0) ? acc_t(0) : m2;
  return w;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t biased_var(const Welford<acc_t>& w) {
  return w.n > acc_t(0) ? w.m2 / w.n : acc_t(0);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t invstd_of(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// ---- forward ----
// T is the math type: float for float/half/bfloat16 tensors, double for double ones.

// scale = weight * invstd (weight 1 when the norm is not affine).
template <typename T>
C10_HOST_DEVICE inline T scale_of(const T* weight, int64_t c, T invstd) {
  return weight ? weight[c] * invstd : invstd;
}

template <typename T>
C10_HOST_DEVICE inline T bias_of(const T* bias, int64_t c) {
  return bias ? bias[c] : T(0);
}

template <typename T>
C10_HOST_DEVICE inline T normalize(T x, T mean, T scale, T bias) {
  return (x - mean) * scale + bias;
}

// relu that keeps NaN, as torch.relu.
template <typename T>
C10_HOST_DEVICE inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// The ReLU mask bit: 1 where the gradient passes (torch: out <= 0 blocks it).
template <typename T>
C10_HOST_DEVICE inline bool passes(T y) {
  return !(y <= T(0));
}

// Bit i of the mask lives in byte i / 8, bit i % 8 (flat index in the layout of x).
C10_HOST_DEVICE inline bool mask_bit(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

C10_HOST_DEVICE inline int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }

// ---- backward ----

template <typename T>
struct BackwardCoefs {
  T k;   // multiplies dy'
  T a;   // multiplies (x - mean)
  T b0;  // constant
};

// Training: dx = weight * invstd * (dy' - sum_dy / n - xhat * sum_dy_xhat / n).
// Eval (statistics are constants, has_sums false): dx = weight * invstd * dy'.
template <typename T>
C10_HOST_DEVICE inline BackwardCoefs<T> backward_coefs(const T* weight, int64_t c, T invstd, bool has_sums, T sum_dy,
                                                       T sum_dy_xhat, T inv_count) {
  BackwardCoefs<T> r;
  r.k = scale_of(weight, c, invstd);
  if (has_sums) {
    r.a = -r.k * invstd * sum_dy_xhat * inv_count;
    r.b0 = -r.k * sum_dy * inv_count;
  } else {
    r.a = T(0);
    r.b0 = T(0);
  }
  return r;
}

template <typename T>
C10_HOST_DEVICE inline T grad_input(T dy_masked, T x, T mean, const BackwardCoefs<T>& k) {
  return dy_masked * k.k + (x - mean) * k.a + k.b0;
}

}  // namespace bn_act
}  // namespace skipfast

// ---- host-side argument checks and helpers shared by the CPU and CUDA entry points ----
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "common.h"

namespace skipfast {
namespace bn_act {

// The dtype of per-channel tensors (statistics, weight, bias, sums): float64 for
// float64 inputs, float32 for every other floating type.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor [N, C, H, W], got ", x.dim(), "-D of shape ", x.sizes());
}

inline void check_channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must be a 1-D tensor of ", x.size(1),
              " values (one per channel of x), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == stat_dtype(x), op, ": ", name, " must have dtype ", stat_dtype(x),
              " for x of dtype ", x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " (the device of x), got ",
              t.device());
}

inline void check_opt_channel_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                     const at::Tensor& x) {
  if (t.has_value() && t->defined()) check_channel_vector(op, name, *t, x);
}

inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& x) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == mask_bytes(x.numel()), op,
              ": mask must be a 1-D uint8 tensor of ", mask_bytes(x.numel()), " bytes (1 bit per element of x), got ",
              mask.scalar_type(), " of shape ", mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask must be on ", x.device(), ", got ", mask.device());
}

inline void check_training_count(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.size(1) == 0 || x.numel() / x.size(1) > 1, op, ": Expected more than 1 value per channel when training, got input size ",
              x.sizes());
}

// The output (in xc's layout) and the ReLU mask (1 bit per element; empty without ReLU) of an
// apply pass over the dense tensor xc.
inline std::tuple<at::Tensor, at::Tensor> new_out_and_mask(const at::Tensor& xc, bool relu) {
  auto out = at::empty_like(xc, xc.options().memory_format(layout_of(xc)));
  auto mask = at::empty({relu ? mask_bytes(xc.numel()) : 0}, xc.options().dtype(at::kByte));
  return {out, mask};
}

inline const at::Tensor* opt(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// Each op's argument checks, shared by the CPU and CUDA kernels.
inline void check_apply_args(const char* op, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual) {
  check_channel_vector(op, "mean", mean, x);
  check_channel_vector(op, "invstd", invstd, x);
  check_opt_channel_vector(op, "weight", weight, x);
  check_opt_channel_vector(op, "bias", bias, x);
  if (opt(residual)) check_same_shape(op, "residual", *opt(residual), x);
}

inline void check_train_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_training_count(op, x);
  check_opt_channel_vector(op, "weight", weight, x);
  check_opt_channel_vector(op, "bias", bias, x);
  if (opt(residual)) check_same_shape(op, "residual", *opt(residual), x);
}

inline void check_backward_reduce_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& invstd,
                                       const std::optional<at::Tensor>& mask) {
  check_same_shape(op, "grad_out", grad_out, x);
  check_channel_vector(op, "mean", mean, x);
  check_channel_vector(op, "invstd", invstd, x);
  if (opt(mask)) check_mask(op, *opt(mask), x);
}

inline void check_backward_elemt_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& sum_dy,
                                      const std::optional<at::Tensor>& sum_dy_xhat, int64_t count) {
  check_same_shape(op, "grad_out", grad_out, x);
  check_channel_vector(op, "mean", mean, x);
  check_channel_vector(op, "invstd", invstd, x);
  check_opt_channel_vector(op, "weight", weight, x);
  check_opt_channel_vector(op, "sum_dy", sum_dy, x);
  check_opt_channel_vector(op, "sum_dy_xhat", sum_dy_xhat, x);
  TORCH_CHECK(bool(opt(sum_dy)) == bool(opt(sum_dy_xhat)), op,
              ": sum_dy and sum_dy_xhat must both be given (training) or both be None (eval)");
  TORCH_CHECK(!opt(sum_dy) || count > 0, op, ": count must be positive in training, got ", count);
  if (opt(mask)) check_mask(op, *opt(mask), x);
}

}  // namespace bn_act
}  // namespace skipfast
