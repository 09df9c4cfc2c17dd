// Per-layer top-k concentration of backdoor energies (the CBE building block).
//
// Two rules:
//  * ceil (the paper):   the k = max(1, ceil(kappa * n)) largest values, sorted descending. kappa*n
//    within 1e-9 (relative) of an integer counts as that integer, so kappa = 0.07, n = 100 keeps
//    7 values even though 0.07 * 100 == 7.000000000000001 in binary floating point.
//  * quantile (the authors' code): every value >= numpy's default ("linear") quantile at
//    q = 1 - kappa, in input order (ties can keep more than ceil(kappa * n) values). The threshold
//    replicates numpy's arithmetic operation for operation, so it is bit-identical to np.quantile.
// Inputs are validated by the caller: n >= 1, finite values, 0 < kappa <= 1.
#pragma once

#include <cstdint>
#include <vector>

namespace mars {
namespace topk {

// k = max(1, ceil(kappa * n)) with the near-integer rule above, clamped to n.
std::int64_t ceil_count(double kappa, std::int64_t n);

// numpy.quantile(values, q) with method="linear" for ascending-sorted values (n >= 1).
double linear_quantile_sorted(const double* sorted, std::int64_t n, double q);

// The k = ceil_count(kappa, n) largest values, sorted descending.
std::vector<double> top_k_ceil(const double* values, std::int64_t n, double kappa);

// Every value >= linear quantile at 1 - kappa, in input order.
std::vector<double> top_k_quantile(const double* values, std::int64_t n, double kappa);

}  // namespace topk
}  // namespace mars
