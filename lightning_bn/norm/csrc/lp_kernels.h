// lp normalization (p = 1, inf) of CPU tensors in training mode: the kernels for (N, C)
// activations (lp_flat_kernels.cpp) and for (N, C, ...) feature maps (lp_maps_kernels.cpp)
// behind the autograd op lightning_bn::lp_norm (lp_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

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

// ---- shared by the two kernel files ----

// sign(v) in arithmetic without branches, so the loops over it vectorize.
template <typename T>
inline T sign_of(T v) {
  return static_cast<T>(v > T(0)) - static_cast<T>(v < T(0));
}

// Channels per parallel task: small inputs stay on one thread (a task costs microseconds).
inline int64_t channel_grain(int64_t values_per_channel) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(values_per_channel, 1));
}

// A weight or bias as a contiguous tensor of x's dtype; undefined when not given.
at::Tensor param_as(const std::optional<at::Tensor>& t, const at::Tensor& x);

// running = lerp(running, batch, momentum) with torch's lerp rounding, as BatchNorm's kernel moves
// its running estimates in its forward (a no-op when running is not given).
void update_running(const std::optional<at::Tensor>& running, const at::Tensor& batch, double momentum);

// The input gradient of one channel of m values, from S = sum(g * x_hat), sum(g) and sum(sign(c)):
//   p = 1:   dx = k g + cst - lin sign(c),  lin = k S / m,  cst = lin mean(sign) - k mean(g)
//   p = inf: dx = k g + cst, minus lin at the argmax,  lin = k S u,  cst = (lin - k sum(g)) / m
// (u = sign(c) at the argmax). Derivation: lightning_bn/norm/lp_function.py.
template <typename T>
inline void input_gradient_coefficients(bool p_inf, T k, T s, T m, T sum_g, T sum_sign, T u, T& lin, T& cst) {
  if (!p_inf) {
    lin = k * s / m;
    cst = lin * sum_sign / m - k * sum_g / m;
  } else {
    lin = k * s * u;
    cst = (lin - k * sum_g) / m;
  }
}

}  // namespace lightning_bn
