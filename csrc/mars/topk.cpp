#include "mars/topk.hpp"

#include <algorithm>
#include <cmath>
#include <functional>

namespace mars {
namespace topk {

std::int64_t ceil_count(double kappa, std::int64_t n) {
  const double x = kappa * static_cast<double>(n);
  const double nearest = std::nearbyint(x);
  double k = std::fabs(x - nearest) <= 1e-9 * std::max(1.0, std::fabs(x)) ? nearest : std::ceil(x);
  k = std::min(std::max(k, 1.0), static_cast<double>(n));
  return static_cast<std::int64_t>(k);
}

double linear_quantile_sorted(const double* sorted, std::int64_t n, double q) {
  // numpy: virtual_index = (n - 1) * q; at or above the last index -> the maximum; otherwise
  // lerp(sorted[floor], sorted[floor + 1], gamma = virtual_index - floor) where numpy's _lerp
  // evaluates b - (b - a) * (1 - gamma) when gamma >= 0.5 and a + (b - a) * gamma otherwise.
  // The products go through volatile temporaries so that the compiler cannot fuse them into an
  // FMA (numpy rounds the product and the sum separately).
  const double virtual_index = static_cast<double>(n - 1) * q;
  if (virtual_index >= static_cast<double>(n - 1)) return sorted[n - 1];
  if (virtual_index < 0.0) return sorted[0];
  const double previous = std::floor(virtual_index);
  const auto i = static_cast<std::int64_t>(previous);
  const double gamma = virtual_index - previous;
  const double a = sorted[i];
  const double b = sorted[i + 1];
  const double diff = b - a;
  if (gamma >= 0.5) {
    volatile double product = diff * (1.0 - gamma);
    return b - product;
  }
  volatile double product = diff * gamma;
  return a + product;
}

std::vector<double> top_k_ceil(const double* values, std::int64_t n, double kappa) {
  const std::int64_t k = ceil_count(kappa, n);
  std::vector<double> v(values, values + n);
  std::partial_sort(v.begin(), v.begin() + k, v.end(), std::greater<double>());
  v.resize(static_cast<std::size_t>(k));
  return v;
}

std::vector<double> top_k_quantile(const double* values, std::int64_t n, double kappa) {
  std::vector<double> sorted(values, values + n);
  std::sort(sorted.begin(), sorted.end());
  const double threshold = linear_quantile_sorted(sorted.data(), n, 1.0 - kappa);
  std::vector<double> kept;
  for (std::int64_t i = 0; i < n; ++i) {
    if (values[i] >= threshold) kept.push_back(values[i]);
  }
  return kept;
}

}  // namespace topk
}  // namespace mars
