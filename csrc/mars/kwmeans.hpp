// K-WMeans: K-Means for 1-D empirical distributions under the Wasserstein metric, plus the
// authors' "official" variant. Samples are the rows of a row-major (n x d) matrix (rows = CBEs).
//
// Mode::Paper   Each row is sorted once (its quantile function). k-means++ seeding with
//               probability proportional to the squared W_p distance to the nearest chosen
//               center; Lloyd iterations assign each sample to the center of smallest
//               W_p^p = mean(|x - c|^p) (ties -> lowest cluster index) and move each center to
//               the W_p barycenter of its members: coordinate-wise median (p = 1; even count:
//               mean of the two middle values) or mean (p = 2). p must be 1 or 2.
// Mode::Official The authors' code: D = pairwise W_p matrix of the (unsorted) rows, then ordinary
//               Euclidean K-Means (same seeding / Lloyd / restarts, squared Euclidean cost, mean
//               update) on the rows of D. cluster centers = element-wise mean of the members'
//               original rows.
//
// Both: an empty cluster receives the sample farthest from its own center (lowest index among
// equals; only from clusters with >= 2 members) and its center moves onto that sample. Lloyd stops
// when the labels stop changing, when tol > 0 and the squared center shift (sum over clusters and
// coordinates) is <= tol, or after max_iter iterations. inertia = sum of the per-sample costs
// (W_p^p in paper mode, squared Euclidean in official mode). n_init restarts, restart r seeded by
// rng::restart_seed(seed, r); the lowest inertia wins (first restart on ties).
//
// Determinism: all reductions (costs, cumulative seeding weights, means, inertia) are serial
// left-to-right sums without fused multiply-add, mirrored operation for operation by
// mars_native.reference.kwmeans, so both produce the same labels. Threads only split restarts or
// per-sample loops; results never depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace mars {
namespace kwmeans {

enum class Mode { Paper, Official };

struct Params {
  int n_clusters = 2;
  double p = 1.0;
  int n_init = 10;
  int max_iter = 100;
  double tol = 0.0;
  std::uint64_t seed = 0;
  Mode mode = Mode::Paper;
  int n_threads = 0;
};

struct Result {
  std::vector<std::int64_t> labels;  // (n,)
  std::vector<double> centers;       // (k, d): sorted barycenters (paper) / mean rows (official)
  double inertia = 0.0;
  int n_iter = 0;
  int best_init = 0;
  std::vector<double> distances;          // official: (n, n) pairwise W_p matrix
  std::vector<double> embedding_centers;  // official: (k, n) centers among the rows of D
};

// Validated by the caller: 1 <= n_clusters <= n, d >= 1, finite x, n_init >= 1, max_iter >= 1,
// tol >= 0, p in {1, 2} (paper) or p >= 1 (official).
Result fit(const double* x, std::int64_t n, std::int64_t d, const Params& params);

// Paper mode: label of each row of x (m x d) = the center (k x d, sorted) of smallest W_p^p.
void predict_paper(const double* x, std::int64_t m, std::int64_t d, const double* centers, int k,
                   double p, std::int64_t* labels, int n_threads);

// Official mode: W_p distances of each row of x (m x d) to the n training rows `train` (n x d),
// then the nearest embedding center (k x n) in squared Euclidean distance.
void predict_official(const double* x, std::int64_t m, std::int64_t d, const double* train,
                      std::int64_t n, const double* embedding_centers, int k, double p,
                      std::int64_t* labels, int n_threads);

}  // namespace kwmeans
}  // namespace mars
