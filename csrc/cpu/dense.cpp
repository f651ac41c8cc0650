// Dense-block kernels on CPU. A layer of a dense block reads a channel prefix of the
// block buffer: with the buffer channels_last, that prefix is M = N*H*W evenly spaced
// rows of C contiguous channels. The kernels work on such rows in place, blocked over
// rows: BN scale/shift + ReLU go into a small per-thread tile and the 1x1 convolution
// is a GEMM on that tile, so the normalized activation never exists in full.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common.h"
#include "dense.h"

namespace skipfast {
namespace {

// A [N, C, H, W] tensor seen as M rows of C channels, `ld` elements apart.
struct Rows {
  at::Tensor t;
  int64_t ld;
};

// Row stride of `x` if its channels are contiguous and its pixels evenly spaced (a channel
// prefix of a channels_last buffer), else -1.
int64_t row_stride(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (C > 1 && x.stride(1) != 1) return -1;
  const int64_t ld = W > 1 ? x.stride(3) : H > 1 ? x.stride(2) : N > 1 ? x.stride(0) : C;
  if (ld < C) return -1;
  if (H > 1 && x.stride(2) != W * ld) return -1;
  if (N > 1 && x.stride(0) != H * W * ld) return -1;
  return ld;
}

Rows as_rows(const at::Tensor& x) {
  const int64_t ld = row_stride(x);
  if (ld >= 0) return {x, ld};
  return {x.contiguous(at::MemoryFormat::ChannelsLast), x.size(1)};
}

// Rows per tile: the normalized tile stays around 512 KiB (fp32), within L2.
int64_t tile_rows(int64_t C) { return std::clamp<int64_t>(131072 / std::max<int64_t>(C, 1), 64, 512); }

void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 on CPU, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got shape ", x.sizes());
}

void check_channel_vec(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": ", name, " must have shape [", x.size(1),
              "] (the channels of x), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
              " (the dtype of x), got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", v.device());
}

void check_weight(const char* op, const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == 1 && w.size(3) == 1, op,
              ": weight must have shape [C_out, ", x.size(1), ", 1, 1], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight must have dtype ", x.scalar_type(),
              " (the dtype of x), got ", w.scalar_type());
}

// out[r, :] = relu(x[r, :] * scale + shift) for `rows` rows.
template <typename scalar_t>
void bn_relu_rows(const scalar_t* x, int64_t ldx, const scalar_t* sc, const scalar_t* sh, scalar_t* out,
                  int64_t rows, int64_t C) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * ldx;
    scalar_t* o = out + r * C;
    int64_t c = 0;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec pre = at::vec::fmadd(Vec::loadu(xr + c), Vec::loadu(sc + c), Vec::loadu(sh + c));
      at::vec::clamp_min(pre, zero).store(o + c);
    }
    for (; c < C; ++c) o[c] = bn_relu(xr[c], sc[c], sh[c]);
  }
}

// conv1x1(relu(x * scale + shift), weight), channels_last output.
at::Tensor bn_relu_conv1x1_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& weight) {
  constexpr const char* op = "skipfast.dense_bn_relu_conv1x1";
  check_input(op, x_in);
  check_channel_vec(op, "scale", scale, x_in);
  check_channel_vec(op, "shift", shift, x_in);
  check_weight(op, weight, x_in);
  const Rows xr = as_rows(x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = N * H * W, Cout = weight.size(0);
  auto out = at::empty({N, Cout, H, W}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto out2 = out.permute({0, 2, 3, 1}).view({M, Cout});
  const auto wt = weight.reshape({Cout, C}).t();  // [C, Cout]
  const auto sc = scale.contiguous(), sh = shift.contiguous();
  const int64_t T = tile_rows(C), ntiles = (M + T - 1) / T;
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "dense_bn_relu_conv1x1_cpu", [&] {
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: the GEMMs below are plain
      // kernels, never autograd ops.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto tile = at::empty({T, C}, x_in.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * T, rows = std::min(T, M - r0);
        bn_relu_rows<scalar_t>(xp + r0 * xr.ld, xr.ld, sc.const_data_ptr<scalar_t>(), sh.const_data_ptr<scalar_t>(),
                               tile.mutable_data_ptr<scalar_t>(), rows, C);
        auto dst = out2.narrow(0, r0, rows);
        at::mm_out(dst, tile.narrow(0, 0, rows), wt);
      }
    });
  });
  return out;
}

// Backward of conv1x1(relu(x * scale + shift), weight) given grad_out:
//   grad_x += g * scale (accumulated in place into the shared gradient buffer),
//   returns (sum over pixels of g * x, sum of g, grad_weight), g = d loss / d (x*scale+shift).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_conv1x1_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const at::Tensor& grad_x) {
  constexpr const char* op = "skipfast.dense_bn_relu_conv1x1_backward_";
  check_input(op, x_in);
  check_channel_vec(op, "scale", scale, x_in);
  check_channel_vec(op, "shift", shift, x_in);
  check_weight(op, weight, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = N * H * W, Cout = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == N && grad_out.size(1) == Cout && grad_out.size(2) == H &&
                  grad_out.size(3) == W && grad_out.scalar_type() == x_in.scalar_type(),
              op, ": grad_out must be ", x_in.scalar_type(), " of shape [", N, ", ", Cout, ", ", H, ", ", W, "], got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(grad_x.sizes() == x_in.sizes() && grad_x.scalar_type() == x_in.scalar_type(), op,
              ": grad_x must be ", x_in.scalar_type(), " of shape ", x_in.sizes(), ", got ", grad_x.scalar_type(), " ",
              grad_x.sizes());
  const int64_t ldg = row_stride(grad_x);
  TORCH_CHECK(ldg >= 0, op, ": grad_x is accumulated in place and must be rows of contiguous channels "
              "(a channel prefix of a channels_last buffer), got strides ", grad_x.strides());
  const Rows xr = as_rows(x_in);
  const auto gy2 = grad_out.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({M, Cout});
  const auto w2 = weight.reshape({Cout, C}).contiguous();
  const auto sc = scale.contiguous(), sh = shift.contiguous();
  const int64_t T = tile_rows(C), ntiles = (M + T - 1) / T;
  std::vector<double> sum_gx(C, 0.0), sum_g(C, 0.0);
  auto grad_w = at::zeros({Cout, C}, x_in.options());
  std::mutex mu;
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "dense_bn_relu_conv1x1_backward_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const scalar_t* scp = sc.const_data_ptr<scalar_t>();
    const scalar_t* shp = sh.const_data_ptr<scalar_t>();
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto gh = at::empty({T, C}, x_in.options());
      auto h = at::empty({T, C}, x_in.options());
      auto gw_local = at::zeros({Cout, C}, x_in.options());
      std::vector<scalar_t> tg(C), tgx(C);
      std::vector<double> lg(C, 0.0), lgx(C, 0.0);
      const Vec zero(scalar_t(0));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * T, rows = std::min(T, M - r0);
        auto gy_t = gy2.narrow(0, r0, rows);
        auto gh_t = gh.narrow(0, 0, rows);
        at::mm_out(gh_t, gy_t, w2);  // d loss / d h for this tile
        std::fill(tg.begin(), tg.end(), scalar_t(0));
        std::fill(tgx.begin(), tgx.end(), scalar_t(0));
        const scalar_t* ghp = gh.const_data_ptr<scalar_t>();
        scalar_t* hp = h.mutable_data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* xrow = xp + (r0 + r) * xr.ld;
          scalar_t* gxrow = gxp + (r0 + r) * ldg;
          const scalar_t* ghrow = ghp + r * C;
          scalar_t* hrow = hp + r * C;
          int64_t c = 0;
          for (; c + Vec::size() <= C; c += Vec::size()) {
            const Vec xv = Vec::loadu(xrow + c), s = Vec::loadu(scp + c);
            const Vec pre = at::vec::fmadd(xv, s, Vec::loadu(shp + c));
            const Vec g = Vec::blendv(zero, Vec::loadu(ghrow + c), pre > zero);
            at::vec::clamp_min(pre, zero).store(hrow + c);
            (Vec::loadu(tg.data() + c) + g).store(tg.data() + c);
            at::vec::fmadd(g, xv, Vec::loadu(tgx.data() + c)).store(tgx.data() + c);
            at::vec::fmadd(g, s, Vec::loadu(gxrow + c)).store(gxrow + c);
          }
          for (; c < C; ++c) {
            const scalar_t g = bn_relu_grad(ghrow[c], xrow[c], scp[c], shp[c]);
            hrow[c] = bn_relu(xrow[c], scp[c], shp[c]);
            tg[c] += g;
            tgx[c] += g * xrow[c];
            gxrow[c] += g * scp[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          lg[c] += tg[c];
          lgx[c] += tgx[c];
        }
        gw_local.addmm_(gy_t.t(), h.narrow(0, 0, rows));
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t c = 0; c < C; ++c) {
        sum_g[c] += lg[c];
        sum_gx[c] += lgx[c];
      }
      grad_w.add_(gw_local);
    });
  });
  // The sums stay float64: BN's weight gradient is (sum g*x - mean * sum g) * invstd, a
  // difference that cancels most of its digits when the channel mean is large.
  auto dopt = at::TensorOptions().dtype(at::kDouble);
  auto gscale = at::from_blob(sum_gx.data(), {C}, dopt).clone();
  auto gshift = at::from_blob(sum_g.data(), {C}, dopt).clone();
  return {gscale, gshift, grad_w.view({Cout, C, 1, 1})};
}

// Adds rows [r0, r1) of the C channels of x (rows `ld` apart) into the per-channel double
// sums s (of x - sh) and ss (of its square). Float x, AVX2: 16 channels (one 64-byte line)
// at a time, their sums in registers down the rows, while the next (r1 - r0) rows are
// prefetched one line per row step in memory order. (Prefetching the same 16 channels of
// the next rows instead, a strided walk, read [32, 128, 56, 56] from DRAM 1.4x slower than
// row by row float sums; in memory order it is as fast, and 1.4-2.3x faster from cache.)
template <typename scalar_t>
void stats_rows(const scalar_t* x, int64_t ld, int64_t r0, int64_t r1, int64_t C, const double* sh,
                double* __restrict__ s, double* __restrict__ ss) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t lines = (C + 15) / 16;  // per row
    int64_t q = 0;                        // lines of the next rows prefetched so far
    for (; c + 16 <= C; c += 16) {
      __m256d a[4], b[4], h[4];
      for (int u = 0; u < 4; ++u) {
        a[u] = _mm256_loadu_pd(s + c + 4 * u);
        b[u] = _mm256_loadu_pd(ss + c + 4 * u);
        h[u] = _mm256_loadu_pd(sh + c + 4 * u);
      }
      for (int64_t r = r0; r < r1; ++r, ++q) {
        __builtin_prefetch(x + (r1 + q / lines) * ld + (q % lines) * 16);
        const float* p = x + r * ld + c;
        for (int u = 0; u < 4; ++u) {
          const __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + 4 * u)), h[u]);
          a[u] = _mm256_add_pd(a[u], d);
          b[u] = _mm256_fmadd_pd(d, d, b[u]);
        }
      }
      for (int u = 0; u < 4; ++u) {
        _mm256_storeu_pd(s + c + 4 * u, a[u]);
        _mm256_storeu_pd(ss + c + 4 * u, b[u]);
      }
    }
  }
#endif
  if (c == C) return;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * ld;
    for (int64_t j = c; j < C; ++j) {
      const double d = double(row[j]) - sh[j];
      s[j] += d;
      ss[j] += d * d;
    }
  }
}

// Per-channel mean and biased variance over N, H, W: sums of x - shift and of its square in
// double, the shift being the mean of the channel's first 64 values, so that the variance
// (ss / M - m^2) keeps its digits even when the mean is far from zero. (Float partials over
// a tile's rows, shifted by the first value, were up to 400x less accurate than
// torch.var_mean in float32: 2.5e-5 relative on the variance when the first value lies 5
// standard deviations from the mean.) Each of at most get_num_threads() row chunks sums
// into its own slot, and the slots are added in order: the same bits on every call.
std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x_in) {
  constexpr const char* op = "skipfast.dense_channel_stats";
  check_input(op, x_in);
  const Rows xr = as_rows(x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = N * H * W;
  const int64_t chunks = std::clamp<int64_t>(M * C / 32768, 1, at::get_num_threads());
  std::vector<double> part(2 * C * chunks, 0.0), shift(C, 0.0), s(C, 0.0), ss(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "dense_channel_stats_cpu", [&] {
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const int64_t first = std::min<int64_t>(M, 64);
    for (int64_t r = 0; r < first; ++r)
      for (int64_t c = 0; c < C; ++c) shift[c] += double(xp[r * xr.ld + c]);
    for (int64_t c = 0; c < C; ++c) shift[c] /= double(first);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double* ls = part.data() + 2 * C * k;
        double* lss = ls + C;
        // tiles of about 32 KiB of rows, summed 16 channels at a time
        const int64_t R = std::max<int64_t>(1, 8192 / C), end = M * (k + 1) / chunks;
        for (int64_t r = M * k / chunks; r < end; r += R)
          stats_rows(xp, xr.ld, r, std::min(end, r + R), C, shift.data(), ls, lss);
      }
    });
  });
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      s[c] += part[2 * C * k + c];
      ss[c] += part[2 * C * k + C + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const double m = s[c] / M;
    ss[c] = std::max(ss[c] / M - m * m, 0.0);
    s[c] = m + shift[c];
  }
  auto dopt = at::TensorOptions().dtype(at::kDouble);
  return {at::from_blob(s.data(), {C}, dopt).to(x_in.scalar_type(), /*non_blocking=*/false, /*copy=*/true),
          at::from_blob(ss.data(), {C}, dopt).to(x_in.scalar_type(), /*non_blocking=*/false, /*copy=*/true)};
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CPU, m) {
  m.impl("dense_bn_relu_conv1x1", &bn_relu_conv1x1_cpu);
  m.impl("dense_bn_relu_conv1x1_backward_", &bn_relu_conv1x1_backward_cpu);
  m.impl("dense_channel_stats", &channel_stats_cpu);
}

}  // namespace skipfast
