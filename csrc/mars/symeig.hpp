// Eigenvalues of small dense symmetric matrices (header only, no allocation, no std library
// beyond <cmath>), shared by the CPU core and the optional CUDA kernels: every function is
// MARS_HD, i.e. `__host__ __device__` when compiled by nvcc and a plain inline function otherwise.
//
// The spectral kernel needs the largest eigenvalue of a positive semi-definite Gram matrix G
// (n x n, n = the smaller side of a channel's weight matrix, typically 1..49). Cyclic Jacobi is
// used because it is simple, branch-light, needs no workspace beyond the matrix itself, and is
// accurate to a few ulps of ||G|| for the largest eigenvalue.
#pragma once

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

// Largest singular value from the largest eigenvalue of a Gram matrix (clamped at 0: rounding
// can make the top eigenvalue of an all-zero or rank-deficient Gram slightly negative).
MARS_HD inline double sigma_from_lambda(double lambda) {
  if (lambda != lambda) return lambda;  // NaN propagates
  return std::sqrt(lambda > 0.0 ? lambda : 0.0);
}

}  // namespace symeig
}  // namespace mars
