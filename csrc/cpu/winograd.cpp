// 3x3 convolution (stride 1, padding 1, groups 1) by Winograd F(2x2, 3x3) on CPU, float32,
// channels_last, with the bias + residual + ReLU epilogue of conv2d_bias_act.
//
// The output is cut into 2x2 tiles. Each tile's 4x4 input patch d becomes V = B^T d B,
// each filter g becomes U = G g G^T (computed once per weight, skipfast/ops/conv.py), the
// 16 elementwise products over input channels are 16 GEMMs M[q] = V[q] U[q], and the 2x2
// output is A^T M A: 16 multiply-adds per 4 outputs per channel pair instead of 36.
// Tiles are processed in blocks that keep V and M in cache, one block per task:
// transform, 16 GEMMs, inverse transform + epilogue, store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace skipfast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kL = Vec::size();

struct Tiles {
  int64_t N, H, W, TH, TW;
  int64_t count() const { return N * TH * TW; }
};

// V[q][t][c] for tiles [t0, t0 + nt): V = B^T d B with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
void input_transform(const float* __restrict__ x, int64_t C, const Tiles& g, int64_t t0, int64_t nt,
                     float* __restrict__ v) {
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t tile = t0 + t;
    const int64_t n = tile / (g.TH * g.TW), ty = tile / g.TW % g.TH, tx = tile % g.TW;
    const float* p[4][4];  // the 16 input pixels (null: zero padding)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
        p[i][j] = (y >= 0 && y < g.H && xx >= 0 && xx < g.W) ? x + ((n * g.H + y) * g.W + xx) * C : nullptr;
      }
    for (int64_t c = 0; c < C; c += kL) {
      Vec r[4][4];
      for (int j = 0; j < 4; ++j) {
        Vec d[4];
        for (int i = 0; i < 4; ++i) d[i] = p[i][j] ? Vec::loadu(p[i][j] + c) : Vec(0.f);
        r[0][j] = d[0] - d[2];
        r[1][j] = d[1] + d[2];
        r[2][j] = d[2] - d[1];
        r[3][j] = d[1] - d[3];
      }
      for (int i = 0; i < 4; ++i) {
        float* out = v + (i * 4 * nt + t) * C + c;
        (r[i][0] - r[i][2]).store(out);
        (r[i][1] + r[i][2]).store(out + nt * C);
        (r[i][2] - r[i][1]).store(out + 2 * nt * C);
        (r[i][1] - r[i][3]).store(out + 3 * nt * C);
      }
    }
  }
}

// out = act(A^T M A + bias + residual) with A^T = [1 1 1 0; 0 1 -1 -1], for tiles [t0, t0 + nt).
void output_transform(const float* __restrict__ m, int64_t K, const Tiles& g, int64_t t0, int64_t nt,
                      const float* __restrict__ bias, const float* __restrict__ res, bool relu,
                      float* __restrict__ out) {
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t tile = t0 + t;
    const int64_t n = tile / (g.TH * g.TW), ty = tile / g.TW % g.TH, tx = tile % g.TW;
    for (int64_t k = 0; k < K; k += kL) {
      Vec s[2][4];
      for (int j = 0; j < 4; ++j) {
        auto at_ = [&](int i) { return Vec::loadu(m + ((i * 4 + j) * nt + t) * K + k); };
        const Vec m0 = at_(0), m1 = at_(1), m2 = at_(2), m3 = at_(3);
        s[0][j] = m0 + m1 + m2;
        s[1][j] = m1 - m2 - m3;
      }
      const Vec b = bias ? Vec::loadu(bias + k) : Vec(0.f);
      for (int i = 0; i < 2; ++i) {
        const int64_t y = 2 * ty + i;
        if (y >= g.H) break;
        for (int j = 0; j < 2; ++j) {
          const int64_t xx = 2 * tx + j;
          if (xx >= g.W) break;
          Vec o = (j == 0 ? s[i][0] + s[i][1] + s[i][2] : s[i][1] - s[i][2] - s[i][3]) + b;
          const int64_t off = ((n * g.H + y) * g.W + xx) * K + k;
          if (res) o = o + Vec::loadu(res + off);
          if (relu) o = at::vec::clamp_min(o, Vec(0.f));
          o.store(out + off);
        }
      }
    }
  }
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "skipfast.conv3x3_winograd";
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, op, ": x must be a 4-D float32 tensor, got ",
              x.scalar_type(), " of shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(u.dim() == 3 && u.size(0) == 16 && u.size(1) == C && u.scalar_type() == at::kFloat, op,
              ": u must be the float32 [16, ", C, ", K] transformed weight, got ", u.scalar_type(), " of shape ",
              u.sizes());
  const int64_t K = u.size(2);
  TORCH_CHECK(C % kL == 0 && K % kL == 0, op, ": channels must be multiples of ", kL, ", got ", C, " -> ", K);
  const Tiles g{x.size(0), x.size(2), x.size(3), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->scalar_type() == at::kFloat, op,
                ": bias must be float32 [", K, "], got ", bias->scalar_type(), " of shape ", bias->sizes());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.N, K, g.H, g.W}) && residual->scalar_type() == at::kFloat,
                op, ": residual must be float32 of the output's shape [", g.N, ", ", K, ", ", g.H, ", ", g.W,
                "], got ", residual->scalar_type(), " of shape ", residual->sizes());
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  auto xc = x.contiguous(cl);
  auto uc = u.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto rc = residual.has_value() ? residual->contiguous(cl) : at::Tensor();
  auto out = at::empty({g.N, K, g.H, g.W}, x.options().memory_format(cl));
  const int64_t T = g.count();
  if (T == 0) return out;
  // Blocks of K tiles (V and M about the size of U, so that the GEMMs amortize reading U;
  // measured best from 64 to 512 channels), fewer where that would leave a thread idle.
  const int64_t fit = std::max<int64_t>(32, K);
  const int64_t tb = std::max<int64_t>(1, std::min(fit, (T + at::get_num_threads() - 1) / at::get_num_threads()));
  const float* xp = xc.const_data_ptr<float>();
  const float* bp = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  const float* rp = rc.defined() ? rc.const_data_ptr<float>() : nullptr;
  float* op_ = out.mutable_data_ptr<float>();
  at::parallel_for(0, (T + tb - 1) / tb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * tb, nt = std::min(tb, T - t0);
      auto v = at::empty({16, nt, C}, xc.options());
      input_transform(xp, C, g, t0, nt, v.mutable_data_ptr<float>());
      const auto m = at::bmm(v, uc);  // single-threaded here: we are inside a parallel region
      output_transform(m.const_data_ptr<float>(), K, g, t0, nt, bp, rp, relu, op_);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CPU, m) { m.impl("conv3x3_winograd", &conv3x3_winograd_cpu); }

}  // namespace skipfast
