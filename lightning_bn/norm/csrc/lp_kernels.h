// lp normalization (p = 1, inf) of CPU tensors in training mode: the kernels for (N, C)
// activations (lp_flat_kernels.cpp) and for (N, C, ...) feature maps (lp_maps_kernels.cpp)
// behind the autograd op lightning_bn::lp_norm (lp_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace lightning_bn {

// Returns y, mean, d = stat + eps, k = gamma / d (1 / d without gamma), and for p = inf the row
// of max |x - mean| per channel (int64; empty for p = 1). Moves the running estimates (when
// given) toward this batch's mean and statistic (mean|c| or max|c|) by momentum.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lp_flat_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_stat, double momentum,
    bool p_inf, double eps);

// Returns dx, S = sum(g * x_hat) (the gradient of gamma) and sum(g) (the gradient of beta), from
// the forward's input and per-channel outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lp_flat_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& d,
    const at::Tensor& k, const at::Tensor& row, bool p_inf);

// The same for feature maps (N, C, *spatial); for p = inf the position of max |x - mean| is a
// flat index n * L + l within the channel (L = the spatial size).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lp_maps_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_stat, double momentum,
    bool p_inf, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lp_maps_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& d,
    const at::Tensor& k, const at::Tensor& where, bool p_inf);

}  // namespace lightning_bn
