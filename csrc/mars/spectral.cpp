#include "mars/spectral.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "mars/parallel.hpp"
#include "mars/symeig.hpp"

namespace mars {
namespace spectral {

namespace {

// Rows of a channel are processed in blocks of kBlock, transposed into fp64 column buffers so
// that every Gram entry is a dot product of two contiguous kBlock-long vectors. The dot products
// keep kLanes independent accumulators: the compiler maps them onto SIMD lanes without having
// to reassociate (no -ffast-math needed) and the summation order is fixed.
constexpr int kBlock = 64;
constexpr int kLanes = 8;

inline double combine_lanes(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Dot product of two kBlock-long fp64 vectors (zero-padded tails).
inline double dot_block(const double* a, const double* b) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int k = 0; k < kBlock; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  }
  return combine_lanes(acc);
}

// Dot product of two fp64 vectors of any length n.
inline double dot(const double* a, const double* b, std::int64_t n) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  }
  double tail = 0.0;
  for (; k < n; ++k) tail += a[k] * b[k];
  return combine_lanes(acc) + tail;
}

// sum_i (s * x_i)^2 in fp64: the 1x1 Gram of a channel whose smaller side is 1.
template <typename T>
double sum_squares(const T* x, std::int64_t n, double s) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(x[k + l]) * s;
      acc[l] += v * v;
    }
  }
  double tail = 0.0;
  for (; k < n; ++k) {
    const double v = static_cast<double>(x[k]) * s;
    tail += v * v;
  }
  return combine_lanes(acc) + tail;
}

// g (c x c, both triangles) = (sM)^T (sM) for the row-major (r x c) matrix m, c <= r.
// C > 0 fixes c at compile time (the hot 3x3-kernel case, C = 9, is fully unrolled).
// buf holds c * kBlock doubles.
template <typename T, int C>
void gram_columns(const T* m, std::int64_t r, int c_dyn, double s, double* buf, double* g) {
  const int c = C > 0 ? C : c_dyn;
  std::fill(g, g + c * c, 0.0);
  for (std::int64_t r0 = 0; r0 < r; r0 += kBlock) {
    const int nb = static_cast<int>(std::min<std::int64_t>(kBlock, r - r0));
    const T* block = m + r0 * c;
    for (int b = 0; b < nb; ++b) {
      const T* row = block + static_cast<std::int64_t>(b) * c;
      for (int j = 0; j < c; ++j) buf[j * kBlock + b] = static_cast<double>(row[j]) * s;
    }
    if (nb < kBlock) {
      for (int j = 0; j < c; ++j) std::fill(buf + j * kBlock + nb, buf + (j + 1) * kBlock, 0.0);
    }
    for (int i = 0; i < c; ++i) {
      for (int j = i; j < c; ++j) g[i * c + j] += dot_block(buf + i * kBlock, buf + j * kBlock);
    }
  }
  for (int i = 0; i < c; ++i) {
    for (int j = 0; j < i; ++j) g[i * c + j] = g[j * c + i];
  }
}

// g (r x r, both triangles) = (sM)(sM)^T for the row-major (r x c) matrix m, r < c.
// buf holds r * c doubles.
template <typename T>
void gram_rows(const T* m, int r, std::int64_t c, double s, double* buf, double* g) {
  const std::int64_t total = static_cast<std::int64_t>(r) * c;
  for (std::int64_t i = 0; i < total; ++i) buf[i] = static_cast<double>(m[i]) * s;
  for (int i = 0; i < r; ++i) {
    for (int j = i; j < r; ++j) {
      const double v = dot(buf + i * c, buf + j * c, c);
      g[i * r + j] = v;
      g[j * r + i] = v;
    }
  }
}

// Power-of-two factor that brings the largest magnitude of a float64 channel near 1 when its
// squares could overflow or underflow in fp64; 1 otherwise (and always for float32, whose
// squares always fit). Returns NaN for a channel with NaN/Inf.
template <typename T>
double channel_scale(const T* x, std::int64_t n) {
  double max_abs = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(x[i]));
    max_abs = a > max_abs ? a : max_abs;  // NaN never wins here: checked below
  }
  bool finite = true;
  for (std::int64_t i = 0; i < n && finite; ++i) finite = std::isfinite(static_cast<double>(x[i]));
  if (!finite) return std::numeric_limits<double>::quiet_NaN();
  if (max_abs == 0.0) return 1.0;
  if (max_abs > 0x1p-400 && max_abs < 0x1p400) return 1.0;
  // 2^-e with e = exponent of max_abs; for subnormal max_abs (e < -1022) 2^-e would overflow, and
  // 2^1000 already lifts it far into the normal range.
  return std::ldexp(1.0, std::min(-std::ilogb(max_abs), 1000));
}

template <typename T>
void spectral_impl(const T* w, std::int64_t out, std::int64_t rows, std::int64_t cols,
                   const double* scale, double* result, int n_threads) {
  if (out <= 0) return;
  const std::int64_t per_channel = rows * cols;
  if (per_channel == 0) {
    std::fill(result, result + out, 0.0);
    return;
  }
  const bool by_columns = cols <= rows;  // Gram of the smaller side
  const std::int64_t n = by_columns ? cols : rows;
  const std::int64_t grain = std::max<std::int64_t>(1, 32768 / per_channel);
  parallel::parallel_for(out, n_threads, grain, [&](std::int64_t begin, std::int64_t end) {
    std::vector<double> g(n > 1 ? static_cast<std::size_t>(n * n) : 1);
    std::vector<double> buf;
    if (n > 1) {
      buf.resize(static_cast<std::size_t>(by_columns ? n * kBlock : per_channel));
    }
    for (std::int64_t k = begin; k < end; ++k) {
      const T* m = w + k * per_channel;
      double s = 1.0;
      if (std::is_same<T, double>::value) s = channel_scale(m, per_channel);
      double sigma;
      if (std::isnan(s)) {
        sigma = s;
      } else if (n == 1) {
        const double lambda = sum_squares(m, per_channel, s);
        sigma = std::isfinite(lambda) ? std::sqrt(lambda) / s
                                      : std::numeric_limits<double>::quiet_NaN();
      } else {
        if (!by_columns) {
          gram_rows(m, static_cast<int>(rows), cols, s, buf.data(), g.data());
        } else if (cols == 9) {
          gram_columns<T, 9>(m, rows, 9, s, buf.data(), g.data());
        } else {
          gram_columns<T, 0>(m, rows, static_cast<int>(cols), s, buf.data(), g.data());
        }
        sigma = symeig::sigma_from_lambda(symeig::max_eigenvalue(g.data(), static_cast<int>(n))) / s;
      }
      result[k] = scale ? sigma * scale[k] : sigma;
    }
  });
}

}  // namespace

void channel_spectral_norms(const float* weight, std::int64_t out, std::int64_t rows,
                            std::int64_t cols, const double* scale, double* result,
                            int n_threads) {
  spectral_impl(weight, out, rows, cols, scale, result, n_threads);
}

void channel_spectral_norms(const double* weight, std::int64_t out, std::int64_t rows,
                            std::int64_t cols, const double* scale, double* result,
                            int n_threads) {
  spectral_impl(weight, out, rows, cols, scale, result, n_threads);
}

}  // namespace spectral
}  // namespace mars
