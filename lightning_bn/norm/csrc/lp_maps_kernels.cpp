// lp normalization (p = 1, inf) of feature maps (N, C, L = H * W ...) in training mode: the
// forward and backward kernels declared in lp_kernels.h, channel by channel over the contiguous
// runs of L values, with several accumulators per run so GCC vectorizes the sums; each channel's
// sums are added up in double. The same formulas as lp_flat_kernels.cpp and
// lightning_bn/norm/lp_function.py (_LpNorm1OrInf), which documents them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "lp_kernels.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace lightning_bn {

using at::Tensor;

namespace {

constexpr int kLanes = 8;  // independent accumulators per run: a vector's worth or two

// sum(run), sum(|run - mu|): lanes of partial sums, then the tail.
template <typename scalar_t, typename acc_t>
acc_t run_sum(const scalar_t* __restrict__ run, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t l = 0;
  for (; l + kLanes <= len; l += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += run[l + k];
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; l < len; ++l) total += run[l];
  return total;
}

template <typename scalar_t, typename acc_t>
acc_t run_abs_centered_sum(const scalar_t* __restrict__ run, acc_t mu, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t l = 0;
  for (; l + kLanes <= len; l += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += std::abs(static_cast<acc_t>(run[l + k]) - mu);
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; l < len; ++l) total += std::abs(static_cast<acc_t>(run[l]) - mu);
  return total;
}

// max and min of a run, folded into top and bottom.
template <typename scalar_t, typename acc_t>
void run_extremes(const scalar_t* __restrict__ run, int64_t len, acc_t& top, acc_t& bottom) {
  acc_t high[kLanes], low[kLanes];
  for (int k = 0; k < kLanes; ++k) high[k] = low[k] = top;
  int64_t l = 0;
  for (; l + kLanes <= len; l += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      high[k] = std::max(high[k], static_cast<acc_t>(run[l + k]));
      low[k] = std::min(low[k], static_cast<acc_t>(run[l + k]));
    }
  }
  for (int k = 0; k < kLanes; ++k) {
    top = std::max(top, high[k]);
    bottom = std::min(bottom, low[k]);
  }
  for (; l < len; ++l) {
    top = std::max(top, static_cast<acc_t>(run[l]));
    bottom = std::min(bottom, static_cast<acc_t>(run[l]));
  }
}

// sum(g), sum(g (x - mu)) and sum(sign(x - mu)) of a run, added into the three totals.
template <typename scalar_t, typename acc_t>
void run_gradient_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, acc_t mu, int64_t len,
                       double& sum_g, double& sum_gc, double& sum_sign) {
  acc_t lg[kLanes] = {}, lgc[kLanes] = {}, ls[kLanes] = {};
  int64_t l = 0;
  for (; l + kLanes <= len; l += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t c = static_cast<acc_t>(x[l + k]) - mu;
      lg[k] += g[l + k];
      lgc[k] += g[l + k] * c;
      ls[k] += sign_of(c);
    }
  }
  for (; l < len; ++l) {
    const acc_t c = static_cast<acc_t>(x[l]) - mu;
    lg[0] += g[l];
    lgc[0] += g[l] * c;
    ls[0] += sign_of(c);
  }
  for (int k = 0; k < kLanes; ++k) {
    sum_g += lg[k];
    sum_gc += lgc[k];
    sum_sign += ls[k];
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lp_maps_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_stat, double momentum,
    bool p_inf, double eps) {
  TORCH_CHECK(input.dim() >= 3, "lp_maps: expected an (N, C, ...) feature map, got ", input.dim(), " dimensions");
  TORCH_CHECK(input.device().is_cpu(), "lp_maps: CPU kernel got a tensor on ", input.device());
  const Tensor x = input.contiguous();
  const int64_t n = x.size(0), channels = x.size(1), len = x.numel() / std::max<int64_t>(n * channels, 1);
  TORCH_CHECK(n * len >= 2, "lp_maps: needs at least 2 values per channel in training");
  Tensor y = at::empty_like(x);
  Tensor per_channel = at::empty({4, channels}, x.options());  // rows: mean, d, k, stat
  Tensor where = at::empty({p_inf ? channels : 0}, x.options().dtype(at::kLong));  // flat index in the channel
  const Tensor w = param_as(weight, x), b = param_as(bias, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lp_maps_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = per_channel.mutable_data_ptr<scalar_t>();
    int64_t* wherep = p_inf ? where.mutable_data_ptr<int64_t>() : nullptr;
    const double m = static_cast<double>(n * len);
    at::parallel_for(0, channels, channel_grain(n * len), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        auto run = [&](int64_t i) { return xp + (i * channels + c) * len; };
        double total = 0;
        for (int64_t i = 0; i < n; ++i) total += run_sum<scalar_t, acc_t>(run(i), len);
        const acc_t mu = static_cast<acc_t>(total / m);
        acc_t stat;
        if (!p_inf) {
          double dispersion = 0;
          for (int64_t i = 0; i < n; ++i) dispersion += run_abs_centered_sum<scalar_t, acc_t>(run(i), mu, len);
          stat = static_cast<acc_t>(dispersion / m);
        } else {  // max |c| = max(max(x) - mu, mu - min(x)), then the first position where it is attained
          acc_t top = run(0)[0], bottom = run(0)[0];
          for (int64_t i = 0; i < n; ++i) run_extremes<scalar_t, acc_t>(run(i), len, top, bottom);
          const bool up = top - mu >= mu - bottom;
          stat = up ? top - mu : mu - bottom;
          const acc_t target = up ? top : bottom;
          int64_t found = 0;
          for (int64_t i = 0, done = 0; i < n && !done; ++i) {
            const scalar_t* r = run(i);
            for (int64_t l = 0; l < len; ++l) {
              if (static_cast<acc_t>(r[l]) == target) {
                found = i * len + l;
                done = 1;
                break;
              }
            }
          }
          wherep[c] = found;
        }
        const acc_t d = stat + static_cast<acc_t>(eps);
        const acc_t k = (wp ? static_cast<acc_t>(wp[c]) : acc_t(1)) / d;
        const acc_t shift = bp ? static_cast<acc_t>(bp[c]) : acc_t(0);
        out[c] = static_cast<scalar_t>(mu);
        out[channels + c] = static_cast<scalar_t>(d);
        out[2 * channels + c] = static_cast<scalar_t>(k);
        out[3 * channels + c] = static_cast<scalar_t>(stat);
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* __restrict__ r = run(i);
          scalar_t* __restrict__ o = yp + (i * channels + c) * len;
          for (int64_t l = 0; l < len; ++l) o[l] = static_cast<scalar_t>((r[l] - mu) * k + shift);
        }
      }
    });
  });
  update_running(running_mean, per_channel[0], momentum);
  update_running(running_stat, per_channel[3], momentum);
  return {y, per_channel[0], per_channel[1], per_channel[2], where};
}

std::tuple<Tensor, Tensor, Tensor> lp_maps_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& d, const Tensor& k,
    const Tensor& where, bool p_inf) {
  TORCH_CHECK(input.device().is_cpu() && grad_output.device().is_cpu(), "lp_maps_backward: CPU tensors only");
  const Tensor x = input.contiguous();
  const Tensor g = grad_output.contiguous().to(x.scalar_type());
  TORCH_CHECK(g.sizes() == x.sizes(), "lp_maps_backward: gradient shape ", g.sizes(), " != input ", x.sizes());
  const int64_t n = x.size(0), channels = x.size(1), len = x.numel() / std::max<int64_t>(n * channels, 1);
  Tensor dx = at::empty_like(x);
  Tensor sums = at::empty({2, channels}, x.options());  // rows: S, sum(g)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lp_maps_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = g.const_data_ptr<scalar_t>();
    const scalar_t *meanp = mean.const_data_ptr<scalar_t>(), *dp = d.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const int64_t* wherep = p_inf ? where.const_data_ptr<int64_t>() : nullptr;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* out = sums.mutable_data_ptr<scalar_t>();
    const double m = static_cast<double>(n * len);
    at::parallel_for(0, channels, channel_grain(n * len), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t mu = meanp[c], kk = kp[c];
        double sum_g = 0, sum_gc = 0, sum_sign = 0;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t at = (i * channels + c) * len;
          run_gradient_sums<scalar_t, acc_t>(xp + at, gp + at, mu, len, sum_g, sum_gc, sum_sign);
        }
        const double s = sum_gc / static_cast<double>(dp[c]);
        out[c] = static_cast<scalar_t>(s);
        out[channels + c] = static_cast<scalar_t>(sum_g);
        // the argmax's offset in x (p = inf): sample wherep[c] / len, position wherep[c] % len
        const int64_t argmax = p_inf ? ((wherep[c] / len) * channels + c) * len + wherep[c] % len : 0;
        const double u = p_inf ? sign_of(static_cast<acc_t>(xp[argmax]) - mu) : 0.0;
        double lin, cst;
        input_gradient_coefficients<double>(p_inf, kk, s, m, sum_g, sum_sign, u, lin, cst);
        const acc_t lin_a = static_cast<acc_t>(lin), cst_a = static_cast<acc_t>(cst);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t at = (i * channels + c) * len;
          const scalar_t* __restrict__ xr = xp + at;
          const scalar_t* __restrict__ gr = gp + at;
          scalar_t* __restrict__ dr = dxp + at;
          if (!p_inf) {
            for (int64_t l = 0; l < len; ++l)
              dr[l] = static_cast<scalar_t>(kk * gr[l] + cst_a - lin_a * sign_of(static_cast<acc_t>(xr[l]) - mu));
          } else {
            for (int64_t l = 0; l < len; ++l) dr[l] = static_cast<scalar_t>(kk * gr[l] + cst_a);
          }
        }
        if (p_inf) dxp[argmax] -= static_cast<scalar_t>(lin);
      }
    });
  });
  return {dx, sums[0], sums[1]};
}

}  // namespace lightning_bn
