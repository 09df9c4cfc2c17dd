// Largest eigenvalue of small symmetric matrices, four at once (one per lane of a 4 x fp64 vector,
// simd4.hpp) and K such groups interleaved. Used by the spectral kernel for the Gram matrices of
// up to 16 channels at a time.
//
// Method (n >= 3):
//  1. Householder tridiagonalisation, T = Q^T A Q (Golub & Van Loan, Alg. 8.3.1), backward stable:
//     the eigenvalues of the computed T are those of A + E with ||E|| ~ n * eps * ||A||.
//  2. Laguerre's method on the characteristic polynomial p(x) = det(T - x I), started above the
//     largest eigenvalue (a Gershgorin bound of T). p has only real roots, so Laguerre's iterates
//     decrease monotonically to the largest root, with cubic convergence. p'/p and p''/p come from
//     the LDL^T pivots of T - x I (q_1 = d_1 - x, q_i = d_i - x - e_{i-1}^2 / q_{i-1}) and their
//     derivatives, one division per row; above the largest eigenvalue every pivot is negative.
//     A lane stops when the Laguerre step falls below kStopRel * x; its value is then frozen, so
//     lanes never influence each other.
// Accuracy: the largest eigenvalue of a positive semi-definite A to a few n * eps relative (it is
// ||A||_2, perfectly conditioned). Cost for n = 9: ~ 1000 flops per lane for step 1 and 3-6
// Laguerre iterations of n divisions each, about 30x less than cyclic Jacobi. Step 2 runs for K
// groups of four lanes at once (max_eigenvalues<K>).
//
// Layout: a[(i * n + j) * 4 + l] is entry (i, j) of lane l's matrix (both triangles stored).
// certify_below reads only the lower triangle and the diagonal.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "mars/simd4.hpp"

namespace mars {
namespace topeig {

using simd4::V4;
using simd4::M4;

// Laguerre stops a lane when its step is at most this fraction of the current value; the
// remaining error is then far below one ulp (cubic convergence).
constexpr double kStopRel = 1e-14;
constexpr int kMaxIter = 100;

// Number of V4 of workspace needed per group of 4 lanes by max_eigenvalues for order n.
inline std::int64_t workspace_vectors(int n) { return static_cast<std::int64_t>(4) * n; }

// Reduces the lane-interleaved symmetric n x n matrices `a` (overwritten) to tridiagonal form:
// diagonal d[0..n-1], off-diagonal e[0..n-2] (4 lanes each). u and p: n V4 of workspace each.
inline void tridiagonalize(double* a, int n, V4* d, V4* e, V4* u, V4* p) {
  using namespace simd4;
  auto at = [a, n](int i, int j) { return a + (static_cast<std::int64_t>(i) * n + j) * 4; };
  const V4 one = splat(1.0);
  for (int k = 0; k + 2 < n; ++k) {
    const int m = n - k - 1;  // length of the column below the diagonal
    // x = A[k+1:, k]; u = x + sign(x0) ||x|| e_1; beta = 2 / (u^T u) (0 when x = 0).
    V4 sigma = zero();
    for (int i = 1; i < m; ++i) {
      const V4 xi = load(at(k + 1 + i, k));
      u[i] = xi;
      sigma = fmadd(xi, xi, sigma);
    }
    const V4 x0 = load(at(k + 1, k));
    const V4 norm = sqrt(fmadd(x0, x0, sigma));
    const V4 sign = select(x0 >= zero(), one, zero() - one);
    const V4 u0 = fmadd(sign, norm, x0);
    u[0] = u0;
    const V4 uu = fmadd(u0, u0, sigma);
    const M4 nonzero = uu > zero();
    const V4 beta = select(nonzero, splat(2.0) / select(nonzero, uu, one), zero());
    d[k] = load(at(k, k));
    e[k] = zero() - sign * norm;
    // p = beta * A_sub u, K = beta / 2 * u^T p, w = p - K u (stored in p).
    V4 up = zero();
    for (int i = 0; i < m; ++i) {
      const double* row = at(k + 1 + i, k + 1);
      V4 s = zero();
      for (int j = 0; j < m; ++j) s = fmadd(load(row + 4 * j), u[j], s);
      p[i] = beta * s;
      up = fmadd(u[i], p[i], up);
    }
    const V4 kk = splat(0.5) * beta * up;
    for (int i = 0; i < m; ++i) p[i] = fnmadd(kk, u[i], p[i]);
    // A_sub -= u w^T + w u^T
    for (int i = 0; i < m; ++i) {
      double* row = at(k + 1 + i, k + 1);
      const V4 ui = u[i], wi = p[i];
      for (int j = 0; j < m; ++j) {
        V4 v = load(row + 4 * j);
        v = fnmadd(ui, p[j], v);
        v = fnmadd(wi, u[j], v);
        simd4::store(row + 4 * j, v);
      }
    }
  }
  if (n >= 2) {
    d[n - 2] = load(at(n - 2, n - 2));
    e[n - 2] = load(at(n - 1, n - 2));
  }
  d[n - 1] = load(at(n - 1, n - 1));
}

// Largest eigenvalue of the symmetric tridiagonal matrices (d[k], e[k]) of order n >= 1 for K
// sets of 4 lanes at once (K independent Laguerre iterations share one loop, so their division
// chains overlap); c[k]: n V4 of scratch each. Lanes whose Gershgorin bound is <= 0 (all-zero
// matrices) return max(d). Every lane's value depends on its own lane only.
template <int K>
inline void tridiagonal_max_eigenvalues(const V4* const* d, const V4* const* e, int n,
                                        V4* const* c, V4* out) {
  using namespace simd4;
  V4 x[K];
  M4 done[K];
  V4 pivmin[K];
  for (int k = 0; k < K; ++k) {
    V4 bound = d[k][0], dmax = d[k][0], cmax = splat(1.0);
    for (int i = 0; i < n; ++i) {
      V4 r = zero();
      if (i > 0) r = r + abs(e[k][i - 1]);
      if (i + 1 < n) r = r + abs(e[k][i]);
      bound = max(bound, d[k][i] + r);
      dmax = max(dmax, d[k][i]);
    }
    for (int i = 0; i + 1 < n; ++i) {
      c[k][i] = e[k][i] * e[k][i];
      cmax = max(cmax, c[k][i]);
    }
    done[k] = ~(bound > zero());
    x[k] = select(done[k], dmax, bound * splat(1.0 + 0x1p-8));
    // Pivots smaller than pivmin in magnitude are replaced by -pivmin (LAPACK dstebz's guard):
    // only reachable when x is within rounding of an eigenvalue of a leading block.
    pivmin[k] = splat(DBL_MIN) * cmax;
  }
  const V4 fn = splat(static_cast<double>(n));
  const V4 fn1 = splat(static_cast<double>(n - 1));
  const V4 stop = splat(kStopRel);
  auto all_done = [&]() {
    for (int k = 0; k < K; ++k) {
      if (!all(done[k])) return false;
    }
    return true;
  };
  for (int iter = 0; iter < kMaxIter && !all_done(); ++iter) {
    // f = log|p|: f' = sum q_i'/q_i, f'' = sum (q_i''/q_i - (q_i'/q_i)^2).
    V4 q[K], r[K], qp[K], qpp[K], g1[K], f2[K];
    for (int k = 0; k < K; ++k) {
      q[k] = d[k][0] - x[k];
      q[k] = select(abs(q[k]) < pivmin[k], zero() - pivmin[k], q[k]);
      r[k] = splat(1.0) / q[k];
      qp[k] = splat(-1.0);
      qpp[k] = zero();
      g1[k] = zero() - r[k];         // q'/q with q' = -1
      f2[k] = zero() - r[k] * r[k];  // q''/q - (q'/q)^2 with q'' = 0
    }
    for (int i = 1; i < n; ++i) {
      for (int k = 0; k < K; ++k) {
        const V4 cr = c[k][i - 1] * r[k];
        const V4 qn = (d[k][i] - x[k]) - cr;
        const V4 qpn = fmadd(cr * r[k], qp[k], splat(-1.0));
        const V4 qppn = (cr * r[k]) * fnmadd(splat(2.0) * qp[k] * qp[k], r[k], qpp[k]);
        q[k] = select(abs(qn) < pivmin[k], zero() - pivmin[k], qn);
        r[k] = splat(1.0) / q[k];
        qp[k] = qpn;
        qpp[k] = qppn;
        const V4 t = qp[k] * r[k];
        g1[k] = g1[k] + t;
        f2[k] = f2[k] + fnmadd(t, t, qpp[k] * r[k]);
      }
    }
    for (int k = 0; k < K; ++k) {
      // Laguerre: a = n / (G + sqrt((n - 1) (n H - G^2))), H = -f''; G > 0 above the roots.
      const V4 h = zero() - f2[k];
      const V4 disc = max(fn1 * fnmadd(g1[k], g1[k], fn * h), zero());
      const V4 step = fn / (g1[k] + sqrt(disc));
      const M4 move = (step > zero()) & ~done[k];
      x[k] = select(move, x[k] - step, x[k]);
      // A lane is done when its step is tiny, non-positive or NaN.
      done[k] = done[k] | ~(step > stop * x[k]);
    }
  }
  for (int k = 0; k < K; ++k) out[k] = x[k];
}

// Largest eigenvalue of the order-2 lane-interleaved symmetric matrix a in closed form:
// mean + hypot(half difference, off-diagonal).
inline V4 max_eigenvalue2(const double* a) {
  using namespace simd4;
  const V4 a00 = load(a), a10 = load(a + 8), a11 = load(a + 12);
  const V4 mean = splat(0.5) * (a00 + a11);
  const V4 half = splat(0.5) * (a00 - a11);
  const V4 big = max(abs(half), abs(a10));
  const M4 nz = big > zero();
  const V4 sb = select(nz, big, splat(1.0));
  const V4 hs = half / sb, bs = a10 / sb;
  return mean + select(nz, sb * sqrt(fmadd(hs, hs, bs * bs)), zero());
}

// Largest eigenvalues of K groups of four lane-interleaved symmetric n x n matrices a[g] (both
// triangles stored, overwritten; every entry finite): out[g] holds group g's four eigenvalues.
// work[g]: workspace_vectors(n) V4 per group. Each group is tridiagonalised on its own, then the
// K Laguerre iterations run together (their division chains interleave: ~45 ns per channel for
// K = 4 against ~67 ns for K = 2, n = 9, on the 2-core AMD EPYC dev machine). Each lane's value
// depends on its own matrix only, so it is the same bits for any K and any neighbours.
template <int K>
inline void max_eigenvalues(double* const* a, int n, V4* const* work, V4* out) {
  if (n == 1) {
    for (int g = 0; g < K; ++g) out[g] = simd4::load(a[g]);
    return;
  }
  if (n == 2) {
    for (int g = 0; g < K; ++g) out[g] = max_eigenvalue2(a[g]);
    return;
  }
  const V4* d[K];
  const V4* e[K];
  V4* c[K];
  for (int g = 0; g < K; ++g) {
    V4* dg = work[g];
    V4* eg = dg + n;
    tridiagonalize(a[g], n, dg, eg, eg + n, eg + 2 * n);
    d[g] = dg;
    e[g] = eg;
    c[g] = eg + n;
  }
  tridiagonal_max_eigenvalues<K>(d, e, n, c, out);
}

// Certifies, lane by lane, that the largest eigenvalue of the lane-interleaved symmetric n x n
// matrices `a` (lower triangle and diagonal read, left unchanged) lies below t: true for the
// lanes where the LDL^T factorisation of B = t I - A (no pivoting) runs to the end with every
// pivot > 0, i.e. where the computed factors are those of a positive definite matrix B + E. With
// D > 0 the factorisation is a Cholesky factorisation (L D^1/2), backward stable:
// |E| <= g |L||D||L^T| entrywise with g = (n + 1) u / (1 - (n + 1) u), u = 2^-53 (Higham,
// Accuracy and Stability of Numerical Algorithms, Thm. 10.3), and || |L||D||L^T| ||_2 <=
// trace(B + E) <= n t for a positive semi-definite A. A true lane therefore has
// lambda_max(A) < t (1 + 2 n (n + 1) u): a caller that needs lambda_max(A) < T passes
// t = T (1 - margin) with margin >> 2 n (n + 1) u (3e-14 for n = 16). Lanes never interact; NaN
// or t <= 0 makes a lane false. The strictly upper triangle of `a` is the factorisation's
// scratch (overwritten). r[g]: 2n V4 of workspace per group.
//
// K groups of four at once (a[g], t[g], r[g], ok[g]), their dependency chains (one division per
// column) interleaved; a lane's answer does not depend on K.
template <int K, int N = 0>
inline void certify_below(double* const* a, int n_runtime, const V4* t, V4* const* r, M4* ok) {
  using namespace simd4;
  const int n = N > 0 ? N : n_runtime;  // N > 0: the order known at compile time (loops unrolled)
  auto at = [a, n](int g, int i, int j) { return a[g] + (static_cast<std::int64_t>(i) * n + j) * 4; };
  for (int g = 0; g < K; ++g) ok[g] = t[g] > zero();
  // Column by column: c_ij = l_ij d_j (i > j) goes to entry (j, i) and r[j] = 1 / d_j, with
  // y_k = c_jk r_k, d_j = b_jj - sum_k c_jk y_k and c_ij = b_ij - sum_k c_ik y_k (k < j;
  // b_ij = -a_ij off the diagonal, b_jj = t - a_jj). y lives in r[g][n .. 2n).
  for (int j = 0; j < n; ++j) {
    for (int g = 0; g < K; ++g) {
      V4* y = r[g] + n;
      V4 dj = t[g] - load(at(g, j, j));
      for (int k = 0; k < j; ++k) {
        const V4 cjk = load(at(g, k, j));
        y[k] = cjk * r[g][k];
        dj = fnmadd(cjk, y[k], dj);
      }
      ok[g] = ok[g] & (dj > zero());
      r[g][j] = splat(1.0) / dj;
    }
    for (int i = j + 1; i < n; ++i) {
      for (int g = 0; g < K; ++g) {
        const V4* y = r[g] + n;
        V4 cij = zero() - load(at(g, i, j));
        for (int k = 0; k < j; ++k) cij = fnmadd(load(at(g, k, i)), y[k], cij);
        simd4::store(at(g, j, i), cij);
      }
    }
  }
}

}  // namespace topeig
}  // namespace mars
