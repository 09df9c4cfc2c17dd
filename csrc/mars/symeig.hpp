// Eigenvalues of small dense symmetric matrices (header only, no allocation, no std library
// beyond <cmath>), shared by the CPU core and the optional CUDA kernels: every function is
// MARS_HD, i.e. `__host__ __device__` when compiled by nvcc and a plain inline function otherwise.
//
// The spectral kernel needs the largest eigenvalue of a positive semi-definite Gram matrix G
// (n x n, n = the smaller side of a channel's weight matrix, typically 1..49). Two solvers:
// max_eigenvalue_tridiagonal (Householder + Laguerre, the scalar twin of the CPU's 4-lane
// topeig.hpp; the CUDA kernel's default, it needs 4n doubles of workspace) and cyclic Jacobi
// (max_eigenvalue: no workspace beyond the matrix, used by the CUDA kernel for Grams too large
// for per-thread shared memory). Both are accurate to a few n * eps relative for the largest
// eigenvalue of a PSD matrix (it is ||G||_2, perfectly conditioned).
#pragma once

#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define MARS_HD __host__ __device__
#else
#define MARS_HD
#endif

namespace mars {
namespace symeig {

// Maximum number of cyclic sweeps. Jacobi converges quadratically; 50 sweeps are never reached
// for finite input (typically 5-10). The bound guarantees termination on any input.
constexpr int kMaxSweeps = 50;
// Unit roundoff of double (2^-52): off-diagonal entries below kEpsilon * sqrt(|a_pp a_qq|) are
// dropped; their effect on the eigenvalues is O(kEpsilon^2) relative.
constexpr double kEpsilon = 2.220446049250313e-16;

// Largest eigenvalue of a 2x2 symmetric matrix [[a, b], [b, d]] in closed form.
MARS_HD inline double max_eigenvalue_2x2(double a, double b, double d) {
  const double mean = 0.5 * (a + d);
  const double half_diff = 0.5 * (a - d);
  return mean + std::hypot(half_diff, b);
}

// Parameters of the Jacobi rotation that annihilates a[p][q] (Golub & Van Loan, Algorithm 8.5.1,
// sym.schur2: t = tan(theta), the smaller root). Returns false, and sets a[p][q] = a[q][p] = 0,
// when a[p][q] is negligible relative to the diagonal (a relative-accuracy rule, Demmel-Veselic).
// p < q; only the upper triangle is used.
MARS_HD inline bool jacobi_parameters(double* a, int n, int p, int q, double* t_out, double* s_out,
                                      double* tau_out) {
  const double apq = a[p * n + q];
  const double app = a[p * n + p];
  const double aqq = a[q * n + q];
  if (apq == 0.0 || std::fabs(apq) <= kEpsilon * std::sqrt(std::fabs(app) * std::fabs(aqq))) {
    a[p * n + q] = 0.0;
    return false;
  }
  const double theta = (aqq - app) / (2.0 * apq);
  double t;
  if (std::fabs(theta) > 1e150) {
    t = 0.5 / theta;  // 1 + theta^2 would overflow; t ~ 1/(2 theta)
  } else {
    t = (theta >= 0.0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(1.0 + theta * theta));
  }
  const double c = 1.0 / std::sqrt(1.0 + t * t);
  const double s = t * c;
  *t_out = t;
  *s_out = s;
  *tau_out = s / (1.0 + c);
  return true;
}

// Applies the rotation (p, q), p < q, with parameters from jacobi_parameters to the symmetric
// n x n row-major matrix `a`: a <- J^T a J. Only the upper triangle (i <= j) is read and written.
MARS_HD inline void rotate_pair(double& x, double& y, double s, double tau) {
  const double xp = x, yq = y;
  x = xp - s * (yq + tau * xp);
  y = yq + s * (xp - tau * yq);
}

MARS_HD inline void jacobi_apply(double* a, int n, int p, int q, double t, double s, double tau) {
  const double apq = a[p * n + q];
  a[p * n + p] -= t * apq;
  a[q * n + q] += t * apq;
  a[p * n + q] = 0.0;
  for (int r = 0; r < p; ++r) rotate_pair(a[r * n + p], a[r * n + q], s, tau);
  for (int r = p + 1; r < q; ++r) rotate_pair(a[p * n + r], a[r * n + q], s, tau);
  for (int r = q + 1; r < n; ++r) rotate_pair(a[p * n + r], a[q * n + r], s, tau);
}

// Pair k of round `round` of the round-robin ("circle method") ordering of m = n + (n odd)
// players: every pair (p, q), p < q < m, occurs exactly once per sweep of m - 1 rounds, and the
// m / 2 pairs of a round are disjoint. q == n marks the dummy player of odd n (no rotation).
MARS_HD inline void round_robin_pair(int m, int round, int k, int* p, int* q) {
  int a, b;
  if (k == 0) {
    a = m - 1;
    b = round;
  } else {
    a = (round + k) % (m - 1);
    b = (round - k + (m - 1)) % (m - 1);
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// True when the off-diagonal part E of the symmetric matrix is negligible for the eigenvalues:
// ||E||_F <= kEpsilon * max_i |a_ii|. By Weyl's inequality every eigenvalue is then within
// kEpsilon * ||a||_2 of a diagonal entry, so further sweeps cannot change the result materially.
MARS_HD inline bool off_diagonal_negligible(const double* a, int n) {
  double off = 0.0, diag = 0.0;
  for (int i = 0; i < n; ++i) {
    const double d = std::fabs(a[i * n + i]);
    diag = d > diag ? d : diag;
    for (int j = i + 1; j < n; ++j) off += a[i * n + j] * a[i * n + j];
  }
  return 2.0 * off <= (kEpsilon * diag) * (kEpsilon * diag);
}

// Largest eigenvalue of the symmetric n x n row-major matrix `a`; only its upper triangle
// (i <= j) is read. `a` is overwritten (its upper triangle ends up nearly diagonal). Closed forms for n = 1 and n = 2, cyclic
// Jacobi otherwise, in round-robin order: the rotations of one round touch disjoint index pairs,
// so their parameters are computed together (independent dependency chains the CPU overlaps)
// and then applied one after the other, which is exactly the sequential cyclic Jacobi method
// for that ordering. Returns NaN if any entry is NaN or infinite.
MARS_HD inline double max_eigenvalue(double* a, int n) {
  if (n <= 0) return 0.0;
  for (int i = 0; i < n * n; ++i) {
    if (!std::isfinite(a[i])) return NAN;
  }
  if (n == 1) return a[0];
  if (n == 2) return max_eigenvalue_2x2(a[0], a[1], a[3]);
  constexpr int kBatch = 8;
  const int m = n + (n & 1);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < m - 1; ++round) {
      for (int k0 = 0; k0 < m / 2; k0 += kBatch) {
        int ps[kBatch], qs[kBatch];
        double ts[kBatch], ss[kBatch], taus[kBatch];
        bool active[kBatch];
        const int kn = (m / 2 - k0) < kBatch ? (m / 2 - k0) : kBatch;
        for (int k = 0; k < kn; ++k) {
          round_robin_pair(m, round, k0 + k, &ps[k], &qs[k]);
          active[k] = qs[k] < n && jacobi_parameters(a, n, ps[k], qs[k], &ts[k], &ss[k], &taus[k]);
        }
        for (int k = 0; k < kn; ++k) {
          if (!active[k]) continue;
          jacobi_apply(a, n, ps[k], qs[k], ts[k], ss[k], taus[k]);
          rotated = true;
        }
      }
    }
    if (!rotated || off_diagonal_negligible(a, n)) break;
  }
  double best = a[0];
  for (int i = 1; i < n; ++i) best = a[i * n + i] > best ? a[i * n + i] : best;
  return best;
}

// ---------------------------------------------------------------- Householder + Laguerre
//
// The scalar twin of mars/topeig.hpp (the CPU kernel's 4-lane solver), operation for operation:
// Householder tridiagonalisation T = Q^T A Q, then Laguerre's method on det(T - x I) started
// above the largest eigenvalue (Gershgorin bound of T), whose iterates decrease monotonically to
// the largest root with cubic convergence. About 15x less work than cyclic Jacobi for n = 9;
// the CUDA eigen kernel uses it (one thread per channel). See topeig.hpp for the method.

// Laguerre stops when its step is at most this fraction of the current value.
constexpr double kLaguerreStopRel = 1e-14;
constexpr int kLaguerreMaxIter = 100;

// Number of doubles of workspace max_eigenvalue_tridiagonal needs for order n.
MARS_HD inline int tridiagonal_workspace(int n) { return 4 * n; }

// Reduces the symmetric n x n row-major matrix `a` (both triangles stored; overwritten) to
// tridiagonal form: diagonal d[0..n), off-diagonal e[0..n-1). u, p: n doubles of workspace each.
MARS_HD inline void tridiagonalize(double* a, int n, double* d, double* e, double* u, double* p) {
  for (int k = 0; k + 2 < n; ++k) {
    const int m = n - k - 1;  // length of the column below the diagonal
    // x = A[k+1:, k]; u = x + sign(x0) ||x|| e_1; beta = 2 / (u^T u) (0 when x = 0).
    double sigma = 0.0;
    for (int i = 1; i < m; ++i) {
      const double xi = a[(k + 1 + i) * n + k];
      u[i] = xi;
      sigma = std::fma(xi, xi, sigma);
    }
    const double x0 = a[(k + 1) * n + k];
    const double norm = std::sqrt(std::fma(x0, x0, sigma));
    const double sign = x0 >= 0.0 ? 1.0 : -1.0;
    const double u0 = std::fma(sign, norm, x0);
    u[0] = u0;
    const double uu = std::fma(u0, u0, sigma);
    const double beta = uu > 0.0 ? 2.0 / uu : 0.0;
    d[k] = a[k * n + k];
    e[k] = 0.0 - sign * norm;
    // p = beta * A_sub u, K = beta / 2 * u^T p, w = p - K u (stored in p).
    double up = 0.0;
    for (int i = 0; i < m; ++i) {
      const double* row = a + (k + 1 + i) * n + (k + 1);
      double s = 0.0;
      for (int j = 0; j < m; ++j) s = std::fma(row[j], u[j], s);
      p[i] = beta * s;
      up = std::fma(u[i], p[i], up);
    }
    const double kk = 0.5 * beta * up;
    for (int i = 0; i < m; ++i) p[i] = std::fma(-kk, u[i], p[i]);
    // A_sub -= u w^T + w u^T
    for (int i = 0; i < m; ++i) {
      double* row = a + (k + 1 + i) * n + (k + 1);
      const double ui = u[i], wi = p[i];
      for (int j = 0; j < m; ++j) {
        double v = row[j];
        v = std::fma(-ui, p[j], v);
        v = std::fma(-wi, u[j], v);
        row[j] = v;
      }
    }
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * n + (n - 2)];
    e[n - 2] = a[(n - 1) * n + (n - 2)];
  }
  d[n - 1] = a[(n - 1) * n + (n - 1)];
}

// Largest eigenvalue of the symmetric tridiagonal matrix (d, e) of order n >= 1 by Laguerre's
// method; c: n doubles of scratch. Returns max(d) when the Gershgorin bound is <= 0 (all zero).
MARS_HD inline double tridiagonal_max_eigenvalue(const double* d, const double* e, int n, double* c) {
  double bound = d[0], dmax = d[0], cmax = 1.0;
  for (int i = 0; i < n; ++i) {
    double r = 0.0;
    if (i > 0) r = r + std::fabs(e[i - 1]);
    if (i + 1 < n) r = r + std::fabs(e[i]);
    bound = std::fmax(bound, d[i] + r);
    dmax = std::fmax(dmax, d[i]);
  }
  for (int i = 0; i + 1 < n; ++i) {
    c[i] = e[i] * e[i];
    cmax = std::fmax(cmax, c[i]);
  }
  if (!(bound > 0.0)) return dmax;
  double x = bound * (1.0 + 0x1p-8);
  // Pivots smaller than pivmin in magnitude are replaced by -pivmin (LAPACK dstebz's guard).
  const double pivmin = DBL_MIN * cmax;
  const double fn = static_cast<double>(n);
  const double fn1 = static_cast<double>(n - 1);
  for (int iter = 0; iter < kLaguerreMaxIter; ++iter) {
    // f = log|p|: f' = sum q_i'/q_i, f'' = sum (q_i''/q_i - (q_i'/q_i)^2).
    double q = d[0] - x;
    if (std::fabs(q) < pivmin) q = -pivmin;
    double r = 1.0 / q;
    double qp = -1.0, qpp = 0.0;
    double g1 = 0.0 - r;
    double f2 = 0.0 - r * r;
    for (int i = 1; i < n; ++i) {
      const double cr = c[i - 1] * r;
      const double qn = (d[i] - x) - cr;
      const double qpn = std::fma(cr * r, qp, -1.0);
      const double qppn = (cr * r) * std::fma(-(2.0 * qp * qp), r, qpp);
      q = std::fabs(qn) < pivmin ? -pivmin : qn;
      r = 1.0 / q;
      qp = qpn;
      qpp = qppn;
      const double t = qp * r;
      g1 = g1 + t;
      f2 = f2 + std::fma(-t, t, qpp * r);
    }
    // Laguerre: a = n / (G + sqrt((n - 1) (n H - G^2))), H = -f''; G > 0 above the roots.
    const double h = 0.0 - f2;
    const double disc = std::fmax(fn1 * std::fma(-g1, g1, fn * h), 0.0);
    const double step = fn / (g1 + std::sqrt(disc));
    if (step > 0.0) x = x - step;
    if (!(step > kLaguerreStopRel * x)) break;  // tiny, non-positive or NaN step: done
  }
  return x;
}

// Largest eigenvalue of the symmetric n x n row-major matrix `a` (both triangles stored;
// overwritten) by Householder + Laguerre; work: tridiagonal_workspace(n) doubles. Closed forms
// for n = 1 and n = 2. Returns NaN if any entry is NaN or infinite.
MARS_HD inline double max_eigenvalue_tridiagonal(double* a, int n, double* work) {
  if (n <= 0) return 0.0;
  for (int i = 0; i < n * n; ++i) {
    if (!std::isfinite(a[i])) return NAN;
  }
  if (n == 1) return a[0];
  if (n == 2) return max_eigenvalue_2x2(a[0], a[1], a[3]);
  double* d = work;
  double* e = d + n;
  double* u = e + n;
  double* p = u + n;
  tridiagonalize(a, n, d, e, u, p);
  return tridiagonal_max_eigenvalue(d, e, n, u);
}

// Largest singular value from the largest eigenvalue of a Gram matrix (clamped at 0: rounding
// can make the top eigenvalue of an all-zero or rank-deficient Gram slightly negative).
MARS_HD inline double sigma_from_lambda(double lambda) {
  if (lambda != lambda) return lambda;  // NaN propagates
  return std::sqrt(lambda > 0.0 ? lambda : 0.0);
}

}  // namespace symeig
}  // namespace mars
