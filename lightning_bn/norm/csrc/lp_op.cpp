// The op lightning_bn::lp_norm: lp normalization (p = 1, inf) of CPU tensors (N, C, ...) in
// training mode, with its autograd node written in C++ so a training step costs one call in
// forward and one in backward, as BatchNorm does (a Python autograd.Function adds ~10 us per
// call, as much as the arithmetic on an MLP's activations). Under create_graph=True (double
// backward, Hessian-vector products) the backward differentiates the plain definition instead,
// like lightning_bn.norm.lp_function.lp_normalize_reference, so second derivatives are exact.
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "double_backward.h"
#include "lp_kernels.h"

namespace lightning_bn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// y = gamma (x - mean) / d + beta, d = mean|c| + eps (p = 1) or max|c| + eps (inf), statistics over
// every dimension but 1, in ATen ops.
Tensor lp_reference(const Tensor& x, const Tensor& weight, const Tensor& bias, bool p_inf, double eps) {
  std::vector<int64_t> dims{0};
  for (int64_t i = 2; i < x.dim(); ++i) dims.push_back(i);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  const Tensor c = x.sub(x.mean(dims, true));
  const Tensor stat = p_inf ? c.abs().amax(dims, true) : c.abs().mean(dims, true);
  Tensor y = c.div(stat.add(eps));
  if (weight.defined()) y = y.mul(weight.view(shape));
  if (bias.defined()) y = y.add(bias.view(shape));
  return y;
}

struct LpNorm : public torch::autograd::Function<LpNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_stat, double momentum, bool p_inf, double eps) {
    auto [y, mean, d, k, row] = x.dim() == 2
                                    ? lp_flat_forward(x, weight, bias, running_mean, running_stat, momentum, p_inf, eps)
                                    : lp_maps_forward(x, weight, bias, running_mean, running_stat, momentum, p_inf, eps);
    ctx->save_for_backward({x, given(weight) ? *weight : Tensor(), given(bias) ? *bias : Tensor(), mean, d, k, row});
    ctx->saved_data["p_inf"] = p_inf;
    ctx->saved_data["eps"] = eps;
    return y;
  }

  // One gradient per forward argument: x, weight, bias, then none for the five non-differentiable.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const bool p_inf = ctx->saved_data["p_inf"].toBool();
    const Tensor& g = grad_outputs[0];
    variable_list grads(8);
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate the definition
      const Tensor y = lp_reference(x, weight, bias, p_inf, ctx->saved_data["eps"].toDouble());
      grads_of_definition(ctx, y, {x, weight, bias}, g, grads);
      return grads;
    }
    auto [dx, s, sum_g] = x.dim() == 2 ? lp_flat_backward(g, x, saved[3], saved[4], saved[5], saved[6], p_inf)
                                       : lp_maps_backward(g, x, saved[3], saved[4], saved[5], saved[6], p_inf);
    if (ctx->needs_input_grad(0)) grads[0] = dx;  // x is always the first differentiable input
    if (weight.defined()) grads[1] = s;
    if (bias.defined()) grads[2] = sum_g;
    return grads;
  }
};

Tensor lp_norm(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_stat, double momentum,
               bool p_inf, double eps) {
  return LpNorm::apply(x, weight, bias, running_mean, running_stat, momentum, p_inf, eps);
}

}  // namespace
}  // namespace lightning_bn

TORCH_LIBRARY_FRAGMENT(lightning_bn, m) {
  m.def(
      "lp_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_stat, "
      "float momentum, bool p_inf, float eps) -> Tensor");
}

// One kernel for autograd and execution (CPU only: the kernels check the device).
TORCH_LIBRARY_IMPL(lightning_bn, CompositeImplicitAutograd, m) { m.impl("lp_norm", &lightning_bn::lp_norm); }
