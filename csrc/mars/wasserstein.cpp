#include "mars/wasserstein.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "mars/parallel.hpp"

namespace mars {
namespace wasserstein {

double abs_pow(double d, double p) {
  if (p == 1.0) return std::fabs(d);
  if (p == 2.0) return d * d;
  return std::pow(std::fabs(d), p);
}

double root_p(double x, double p) {
  if (p == 1.0) return x;
  if (p == 2.0) return std::sqrt(x);
  return std::pow(x, 1.0 / p);
}

MARS_NO_CONTRACT_ATTR double wasserstein_pow_sorted(const double* u, std::int64_t m,
                                                    const double* v, std::int64_t n, double p) {
  MARS_NO_CONTRACT_BODY
  if (m == n) return wasserstein_pow_equal(u, v, n, p);
  // Units of 1/L with L = lcm(m, n): u's step i covers [i*a, (i+1)*a), v's step j covers
  // [j*b, (j+1)*b), a = L/m, b = L/n. Each merged segment contributes length * |u_i - v_j|^p.
  const std::int64_t g = std::gcd(m, n);
  const std::int64_t a = n / g;  // L / m
  const std::int64_t b = m / g;  // L / n
  const double total = static_cast<double>(m) * static_cast<double>(a);
  double sum = 0.0;
  std::int64_t i = 0, j = 0, pos = 0;
  std::int64_t end_u = a, end_v = b;
  while (i < m && j < n) {
    const std::int64_t next = std::min(end_u, end_v);
    sum += static_cast<double>(next - pos) * abs_pow(u[i] - v[j], p);
    pos = next;
    if (end_u == next) { ++i; end_u += a; }
    if (end_v == next) { ++j; end_v += b; }
  }
  return sum / total;
}

double wasserstein_1d(const double* u, std::int64_t m, const double* v, std::int64_t n, double p) {
  std::vector<double> us(u, u + m), vs(v, v + n);
  std::sort(us.begin(), us.end());
  std::sort(vs.begin(), vs.end());
  return root_p(wasserstein_pow_sorted(us.data(), m, vs.data(), n, p), p);
}

MARS_NO_CONTRACT_ATTR double wasserstein_pow_equal(const double* a, const double* b,
                                                   std::int64_t d, double p) {
  MARS_NO_CONTRACT_BODY
  // One loop per order so that the hot p = 1 and p = 2 cases have no call or branch inside.
  double sum = 0.0;
  if (p == 1.0) {
    for (std::int64_t k = 0; k < d; ++k) sum += std::fabs(a[k] - b[k]);
  } else if (p == 2.0) {
    for (std::int64_t k = 0; k < d; ++k) {
      const double diff = a[k] - b[k];
      sum += diff * diff;
    }
  } else {
    for (std::int64_t k = 0; k < d; ++k) sum += std::pow(std::fabs(a[k] - b[k]), p);
  }
  return sum / static_cast<double>(d);
}

MARS_NO_CONTRACT_ATTR void wasserstein_pow_equal_rows(const double* a, const double* b,
                                                      std::int64_t count, std::int64_t d, double p,
                                                      double* out) {
  MARS_NO_CONTRACT_BODY
  // Four rows at a time: four independent serial sums (the adds of one sum depend on each
  // other, so interleaving four hides their latency). Each sum runs in exactly the order of
  // wasserstein_pow_equal, so the results are bit-identical to it.
  std::int64_t t = 0;
  if (p == 1.0 || p == 2.0) {
    const bool square = p == 2.0;
    for (; t + 4 <= count; t += 4) {
      const double* b0 = b + t * d;
      const double* b1 = b0 + d;
      const double* b2 = b1 + d;
      const double* b3 = b2 + d;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
      if (square) {
        for (std::int64_t k = 0; k < d; ++k) {
          const double d0 = a[k] - b0[k], d1 = a[k] - b1[k], d2 = a[k] - b2[k], d3 = a[k] - b3[k];
          s0 += d0 * d0;
          s1 += d1 * d1;
          s2 += d2 * d2;
          s3 += d3 * d3;
        }
      } else {
        for (std::int64_t k = 0; k < d; ++k) {
          s0 += std::fabs(a[k] - b0[k]);
          s1 += std::fabs(a[k] - b1[k]);
          s2 += std::fabs(a[k] - b2[k]);
          s3 += std::fabs(a[k] - b3[k]);
        }
      }
      const double len = static_cast<double>(d);
      out[t] = s0 / len;
      out[t + 1] = s1 / len;
      out[t + 2] = s2 / len;
      out[t + 3] = s3 / len;
    }
  }
  for (; t < count; ++t) out[t] = wasserstein_pow_equal(a, b + t * d, d, p);
}

void sort_rows(const double* x, std::int64_t n, std::int64_t d, double* out, int n_threads) {
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(d, 1));
  parallel::parallel_for(n, n_threads, grain, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      if (out != x) std::copy(x + r * d, x + (r + 1) * d, out + r * d);
      std::sort(out + r * d, out + (r + 1) * d);
    }
  });
}

void pairwise_wasserstein_sorted(const double* sorted, std::int64_t n, std::int64_t d, double p,
                                 double* out, int n_threads) {
  for (std::int64_t i = 0; i < n; ++i) out[i * n + i] = 0.0;
  if (n < 2) return;
  // Pairs (i, j), i < j, enumerated row by row: pair index of (i, i+1) is start[i].
  std::vector<std::int64_t> start(static_cast<std::size_t>(n));
  for (std::int64_t i = 0, acc = 0; i < n; ++i) {
    start[i] = acc;
    acc += n - 1 - i;
  }
  const std::int64_t n_pairs = n * (n - 1) / 2;
  const std::int64_t grain = std::max<std::int64_t>(1, 8192 / std::max<std::int64_t>(d, 1));
  parallel::parallel_for(n_pairs, n_threads, grain, [&](std::int64_t begin, std::int64_t end) {
    std::vector<double> row(static_cast<std::size_t>(n));
    std::int64_t i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    std::int64_t j = i + 1 + (begin - start[i]);
    for (std::int64_t k = begin; k < end;) {
      // the run of pairs (i, j), (i, j+1), ... that lies in this chunk
      const std::int64_t count = std::min(n - j, end - k);
      wasserstein_pow_equal_rows(sorted + i * d, sorted + j * d, count, d, p, row.data());
      for (std::int64_t t = 0; t < count; ++t) {
        const double w = root_p(row[t], p);
        out[i * n + j + t] = w;
        out[(j + t) * n + i] = w;
      }
      k += count;
      ++i;
      j = i + 1;
    }
  });
}

void cross_wasserstein_sorted(const double* a, std::int64_t m, const double* b, std::int64_t n,
                              std::int64_t d, double p, double* out, int n_threads) {
  const std::int64_t grain =
      std::max<std::int64_t>(1, 8192 / std::max<std::int64_t>(d * std::max<std::int64_t>(n, 1), 1));
  parallel::parallel_for(m, n_threads, grain, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      double* row = out + i * n;
      wasserstein_pow_equal_rows(a + i * d, b, n, d, p, row);
      for (std::int64_t j = 0; j < n; ++j) row[j] = root_p(row[j], p);
    }
  });
}

void pairwise_wasserstein(const double* x, std::int64_t n, std::int64_t d, double p, double* out,
                          int n_threads) {
  std::vector<double> sorted(static_cast<std::size_t>(n * d));
  sort_rows(x, n, d, sorted.data(), n_threads);
  pairwise_wasserstein_sorted(sorted.data(), n, d, p, out, n_threads);
}

}  // namespace wasserstein
}  // namespace mars
