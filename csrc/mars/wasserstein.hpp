// 1-D Wasserstein distances between empirical distributions (uniform weights).
//
// For samples u (m values) and v (n values) with sorted versions u_s, v_s, the quantile functions
// are step functions with breakpoints i/m and j/n, and
//     W_p(u, v)^p = integral_0^1 |F_u^-1(t) - F_v^-1(t)|^p dt.
// The breakpoints are merged exactly in integer units of 1/lcm(m, n) (the caller ensures
// lcm(m, n) < 2^62). For equal lengths this is W_p = mean(|u_s - v_s|^p)^(1/p), computed by the
// same routine as the pairwise matrix, so wasserstein_1d(a, b) == pairwise(...)[i, j] bit for bit. All sums are fp64, left to
// right. p >= 1 (validated by the caller); p == 1 and p == 2 avoid pow().
#pragma once

#include <cstdint>

// Functions whose float sums must round every product separately (no fused multiply-add), so
// that their NumPy twins (which always round products) reproduce them bit for bit. GCC: a
// function attribute; clang: a pragma at the top of the function body.
#if defined(__clang__)
#define MARS_NO_CONTRACT_ATTR
#define MARS_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define MARS_NO_CONTRACT_ATTR __attribute__((optimize("fp-contract=off")))
#define MARS_NO_CONTRACT_BODY
#else
#define MARS_NO_CONTRACT_ATTR
#define MARS_NO_CONTRACT_BODY
#endif

namespace mars {
namespace wasserstein {

// |d|^p for p >= 1 (|d| for p == 1, d*d for p == 2, pow otherwise).
double abs_pow(double d, double p);
// x^(1/p) (x for p == 1, sqrt for p == 2, pow otherwise).
double root_p(double x, double p);

// W_p^p between two ascending-sorted samples of any lengths m, n >= 1.
double wasserstein_pow_sorted(const double* u, std::int64_t m, const double* v, std::int64_t n,
                              double p);
// W_p between two samples of any lengths (copies and sorts them).
double wasserstein_1d(const double* u, std::int64_t m, const double* v, std::int64_t n, double p);

// W_p^p = mean(|a - b|^p) for two ascending-sorted vectors of equal length d, summed left to
// right without fused multiply-adds.
double wasserstein_pow_equal(const double* a, const double* b, std::int64_t d, double p);

// out[t] = wasserstein_pow_equal(a, b + t * d, d, p) for t in [0, count), bit for bit (rows of
// b are consecutive), several rows at a time.
void wasserstein_pow_equal_rows(const double* a, const double* b, std::int64_t count,
                                std::int64_t d, double p, double* out);

// Sorts every row of the row-major (n x d) matrix x into out (may alias x), rows in parallel.
void sort_rows(const double* x, std::int64_t n, std::int64_t d, double* out, int n_threads);

// out (n x n) = W_p between the rows of the row-major (n x d) matrix x, computed from the sorted
// rows. Symmetric with a zero diagonal; each pair is computed once, by one thread.
void pairwise_wasserstein(const double* x, std::int64_t n, std::int64_t d, double p, double* out,
                          int n_threads);
// Same from rows that are already sorted.
void pairwise_wasserstein_sorted(const double* sorted, std::int64_t n, std::int64_t d, double p,
                                 double* out, int n_threads);

// out (m x n) = W_p between the rows of the sorted (m x d) matrix a and the sorted (n x d)
// matrix b (rows of a in parallel). Identical rows give exactly 0, and every entry has the same
// bits as the corresponding pairwise entry.
void cross_wasserstein_sorted(const double* a, std::int64_t m, const double* b, std::int64_t n,
                              std::int64_t d, double p, double* out, int n_threads);

}  // namespace wasserstein
}  // namespace mars
