// bn_act in eager mode, in one call from Python. Training: the training kernel
// (bn_act_train on the input's device), its autograd node and the running-statistics
// update. The Python route for the same work (torch.autograd.Function plus in-place
// updates, skipfast/ops/bn_act.py) costs about 100 us of host time per call, as much as
// the kernels of a 7x7 ResNet stage. Same saved tensors and same backward phases as the
// registered autograd, which torch.compile traces instead of these ops. Eval: the inverse
// standard deviation of the running variance, then bn_act_apply.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "bn_act.h"

namespace skipfast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const auto& train_op() {
  static const auto h = op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool)>("skipfast::bn_act_train");
  return h;
}

const auto& apply_op() {
  static const auto h = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                      const OptTensor&, const OptTensor&, bool)>(
      "skipfast::bn_act_apply");
  return h;
}

const auto& reduce_op() {
  static const auto h = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const OptTensor&)>("skipfast::bn_act_backward_reduce");
  return h;
}

const auto& elemt_op() {
  static const auto h =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&, int64_t, bool)>(
          "skipfast::bn_act_backward_elemt");
  return h;
}

OptTensor opt_if(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The phase ops have no derivatives of their own: with create_graph=True (grad mode on in
// backward) a second derivative through them would silently miss terms, so it is refused.
void check_first_order(const Tensor& grad, std::initializer_list<Tensor> saved) {
  if (!at::GradMode::is_enabled()) return;
  bool wants = grad.requires_grad();
  for (const Tensor& t : saved) wants = wants || (t.defined() && t.requires_grad());
  TORCH_CHECK(!wants, "skipfast.batch_norm_act: second derivatives are not supported (the fused backward is not ",
              "differentiable); create_graph=True needs the reference backend, SKIPFAST_BACKEND=reference");
}

bool wants_grad(const OptTensor& t) { return t && t->requires_grad(); }

// Forward returns (out, mean, var); mean and var are not differentiable.
struct TrainFn : public torch::autograd::Function<TrainFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, double eps, bool relu) {
    // Function::apply only turns grad mode off: without this guard the call would reach
    // bn_act_train's registered (Python) autograd kernel.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var, invstd, mask] = train_op().call(x, weight, bias, residual, eps, relu);
    ctx->save_for_backward({x, weight.value_or(Tensor()), mean, invstd, relu ? mask : Tensor()});
    ctx->saved_data["relu"] = relu;
    // bit i: input i of (x, weight, bias, residual) wants a gradient (the last three may be absent)
    ctx->saved_data["needs"] = int64_t(x.requires_grad()) | int64_t(wants_grad(weight)) << 1 |
                               int64_t(wants_grad(bias)) << 2 | int64_t(wants_grad(residual)) << 3;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);  // no zero tensors for mean and var's (absent) gradients
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3], &mask = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    const int64_t needs = ctx->saved_data["needs"].toInt();
    const bool need_x = needs & 1, need_w = needs & 2, need_b = needs & 4, need_r = needs & 8;
    const Tensor& grad_out = grads[0];
    variable_list result(6);
    if (!grad_out.defined()) return result;
    check_first_order(grad_out, {x, weight});
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the phase ops have no autograd of their own
    auto [sum_dy, sum_dy_xhat] = reduce_op().call(grad_out, x, mean, invstd, opt_if(mask));
    if (need_x || (need_r && relu)) {
      auto [gx, gr] = elemt_op().call(grad_out, x, mean, invstd, opt_if(weight), opt_if(mask), sum_dy, sum_dy_xhat,
                                      x.numel() / x.size(1), need_r && relu);
      if (need_x) result[0] = gx;
      if (need_r && relu) result[3] = gr;
    }
    if (need_r && !relu) result[3] = grad_out;
    if (need_w) result[1] = sum_dy_xhat;
    if (need_b) result[2] = sum_dy;
    return result;
  }
};

// conv2d(relu(bn(x)), conv_weight) in training, saving x and the per-channel statistics but
// not the activation: backward recomputes it with one apply pass. The same as _BnReluConv2d
// of skipfast/ops/bn_act.py (which torch.compile and the other backends take). Forward
// returns (y, mean, var); mean and var are not differentiable.
struct BnReluConvFn : public torch::autograd::Function<BnReluConvFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const Tensor& conv_weight, double eps,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [a, mean, var, invstd, mask] = train_op().call(x, weight, bias, std::nullopt, eps, true);
    Tensor y = at::conv2d(a, conv_weight, {}, stride, padding, dilation, groups);
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), conv_weight, mean, invstd});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    // bit i: input i of (x, weight, bias, conv_weight) wants a gradient
    ctx->saved_data["needs"] = int64_t(x.requires_grad()) | int64_t(wants_grad(weight)) << 1 |
                               int64_t(wants_grad(bias)) << 2 | int64_t(conv_weight.requires_grad()) << 3;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &conv_weight = saved[3], &mean = saved[4],
                 &invstd = saved[5];
    const int64_t needs = ctx->saved_data["needs"].toInt();
    const bool need_x = needs & 1, need_w = needs & 2, need_b = needs & 4, need_cw = needs & 8;
    const Tensor& grad_y = grads[0];
    variable_list result(9);
    if (!grad_y.defined()) return result;
    check_first_order(grad_y, {x, weight, bias, conv_weight});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [a, mask] = apply_op().call(x, mean, invstd, opt_if(weight), opt_if(bias), std::nullopt, true);
    const bool need_bn = need_x || need_w || need_b;
    auto [grad_a, grad_cw, unused] = at::convolution_backward(
        grad_y, a, conv_weight, std::nullopt, ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(), false, {0, 0},
        ctx->saved_data["groups"].toInt(), {need_bn, need_cw, false});
    if (need_bn) {
      auto [sum_dy, sum_dy_xhat] = reduce_op().call(grad_a, x, mean, invstd, mask);
      if (need_x) {
        result[0] = std::get<0>(elemt_op().call(grad_a, x, mean, invstd, opt_if(weight), mask, sum_dy, sum_dy_xhat,
                                                x.numel() / x.size(1), false));
      }
      if (need_w) result[1] = sum_dy_xhat;
      if (need_b) result[2] = sum_dy;
    }
    if (need_cw) result[3] = grad_cw;
    return result;
  }
};

// running_mean and running_var: both absent or both 1-D tensors of C floating-point values
// on `device` (any floating dtype: they are updated in their own).
void check_running(const char* op, int64_t C, const c10::Device& device, const OptTensor& running_mean,
                   const OptTensor& running_var) {
  TORCH_CHECK_VALUE(bool(bn_act::opt(running_mean)) == bool(bn_act::opt(running_var)), op,
                    ": running_mean and running_var must both be tensors or both be None");
  for (const auto& [name, t] : {std::pair{"running_mean", bn_act::opt(running_mean)},
                                std::pair{"running_var", bn_act::opt(running_var)}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have ", C,
                      " values (one per channel), got shape ", t->sizes());
    check_floating(op, name, *t);
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " must be on ", device, ", got ", t->device());
  }
}

// The float32 CPU tensors that the loops below read and write in place of ATen ops.
bool plain_cpu_float(const Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && !t.requires_grad() &&
         !t.is_inference();
}

// running = (1 - momentum) * running + momentum * factor * batch, in place: a loop for
// float32 CPU tensors, ATen's in-place ops elsewhere.
void update_running(const Tensor& running, const Tensor& batch, double momentum, double factor) {
  if (plain_cpu_float(running) && plain_cpu_float(batch)) {
    float* r = running.mutable_data_ptr<float>();
    const float* b = batch.const_data_ptr<float>();
    const float keep = float(1 - momentum), take = float(momentum * factor);
    for (int64_t c = 0; c < running.numel(); ++c) r[c] = r[c] * keep + b[c] * take;
    running.unsafeGetTensorImpl()->bump_version();  // as an in-place op does
    return;
  }
  at::NoGradGuard no_grad;
  running.mul_(1 - momentum).add_(batch.to(running.scalar_type()), momentum * factor);
}

// Both running statistics, when given, from a batch's mean and biased variance over `count`
// values per channel: running = (1 - momentum) * running + momentum * batch (unbiased
// variance), as torch.
void update_running_stats(const OptTensor& running_mean, const OptTensor& running_var, const Tensor& mean,
                          const Tensor& var, double momentum, int64_t count) {
  if (!bn_act::opt(running_mean)) return;
  update_running(*running_mean, mean, momentum, 1.0);
  update_running(*running_var, var, momentum, double(count) / double(count - 1));
}

// Training: the kernel and its autograd node, then the running statistics. Every argument is
// checked before any state changes.
Tensor train_eager(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                   const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
                   bool relu) {
  constexpr const char* op = "skipfast.bn_act_train_eager";
  bn_act::check_x(op, x);
  bn_act::check_train_args(op, x, weight, bias, residual);
  check_running(op, x.size(1), x.device(), running_mean, running_var);
  auto outs = TrainFn::apply(x, weight, bias, residual, eps, relu);
  update_running_stats(running_mean, running_var, outs[1], outs[2], momentum, x.numel() / x.size(1));
  return outs[0];
}

// The running-statistics update of a training step whose kernels ran elsewhere (the BN +
// ReLU + convolution path of skipfast/ops/bn_act.py): one call instead of four in-place ops.
void update_running_eager(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                          const Tensor& var, double momentum, int64_t count) {
  constexpr const char* op = "skipfast.bn_act_update_running";
  TORCH_CHECK_VALUE(count > 1, op, ": count must be above 1 (values per channel), got ", count);
  TORCH_CHECK_VALUE(mean.dim() == 1 && var.sizes() == mean.sizes() && mean.device() == var.device(), op,
                    ": mean and var must be 1-D tensors of one shape on one device, got ", mean.sizes(), " on ",
                    mean.device(), " and ", var.sizes(), " on ", var.device());
  check_running(op, mean.size(0), mean.device(), running_mean, running_var);
  update_running_stats(running_mean, running_var, mean, var, momentum, count);
}

// Eval: bn_act_apply with mean = running_mean and invstd = 1 / sqrt(running_var + eps), in
// the dtype of the per-channel tensors (float32 CPU: one loop; elsewhere ATen ops, which
// autograd records when the running statistics require gradients).
Tensor eval_eager(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                  const Tensor& running_mean, const Tensor& running_var, double eps, bool relu) {
  constexpr const char* op = "skipfast.bn_act_eval_eager";
  bn_act::check_x(op, x);
  check_running(op, x.size(1), x.device(), running_mean, running_var);  // the apply op checks the rest
  const auto sd = bn_act::stat_dtype(x);
  const Tensor mean = running_mean.to(sd);
  Tensor invstd;
  if (sd == at::kFloat && plain_cpu_float(running_var)) {
    invstd = at::empty_like(running_var);
    const float* v = running_var.const_data_ptr<float>();
    float* out = invstd.mutable_data_ptr<float>();
    for (int64_t c = 0; c < invstd.numel(); ++c) out[c] = float(bn_act::invstd_of<double>(v[c], eps));
  } else {
    invstd = at::rsqrt(running_var.to(sd) + eps);
  }
  if (at::GradMode::is_enabled() && (x.requires_grad() || mean.requires_grad() || invstd.requires_grad() ||
                                     wants_grad(weight) || wants_grad(bias) || wants_grad(residual))) {
    return std::get<0>(apply_op().call(x, mean, invstd, weight, bias, residual, relu));  // through autograd
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return std::get<0>(apply_op().call(x, mean, invstd, weight, bias, residual, relu));
}

// ---- BatchNormAct2d in eager mode ----
// The module's forward and then_conv, each in one call: the checks of skipfast/ops/bn_act.py's
// _validate (the functional API's), with its exception types and messages, then
// num_batches_tracked counted (only for an accepted call), then the entries above. In Python
// those checks and the count cost more host time than a small layer's kernels.

constexpr const char* kOp = "skipfast.batch_norm_act";

std::string py_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// torch's batch norm takes per-channel tensors of x's dtype, or float32 ones for a float16
// or bfloat16 x.
bool half_or_bf16(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
bool param_dtype_ok(at::ScalarType x, at::ScalarType p) { return p == x || (half_or_bf16(x) && p == at::kFloat); }

void check_module_args(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                       const OptTensor& running_var, const OptTensor& residual, bool training) {
  TORCH_CHECK_TYPE(x.is_floating_point(), kOp, ": x must be a floating-point tensor, got dtype ",
                   py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be 4-D, got ", x.dim(), "-D tensor of shape ", py_shape(x.sizes()));
  const int64_t C = x.size(1);
  const Tensor* param = nullptr;  // the first one given
  for (const auto& [name, t] : {std::pair{"weight", bn_act::opt(weight)}, std::pair{"bias", bn_act::opt(bias)},
                                std::pair{"running_mean", bn_act::opt(running_mean)},
                                std::pair{"running_var", bn_act::opt(running_var)}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->is_floating_point(), kOp, ": ", name, " must be a floating-point tensor, got dtype ",
                     py_dtype(t->scalar_type()));
    TORCH_CHECK_VALUE(t->dim() == 1, kOp, ": ", name, " must be 1-D, got ", t->dim(), "-D tensor of shape ",
                      py_shape(t->sizes()));
    TORCH_CHECK_VALUE(t->size(0) == C, kOp, ": ", name, " must have ", C, " values (one per channel of x), got shape ",
                      py_shape(t->sizes()));
    TORCH_CHECK_VALUE(t->device() == x.device(), kOp, ": ", name, " must be on the device of x (", x.device(),
                      "), got ", t->device());
    TORCH_CHECK_TYPE(param_dtype_ok(x.scalar_type(), t->scalar_type()), kOp, ": ", name, " must have the dtype of x (",
                     py_dtype(x.scalar_type()), ")", half_or_bf16(x.scalar_type()) ? " or float32" : "",
                     ", as torch's batch norm requires, got ", py_dtype(t->scalar_type()));
    if (param == nullptr) param = t;
    TORCH_CHECK_TYPE(t->scalar_type() == param->scalar_type(), kOp,
                     ": weight, bias, running_mean and running_var must share one dtype, as torch's batch norm requires, "
                     "got ", py_dtype(param->scalar_type()), " and ", py_dtype(t->scalar_type()));
  }
  TORCH_CHECK_VALUE(bool(bn_act::opt(running_mean)) == bool(bn_act::opt(running_var)), kOp,
                    ": running_mean and running_var must both be tensors or both be None");
  TORCH_CHECK_VALUE(training || bn_act::opt(running_mean), kOp,
                    ": running_mean and running_var must be defined in evaluation mode (training=False)");
  if (const Tensor* r = bn_act::opt(residual)) {
    TORCH_CHECK_TYPE(r->is_floating_point(), kOp, ": residual must be a floating-point tensor, got dtype ",
                     py_dtype(r->scalar_type()));
    TORCH_CHECK_VALUE(r->sizes() == x.sizes(), kOp, ": residual must have the shape of x ", py_shape(x.sizes()),
                      ", got ", py_shape(r->sizes()));
    TORCH_CHECK_TYPE(r->scalar_type() == x.scalar_type(), kOp, ": residual must have the dtype of x (",
                     py_dtype(x.scalar_type()), "), got ", py_dtype(r->scalar_type()));
    TORCH_CHECK_VALUE(r->device() == x.device(), kOp, ": residual must be on the device of x (", x.device(),
                      "), got ", r->device());
  }
  // torch's message (F.batch_norm)
  TORCH_CHECK_VALUE(!training || x.numel() / std::max<int64_t>(C, 1) != 1,
                    "Expected more than 1 value per channel when training, got input size torch.Size([",
                    c10::Join(", ", x.sizes()), "])");
}

// Under autocast a residual of another floating dtype is cast to x's (bn_act.autocast_promote).
OptTensor autocast_residual(const Tensor& x, const OptTensor& residual) {
  const Tensor* r = bn_act::opt(residual);
  if (r && r->scalar_type() != x.scalar_type() && x.is_floating_point() && r->is_floating_point() &&
      at::autocast::is_autocast_enabled(x.device().type())) {
    return r->to(x.scalar_type());
  }
  return residual;
}

// A weight or bias in the dtype of the per-channel tensors the kernels take.
OptTensor in_dtype(const OptTensor& t, at::ScalarType dtype) {
  const Tensor* p = bn_act::opt(t);
  return p && p->scalar_type() != dtype ? OptTensor(p->to(dtype)) : t;
}

// num_batches_tracked += 1 (when given); the momentum of this step: `momentum`, or with
// momentum None (a cumulative moving average) 1 / num_batches_tracked, as nn.BatchNorm2d.
double count_batch(const OptTensor& num_batches_tracked, std::optional<double> momentum) {
  const Tensor* n = bn_act::opt(num_batches_tracked);
  if (n == nullptr) return momentum.value_or(0.0);
  if (n->device().is_cpu() && n->scalar_type() == at::kLong && n->numel() == 1 && !n->is_inference()) {
    ++*n->mutable_data_ptr<int64_t>();
    n->unsafeGetTensorImpl()->bump_version();  // as add_ does
  } else {
    at::NoGradGuard no_grad;
    n->add_(1);
  }
  return momentum ? *momentum : 1.0 / n->item<double>();
}

// BatchNormAct2d.forward: training (batch statistics, running statistics updated) or eval.
Tensor forward_eager(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                     const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& num_batches_tracked, bool training, std::optional<double> momentum, double eps,
                     bool relu) {
  const OptTensor r = autocast_residual(x, residual);
  check_module_args(x, weight, bias, running_mean, running_var, r, training);
  const auto sd = bn_act::stat_dtype(x);
  const OptTensor w = in_dtype(weight, sd), b = in_dtype(bias, sd);
  if (!training) return eval_eager(x, w, b, r, *running_mean, *running_var, eps, relu);
  return train_eager(x, w, b, r, running_mean, running_var, count_batch(num_batches_tracked, momentum), eps, relu);
}

// What at::conv2d would reject, checked before num_batches_tracked is counted.
void check_conv(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(w.dim() == 4 && w.scalar_type() == x.scalar_type() && w.device() == x.device(), kOp,
                    ": conv_weight must be a 4-D tensor of the dtype and device of x (", py_dtype(x.scalar_type()),
                    ", ", x.device(), "), got ", w.dim(), "-D ", py_dtype(w.scalar_type()), " on ", w.device());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(groups > 0 && C % groups == 0 && w.size(0) % groups == 0 && w.size(1) * groups == C, kOp,
                    ": conv_weight of shape ", py_shape(w.sizes()), " with groups=", groups, " cannot take the ", C,
                    " channels of x");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0, kOp,
                      ": the convolution's stride and dilation must be positive and its padding non-negative, got ",
                      "stride ", stride, ", padding ", padding, ", dilation ", dilation);
    TORCH_CHECK_VALUE(x.size(2 + d) + 2 * padding[d] >= dilation[d] * (w.size(2 + d) - 1) + 1, kOp,
                      ": the convolution's kernel ", py_shape(w.sizes().slice(2)), " (dilation ", dilation,
                      ") is larger than x's padded input ", py_shape(x.sizes().slice(2)), " + 2 x ", padding);
  }
}

// conv2d(relu(bn(x)), conv_weight) in training (BnReluConvFn), then the running-statistics
// update: BatchNormAct2d.then_conv and batch_norm_relu_conv2d. Every argument is checked
// before any state changes.
Tensor relu_conv2d_eager(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var,
                         const OptTensor& num_batches_tracked, const Tensor& conv_weight,
                         std::optional<double> momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  check_module_args(x, weight, bias, running_mean, running_var, std::nullopt, /*training=*/true);
  check_conv(x, conv_weight, stride, padding, dilation, groups);
  const auto sd = bn_act::stat_dtype(x);
  const OptTensor w = in_dtype(weight, sd), b = in_dtype(bias, sd);
  const double m = count_batch(num_batches_tracked, momentum);
  auto outs = BnReluConvFn::apply(x, w, b, conv_weight, eps, stride.vec(), padding.vec(), dilation.vec(), groups);
  update_running_stats(running_mean, running_var, outs[1], outs[2], m, x.numel() / x.size(1));
  return outs[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(skipfast, CompositeImplicitAutograd, m) {
  m.impl("bn_act_train_eager", &train_eager);
  m.impl("bn_act_eval_eager", &eval_eager);
  m.impl("bn_act_update_running", &update_running_eager);
  m.impl("bn_act_relu_conv2d_eager", &relu_conv2d_eager);
  m.impl("bn_act_forward_eager", &forward_eager);
}

}  // namespace skipfast
