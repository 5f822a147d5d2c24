// The op lightning_bn::noisy_batch_norm: BatchNorm in training mode with the step's noise folded
// into its affine map, and its autograd node, in C++. Forward draws the noise, folds it and runs
// BatchNorm's fused kernel; backward is BatchNorm's backward plus the chain rule through the
// folding. The same ATen calls in the same order as the Python path (lightning_bn/norm/noisy.py
// and noisy_function.py), so both draw the same random numbers and give bit-identical values;
// here each costs the C++ dispatcher's fraction of a microsecond instead of Python's few, and
// the node saves the ~10 us a Python autograd.Function adds per call. Under create_graph=True
// (double backward) the backward differentiates the same computation in ATen ops.
#include <ATen/Dispatch.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/ops/rand.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "double_backward.h"

namespace lightning_bn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// BatchNorm's affine map with the noise folded in, (gamma * scale, beta * scale + shift), in ATen
// ops: differentiable (the double-backward path), and rounded exactly as the Python path's
// (ATen's addcmul may fuse the multiply-add, a loop here would not).
std::tuple<Tensor, Tensor> fold_noise(const Tensor& weight, const Tensor& bias, const Tensor& shift,
                                      const Tensor& scale) {
  return {weight.defined() ? at::mul(weight, scale) : scale,
          bias.defined() ? at::addcmul(shift, bias, scale) : shift};
}

// The step's realization as a fresh contiguous (2, C) tensor (shifts, scales): low + span * U(0, 1)
// per row with the scale row exponentiated (ATen's exp, as the Python path), copied into `noise`;
// with replay the draw is made and discarded (the same use of the RNG) and the realization is a
// copy of `noise`.
Tensor draw(const Tensor& noise, const Tensor& low, const Tensor& span, bool replay) {
  Tensor uniform = at::rand(noise.sizes(), noise.options());
  if (replay) return noise.clone();
  Tensor realization = at::addcmul_out(uniform, low, uniform, span);
  realization.select(0, 1).exp_();
  noise.copy_(realization);
  return realization;
}

// t *= scale (C values): a loop for contiguous float/double, where ATen's mul_ costs more in dispatch.
Tensor scale_in_place(Tensor t, const Tensor& scale) {
  const auto type = t.scalar_type();
  if ((type != at::kFloat && type != at::kDouble) || scale.scalar_type() != type || !t.is_contiguous() ||
      t.numel() != scale.numel()) {
    return t.mul_(scale);
  }
  AT_DISPATCH_FLOATING_TYPES(type, "scale_in_place", [&] {
    scalar_t* tp = t.mutable_data_ptr<scalar_t>();
    const auto sc = scale.accessor<const scalar_t, 1>();
    for (int64_t c = 0; c < t.numel(); ++c) tp[c] *= sc[c];
  });
  return t;
}

struct NoisyBatchNorm : public torch::autograd::Function<NoisyBatchNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const Tensor& noise, const Tensor& low, const Tensor& span,
                        bool replay, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, double momentum, double eps) {
    const Tensor realization = draw(noise, low, span, replay);
    const Tensor used = realization.scalar_type() == x.scalar_type() ? realization : realization.to(x.scalar_type());
    const Tensor w = given(weight) ? *weight : Tensor(), b = given(bias) ? *bias : Tensor();
    auto [folded_w, folded_b] = fold_noise(w, b, used.select(0, 0), used.select(0, 1));
    auto [y, save_mean, save_invstd] =
        at::native_batch_norm(x, folded_w, folded_b, running_mean, running_var, true, momentum, eps);
    ctx->save_for_backward({x, w, b, used, folded_w, save_mean, save_invstd});
    ctx->saved_data["eps"] = eps;
    return y;
  }

  // One gradient per forward argument: x, weight, bias, then none for the eight others.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &used = saved[3];
    const Tensor scale = used.select(0, 1);
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor& g = grad_outputs[0];
    variable_list grads(11);
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate the computation itself
      auto [folded_w, folded_b] = fold_noise(weight, bias, used.select(0, 0), scale);
      const Tensor y = at::batch_norm(x, folded_w, folded_b, {}, {}, true, 0.0, eps, false);
      grads_of_definition(ctx, y, {x, weight, bias}, g, grads);
      return grads;
    }
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), weight.defined(), bias.defined()};
    auto [dx, d_folded_w, d_folded_b] = at::native_batch_norm_backward(
        g, x, saved[4], std::nullopt, std::nullopt, saved[5], saved[6], true, eps, mask);
    grads[0] = dx;
    // d(gamma * scale) / d gamma = scale = d(beta * scale + shift) / d beta
    if (weight.defined()) grads[1] = scale_in_place(d_folded_w, scale);
    if (bias.defined()) grads[2] = scale_in_place(d_folded_b, scale);
    return grads;
  }
};

// Counts the batch and picks BatchNorm's running-average factor as torch's BatchNorm.forward does
// (momentum, or 1 / batches for the cumulative average when momentum is None), then applies.
Tensor noisy_batch_norm(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        const Tensor& noise, const Tensor& low, const Tensor& span, bool replay,
                        const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                        const std::optional<Tensor>& num_batches_tracked, std::optional<double> momentum,
                        double eps) {
  double factor = momentum.value_or(0.0);
  if (given(running_mean) && given(num_batches_tracked)) {
    num_batches_tracked->add_(1);
    if (!momentum.has_value()) factor = 1.0 / num_batches_tracked->item<double>();
  }
  return NoisyBatchNorm::apply(x, weight, bias, noise, low, span, replay, running_mean, running_var, factor, eps);
}

}  // namespace
}  // namespace lightning_bn

TORCH_LIBRARY_FRAGMENT(lightning_bn, m) {
  m.def(
      "noisy_batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) noise, Tensor noise_low, "
      "Tensor noise_span, bool replay, Tensor(b!)? running_mean, Tensor(c!)? running_var, "
      "Tensor(d!)? num_batches_tracked, float? momentum, float eps) -> Tensor");
}

// One kernel for autograd and execution. Registered for every backend (the ATen calls dispatch on
// the device), but lightning_bn.norm.kernels.usable sends only CPU tensors here.
TORCH_LIBRARY_IMPL(lightning_bn, CompositeImplicitAutograd, m) {
  m.impl("noisy_batch_norm", &lightning_bn::noisy_batch_norm);
}
