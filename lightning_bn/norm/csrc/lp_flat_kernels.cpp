// lp normalization (p = 1, inf) of (N, C) activations in training mode: the forward and backward
// kernels declared in lp_kernels.h, as passes over rows with per-channel sums in float (double for
// double inputs) over blocks of rows, added up in double. The same formulas as lightning_bn/norm/lp_function.py (_LpNorm1OrInfFlat),
// which documents them; here each is a loop instead of some ten ATen ops, because on small
// activations (an MLP's 128 x 32) the per-op dispatch, not the arithmetic, is what costs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "lp_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace lightning_bn {

using at::Tensor;

namespace {

void check_input(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "lp_flat: expected an (N, C) input, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.device().is_cpu(), "lp_flat: CPU kernel got a tensor on ", x.device());
  TORCH_CHECK(x.size(0) >= 2, "lp_flat: needs at least 2 rows in training, got ", x.size(0));
  TORCH_CHECK(x.size(0) <= (1 << 24), "lp_flat: more than 2^24 rows; the Python path handles them");
}

// Sums over rows in blocks: each block of kBlockRows rows accumulates in acc_t (float for float
// inputs, so the row loops vectorize) and is then added into double totals, so the rounding error
// grows with kBlockRows + n / kBlockRows rather than n. add_rows(i0, i1) adds rows [i0, i1) into
// acc[0, count); acc ends up holding the totals.
constexpr int64_t kBlockRows = 256;

template <typename acc_t, typename AddRows>
void blocked_row_sums(int64_t n, acc_t* acc, int64_t count, const AddRows& add_rows) {
  std::vector<double> total(count, 0.0);
  for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
    std::fill(acc, acc + count, acc_t(0));
    add_rows(i0, std::min(n, i0 + kBlockRows));
    for (int64_t k = 0; k < count; ++k) total[k] += acc[k];
  }
  for (int64_t k = 0; k < count; ++k) acc[k] = static_cast<acc_t>(total[k]);
}

// Row kernels: one row of a (N, C) block against per-channel arrays. Separate functions because
// GCC trusts __restrict__ on parameters (not on locals), and without it the loops over channels
// are not vectorized.
template <typename scalar_t, typename acc_t>
void add_row(const scalar_t* __restrict__ xr, acc_t* __restrict__ acc, int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] += xr[j];
}

template <typename scalar_t, typename acc_t>
void add_abs_centered_row(const scalar_t* __restrict__ xr, const acc_t* __restrict__ mu, acc_t* __restrict__ acc,
                          int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] += std::abs(static_cast<acc_t>(xr[j]) - mu[j]);
}

// Sum, max and min per channel in one pass (p = inf).
template <typename scalar_t, typename acc_t>
void add_extremes_row(const scalar_t* __restrict__ xr, acc_t* __restrict__ acc, acc_t* __restrict__ top,
                      acc_t* __restrict__ bottom, int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    const acc_t v = xr[j];
    acc[j] += v;
    top[j] = std::max(top[j], v);
    bottom[j] = std::min(bottom[j], v);
  }
}

// row[j] = i where x == target: called from the last row to the first, it leaves the first such
// row. Rows as acc_t and an equality test (quiet, unlike < and >), so GCC vectorizes the select.
template <typename scalar_t, typename acc_t>
void find_row(const scalar_t* __restrict__ xr, acc_t i, const acc_t* __restrict__ target, acc_t* __restrict__ row,
              int64_t width) {
  for (int64_t j = 0; j < width; ++j) row[j] = static_cast<acc_t>(xr[j]) == target[j] ? i : row[j];
}

template <typename scalar_t, typename acc_t>
void affine_row(const scalar_t* __restrict__ xr, const acc_t* __restrict__ mu, const acc_t* __restrict__ k,
                const acc_t* __restrict__ shift, scalar_t* __restrict__ yr, int64_t width) {
  for (int64_t j = 0; j < width; ++j) yr[j] = static_cast<scalar_t>((xr[j] - mu[j]) * k[j] + shift[j]);
}

template <typename scalar_t, typename acc_t>
void gradient_sums_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ gr, const acc_t* __restrict__ mu,
                       acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gc, acc_t* __restrict__ sum_sign,
                       int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    const acc_t c = static_cast<acc_t>(xr[j]) - mu[j];
    sum_g[j] += gr[j];
    sum_gc[j] += gr[j] * c;
    if (sum_sign) sum_sign[j] += sign_of(c);
  }
}

// dx = k g + const - lin * sign(x - mean); without sign_lin (p = inf): dx = k g + const.
template <typename scalar_t, typename acc_t>
void input_gradient_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ gr, const acc_t* __restrict__ mu,
                        const acc_t* __restrict__ k, const acc_t* __restrict__ cst,
                        const acc_t* __restrict__ sign_lin, scalar_t* __restrict__ dr, int64_t width) {
  if (sign_lin) {
    for (int64_t j = 0; j < width; ++j)
      dr[j] = static_cast<scalar_t>(k[j] * gr[j] + cst[j] - sign_lin[j] * sign_of(static_cast<acc_t>(xr[j]) - mu[j]));
  } else {
    for (int64_t j = 0; j < width; ++j) dr[j] = static_cast<scalar_t>(k[j] * gr[j] + cst[j]);
  }
}

}  // namespace

Tensor param_as(const std::optional<Tensor>& t, const Tensor& x) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->scalar_type() == x.scalar_type() ? t->contiguous() : t->contiguous().to(x.scalar_type());
}

void update_running(const std::optional<Tensor>& running, const Tensor& batch, double momentum) {
  if (!running.has_value() || !running->defined()) return;
  Tensor r = *running;
  if (r.scalar_type() != batch.scalar_type() || !r.is_contiguous()) {
    r.lerp_(batch.to(r.scalar_type()), momentum);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "lp_update_running", [&] {  // C values: a loop, not an ATen op
    scalar_t* rp = r.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = batch.const_data_ptr<scalar_t>();
    const auto w = static_cast<scalar_t>(momentum);
    for (int64_t c = 0; c < r.numel(); ++c)  // torch's lerp: exact at both ends of the weight
      rp[c] = w < scalar_t(0.5) ? rp[c] + w * (bp[c] - rp[c]) : bp[c] - (bp[c] - rp[c]) * (scalar_t(1) - w);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lp_flat_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_stat, double momentum,
    bool p_inf, double eps) {
  check_input(input);
  const Tensor x = input.contiguous();
  const int64_t n = x.size(0), channels = x.size(1);
  Tensor y = at::empty_like(x);
  Tensor per_channel = at::empty({4, channels}, x.options());  // rows: mean, d, k, stat
  Tensor row = at::empty({p_inf ? channels : 0}, x.options().dtype(at::kLong));
  const Tensor w = param_as(weight, x), b = param_as(bias, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lp_flat_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = per_channel.mutable_data_ptr<scalar_t>();
    int64_t* rowp = p_inf ? row.mutable_data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, channels, channel_grain(n), [&](int64_t c0, int64_t c1) {
      const int64_t width = c1 - c0;
      std::vector<acc_t> buffer(5 * width, acc_t(0));
      acc_t *acc = buffer.data(), *mu = acc + width, *top = mu + width, *bottom = top + width, *found = bottom + width;
      if (!p_inf) {  // mean, then mean |c|
        blocked_row_sums(n, acc, width, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) add_row(xp + i * channels + c0, acc, width);
        });
        for (int64_t j = 0; j < width; ++j) mu[j] = acc[j] / n;
        blocked_row_sums(n, acc, width, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) add_abs_centered_row(xp + i * channels + c0, mu, acc, width);
        });
        for (int64_t j = 0; j < width; ++j) acc[j] /= n;
      } else {  // mean, max and min; max |c| = max(max(x) - mu, mu - min(x)) and its first row
        for (int64_t j = 0; j < width; ++j) top[j] = bottom[j] = xp[c0 + j];
        blocked_row_sums(n, acc, width, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) add_extremes_row(xp + i * channels + c0, acc, top, bottom, width);
        });
        for (int64_t j = 0; j < width; ++j) {
          mu[j] = acc[j] / n;
          const acc_t up = top[j] - mu[j], down = mu[j] - bottom[j];
          acc[j] = up >= down ? up : down;
          top[j] = up >= down ? top[j] : bottom[j];  // the extreme value to find
        }
        for (int64_t i = n - 1; i >= 0; --i) find_row(xp + i * channels + c0, static_cast<acc_t>(i), top, found, width);
        for (int64_t j = 0; j < width; ++j) rowp[c0 + j] = static_cast<int64_t>(found[j]);
      }
      for (int64_t j = 0; j < width; ++j) {  // acc holds the statistic; top becomes k, bottom beta
        const int64_t c = c0 + j;
        const acc_t d = acc[j] + static_cast<acc_t>(eps);
        top[j] = (wp ? static_cast<acc_t>(wp[c]) : acc_t(1)) / d;
        bottom[j] = bp ? static_cast<acc_t>(bp[c]) : acc_t(0);
        out[c] = static_cast<scalar_t>(mu[j]);
        out[channels + c] = static_cast<scalar_t>(d);
        out[2 * channels + c] = static_cast<scalar_t>(top[j]);
        out[3 * channels + c] = static_cast<scalar_t>(acc[j]);
      }
      for (int64_t i = 0; i < n; ++i) affine_row(xp + i * channels + c0, mu, top, bottom, yp + i * channels + c0, width);
    });
  });
  update_running(running_mean, per_channel[0], momentum);
  update_running(running_stat, per_channel[3], momentum);
  return {y, per_channel[0], per_channel[1], per_channel[2], row};
}

std::tuple<Tensor, Tensor, Tensor> lp_flat_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& d, const Tensor& k,
    const Tensor& row, bool p_inf) {
  check_input(input);
  TORCH_CHECK(grad_output.device().is_cpu(), "lp_flat_backward: CPU tensors only");
  const Tensor x = input.contiguous();
  const Tensor g = grad_output.scalar_type() == x.scalar_type() ? grad_output.contiguous()
                                                                : grad_output.contiguous().to(x.scalar_type());
  TORCH_CHECK(g.sizes() == x.sizes(), "lp_flat_backward: gradient shape ", g.sizes(), " != input ", x.sizes());
  const int64_t n = x.size(0), channels = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor sums = at::empty({2, channels}, x.options());  // rows: S, sum(g)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lp_flat_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = g.const_data_ptr<scalar_t>();
    const scalar_t *meanp = mean.const_data_ptr<scalar_t>(), *dp = d.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const int64_t* rowp = p_inf ? row.const_data_ptr<int64_t>() : nullptr;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* out = sums.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, channels, channel_grain(n), [&](int64_t c0, int64_t c1) {
      const int64_t width = c1 - c0;
      std::vector<acc_t> buffer(7 * width, acc_t(0));
      acc_t *sum_g = buffer.data(), *sum_gc = sum_g + width, *sum_sign = sum_gc + width;
      acc_t *mu = sum_sign + width, *kk = mu + width, *lin = kk + width, *cst = lin + width;
      for (int64_t j = 0; j < width; ++j) {
        mu[j] = meanp[c0 + j];
        kk[j] = kp[c0 + j];
      }
      blocked_row_sums(n, sum_g, 3 * width, [&](int64_t i0, int64_t i1) {  // sum_g, sum_gc, sum_sign
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t at = i * channels + c0;
          gradient_sums_row(xp + at, gp + at, mu, sum_g, sum_gc, p_inf ? nullptr : sum_sign, width);
        }
      });
      for (int64_t j = 0; j < width; ++j) {
        const int64_t ch = c0 + j;
        const acc_t s = sum_gc[j] / static_cast<acc_t>(dp[ch]);
        out[ch] = static_cast<scalar_t>(s);
        out[channels + ch] = static_cast<scalar_t>(sum_g[j]);
        const acc_t u = p_inf ? sign_of(static_cast<acc_t>(xp[rowp[ch] * channels + ch]) - mu[j]) : acc_t(0);
        input_gradient_coefficients<acc_t>(p_inf, kk[j], s, n, sum_g[j], sum_sign[j], u, lin[j], cst[j]);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t at = i * channels + c0;
        input_gradient_row(xp + at, gp + at, mu, kk, cst, p_inf ? nullptr : lin, dxp + at, width);
      }
      if (p_inf) {
        for (int64_t j = 0; j < width; ++j) dxp[rowp[c0 + j] * channels + c0 + j] -= static_cast<scalar_t>(lin[j]);
      }
    });
  });
  return {dx, sums[0], sums[1]};
}

}  // namespace lightning_bn
