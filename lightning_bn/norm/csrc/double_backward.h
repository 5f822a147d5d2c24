// The double-backward path of the compiled norms' autograd nodes: under create_graph=True the
// backward differentiates the layer's plain definition y = f(x, weight, bias) in ATen ops.
#pragma once

#include <torch/autograd.h>

#include <array>
#include <vector>

namespace lightning_bn {

// grads[i] = d<y, g>/d tensors[i] (with a graph) for each of x, weight, bias that the node must
// differentiate. Only those that need a gradient are asked for: autograd refuses an input that
// does not require grad (a frozen parameter, or data entering the norm directly), which a
// Hessian-vector product with respect to some parameters or to activations alone meets.
inline void grads_of_definition(torch::autograd::AutogradContext* ctx, const at::Tensor& y,
                                const std::array<at::Tensor, 3>& tensors, const at::Tensor& g,
                                torch::autograd::variable_list& grads) {
  torch::autograd::variable_list inputs;
  std::vector<size_t> slots;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].defined() && ctx->needs_input_grad(i)) {
      inputs.push_back(tensors[i]);
      slots.push_back(i);
    }
  }
  if (inputs.empty()) return;
  const torch::autograd::variable_list d = torch::autograd::grad({y}, inputs, {g}, true, true, true);
  for (size_t k = 0; k < slots.size(); ++k) grads[slots[k]] = d[k];
}

}  // namespace lightning_bn
