#include "mars/kwmeans.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <limits>

#include "mars/parallel.hpp"
#include "mars/rng.hpp"
#include "mars/wasserstein.hpp"

// MARS_NO_CONTRACT_*: see wasserstein.hpp (the NumPy twin rounds every product separately, and
// labels must agree between the two).

namespace mars {
namespace kwmeans {

namespace {

enum class Cost { MeanAbs, MeanSquare, SumSquare };  // W_1, W_2^2 (sorted rows), Euclidean^2

// The points being clustered: `n` rows of length `dim`, with the cost and barycenter rules.
struct Space {
  const double* points;
  std::int64_t n;
  std::int64_t dim;
  Cost cost;
  bool median;  // barycenter: coordinate-wise median (W_1) or mean
  // Optional, for medians: column j of the points sorted ascending (col_values[j * n + t]) and
  // the row each value comes from (col_rows[j * n + t]); built once per fit, shared by restarts.
  const double* col_values = nullptr;
  const std::int32_t* col_rows = nullptr;
};

// The sorted columns of a Space (see Space::col_values), columns in parallel.
void sort_columns(const Space& s, std::vector<double>& values, std::vector<std::int32_t>& rows,
                  int n_threads) {
  const std::int64_t n = s.n, dim = s.dim;
  values.resize(static_cast<std::size_t>(n * dim));
  rows.resize(static_cast<std::size_t>(n * dim));
  parallel::parallel_for(dim, n_threads, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::pair<double, std::int32_t>> col(static_cast<std::size_t>(n));
    for (std::int64_t j = begin; j < end; ++j) {
      for (std::int64_t i = 0; i < n; ++i) {
        col[i] = {s.points[i * dim + j], static_cast<std::int32_t>(i)};
      }
      std::sort(col.begin(), col.end());
      for (std::int64_t t = 0; t < n; ++t) {
        values[j * n + t] = col[t].first;
        rows[j * n + t] = col[t].second;
      }
    }
  });
}

MARS_NO_CONTRACT_ATTR double cost(const Space& s, const double* a, const double* b) {
  MARS_NO_CONTRACT_BODY
  double sum = 0.0;
  if (s.cost == Cost::MeanAbs) {
    for (std::int64_t j = 0; j < s.dim; ++j) sum += std::fabs(a[j] - b[j]);
    return sum / static_cast<double>(s.dim);
  }
  for (std::int64_t j = 0; j < s.dim; ++j) {
    const double diff = a[j] - b[j];
    sum += diff * diff;
  }
  return s.cost == Cost::MeanSquare ? sum / static_cast<double>(s.dim) : sum;
}

// out[t] = nan_to_inf-free cost(s, row begin + t, center) for t < end - begin: the same serial sum
// per row as cost(), for eight rows at a time (eight independent dependency chains instead of one,
// so the adds overlap). Bit-identical to calling cost() row by row.
MARS_NO_CONTRACT_ATTR void costs_to(const Space& s, const double* center, std::int64_t begin,
                                    std::int64_t end, double* out) {
  MARS_NO_CONTRACT_BODY
  constexpr int kRows = 8;
  const std::int64_t dim = s.dim;
  std::int64_t i = begin;
  for (; i + kRows <= end; i += kRows) {
    const double* x = s.points + i * dim;
    double sum[kRows] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (s.cost == Cost::MeanAbs) {
      for (std::int64_t j = 0; j < dim; ++j) {
        const double c = center[j];
        for (int r = 0; r < kRows; ++r) sum[r] += std::fabs(x[r * dim + j] - c);
      }
    } else {
      for (std::int64_t j = 0; j < dim; ++j) {
        const double c = center[j];
        for (int r = 0; r < kRows; ++r) {
          const double diff = x[r * dim + j] - c;
          sum[r] += diff * diff;
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      out[i - begin + r] = s.cost == Cost::SumSquare ? sum[r] : sum[r] / static_cast<double>(dim);
    }
  }
  for (; i < end; ++i) out[i - begin] = cost(s, s.points + i * dim, center);
}

// k-means++ weight of a cost: the squared distance (W_1 cost is a distance, the others already
// are squared distances).
MARS_NO_CONTRACT_ATTR double seed_weight(const Space& s, double c) {
  MARS_NO_CONTRACT_BODY
  return s.cost == Cost::MeanAbs ? c * c : c;
}

MARS_NO_CONTRACT_ATTR double squared_shift(const double* a, const double* b, std::int64_t len) {
  MARS_NO_CONTRACT_BODY
  double sum = 0.0;
  for (std::int64_t j = 0; j < len; ++j) {
    const double diff = a[j] - b[j];
    sum += diff * diff;
  }
  return sum;
}

// Costs of samples whose differences overflow (|x| near DBL_MAX) can be NaN (inf - inf); they
// count as infinitely far so that every comparison below stays well defined.
inline double nan_to_inf(double v) {
  return std::isnan(v) ? std::numeric_limits<double>::infinity() : v;
}

struct Run {
  std::vector<std::int64_t> labels;
  std::vector<double> centers;
  double inertia = 0.0;
  int n_iter = 0;
};

void kmeans_plus_plus(const Space& s, int k, rng::SplitMix64& gen, double* centers) {
  const std::int64_t n = s.n, dim = s.dim;
  std::vector<char> chosen(static_cast<std::size_t>(n), 0);
  std::vector<double> weight(static_cast<std::size_t>(n));
  auto take = [&](int c, std::int64_t idx) {
    chosen[idx] = 1;
    std::copy(s.points + idx * dim, s.points + (idx + 1) * dim, centers + c * dim);
  };
  std::int64_t first = static_cast<std::int64_t>(gen.uniform() * static_cast<double>(n));
  take(0, std::min(first, n - 1));
  costs_to(s, centers, 0, n, weight.data());
  for (std::int64_t i = 0; i < n; ++i) weight[i] = nan_to_inf(seed_weight(s, weight[i]));
  for (int c = 1; c < k; ++c) {
    double total = 0.0;
    std::vector<double> cumulative(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) cumulative[i] = total += weight[i];
    std::int64_t idx = -1;
    if (total > 0.0 && std::isfinite(total)) {
      const double target = gen.uniform() * total;
      for (std::int64_t i = 0; i < n && idx < 0; ++i) {
        if (cumulative[i] > target) idx = i;
      }
      for (std::int64_t i = n - 1; i >= 0 && idx < 0; --i) {
        if (weight[i] > 0.0) idx = i;
      }
    } else if (total > 0.0) {  // overflowed: the first largest weight
      idx = std::max_element(weight.begin(), weight.end()) - weight.begin();
    } else {  // every sample sits on a chosen center: lowest unchosen index
      idx = std::find(chosen.begin(), chosen.end(), 0) - chosen.begin();
    }
    take(c, idx);
    if (c + 1 < k) {
      std::vector<double> cost_c(static_cast<std::size_t>(n));
      costs_to(s, centers + c * dim, 0, n, cost_c.data());
      for (std::int64_t i = 0; i < n; ++i) {
        weight[i] = std::min(weight[i], nan_to_inf(seed_weight(s, cost_c[i])));
      }
    }
  }
}

// labels[i] = argmin_c cost(x_i, center_c) (lowest c on ties); costs[i] = that cost.
void assign(const Space& s, int k, const double* centers, std::int64_t* labels, double* costs,
            int n_threads) {
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(k * s.dim, 1));
  parallel::parallel_for(s.n, n_threads, grain, [&](std::int64_t begin, std::int64_t end) {
    // Center by center over the whole range (costs_to interleaves rows); the same comparisons,
    // in the same order, as a per-row loop over the centers.
    costs_to(s, centers, begin, end, costs + begin);
    for (std::int64_t i = begin; i < end; ++i) {
      costs[i] = nan_to_inf(costs[i]);
      labels[i] = 0;
    }
    std::vector<double> v(static_cast<std::size_t>(k > 1 ? end - begin : 0));
    for (int c = 1; c < k; ++c) {
      costs_to(s, centers + c * s.dim, begin, end, v.data());
      for (std::int64_t i = begin; i < end; ++i) {
        const double vc = nan_to_inf(v[i - begin]);
        if (vc < costs[i]) {
          costs[i] = vc;
          labels[i] = c;
        }
      }
    }
  });
}

// Every empty cluster takes the sample farthest from its center among clusters with >= 2
// members (lowest index among equals); its center moves onto that sample.
void fill_empty_clusters(const Space& s, int k, double* centers, std::int64_t* labels,
                         double* costs) {
  std::vector<std::int64_t> count(static_cast<std::size_t>(k), 0);
  for (std::int64_t i = 0; i < s.n; ++i) ++count[labels[i]];
  for (int c = 0; c < k; ++c) {
    if (count[c] > 0) continue;
    std::int64_t far = -1;
    double far_cost = -std::numeric_limits<double>::infinity();
    for (std::int64_t i = 0; i < s.n; ++i) {
      if (count[labels[i]] > 1 && (far < 0 || costs[i] > far_cost)) {  // costs are never NaN
        far = i;
        far_cost = costs[i];
      }
    }
    --count[labels[far]];
    labels[far] = c;
    count[c] = 1;
    costs[far] = 0.0;
    std::copy(s.points + far * s.dim, s.points + (far + 1) * s.dim, centers + c * s.dim);
  }
}

// centers = barycenters of the clusters (every cluster is non-empty here).
void barycenters(const Space& s, int k, const std::int64_t* labels, double* centers) {
  const std::int64_t dim = s.dim;
  std::vector<std::int64_t> count(static_cast<std::size_t>(k), 0);
  for (std::int64_t i = 0; i < s.n; ++i) ++count[labels[i]];
  if (!s.median) {
    std::fill(centers, centers + k * dim, 0.0);
    for (std::int64_t i = 0; i < s.n; ++i) {
      double* c = centers + labels[i] * dim;
      const double* x = s.points + i * dim;
      for (std::int64_t j = 0; j < dim; ++j) c[j] += x[j];
    }
    for (int c = 0; c < k; ++c) {
      for (std::int64_t j = 0; j < dim; ++j) centers[c * dim + j] /= static_cast<double>(count[c]);
    }
    return;
  }
  if (s.col_values != nullptr) {
    // Median from the presorted columns: walk column j in ascending order, counting each
    // cluster's members, and pick every cluster's middle element(s) on the way (one pass for
    // all clusters). The same values as the selection below (a rank depends on values only).
    std::vector<std::int64_t> lo_rank(static_cast<std::size_t>(k)), hi_rank(lo_rank.size());
    std::vector<std::int64_t> seen(lo_rank.size());
    std::vector<double> lo(lo_rank.size()), hi(lo_rank.size());
    for (int c = 0; c < k; ++c) {
      lo_rank[c] = (count[c] - 1) / 2;
      hi_rank[c] = count[c] / 2;
    }
    for (std::int64_t j = 0; j < dim; ++j) {
      const double* values = s.col_values + j * s.n;
      const std::int32_t* rows = s.col_rows + j * s.n;
      std::fill(seen.begin(), seen.end(), 0);
      int remaining = k;
      for (std::int64_t t = 0; t < s.n && remaining > 0; ++t) {
        const std::int64_t c = labels[rows[t]];
        const std::int64_t r = seen[c]++;
        if (r == lo_rank[c]) lo[c] = values[t];
        if (r == hi_rank[c]) {
          hi[c] = values[t];
          --remaining;
        }
      }
      for (int c = 0; c < k; ++c) {
        centers[c * dim + j] = count[c] % 2 == 1 ? hi[c] : (lo[c] + hi[c]) / 2.0;
      }
    }
    return;
  }
  // Median: gather each cluster's members transposed (one contiguous column per coordinate),
  // then select the middle element(s); the value does not depend on the selection algorithm.
  std::vector<double> columns;
  for (int c = 0; c < k; ++c) {
    const std::int64_t m = count[c];
    columns.resize(static_cast<std::size_t>(m * dim));
    std::int64_t t = 0;
    for (std::int64_t i = 0; i < s.n; ++i) {
      if (labels[i] != c) continue;
      const double* x = s.points + i * dim;
      for (std::int64_t j = 0; j < dim; ++j) columns[j * m + t] = x[j];
      ++t;
    }
    for (std::int64_t j = 0; j < dim; ++j) {
      double* col = columns.data() + j * m;
      std::nth_element(col, col + m / 2, col + m);
      const double upper = col[m / 2];
      centers[c * dim + j] =
          m % 2 == 1 ? upper : (*std::max_element(col, col + m / 2) + upper) / 2.0;
    }
  }
}

Run lloyd(const Space& s, const Params& params, std::uint64_t seed, int n_threads) {
  const int k = params.n_clusters;
  Run run;
  run.centers.resize(static_cast<std::size_t>(k * s.dim));
  run.labels.resize(static_cast<std::size_t>(s.n));
  std::vector<std::int64_t> new_labels(static_cast<std::size_t>(s.n));
  std::vector<double> costs(static_cast<std::size_t>(s.n));
  std::vector<double> new_centers(run.centers.size());
  rng::SplitMix64 gen(seed);
  kmeans_plus_plus(s, k, gen, run.centers.data());
  assign(s, k, run.centers.data(), run.labels.data(), costs.data(), n_threads);
  fill_empty_clusters(s, k, run.centers.data(), run.labels.data(), costs.data());
  for (int it = 0; it < params.max_iter; ++it) {
    barycenters(s, k, run.labels.data(), new_centers.data());
    const double shift =
        squared_shift(new_centers.data(), run.centers.data(), static_cast<std::int64_t>(new_centers.size()));
    run.centers.swap(new_centers);
    assign(s, k, run.centers.data(), new_labels.data(), costs.data(), n_threads);
    fill_empty_clusters(s, k, run.centers.data(), new_labels.data(), costs.data());
    run.n_iter = it + 1;
    const bool changed = new_labels != run.labels;
    run.labels.swap(new_labels);
    if (!changed || (params.tol > 0.0 && shift <= params.tol)) break;
  }
  run.inertia = 0.0;
  for (double c : costs) run.inertia += c;
  return run;
}

}  // namespace

Result fit(const double* x, std::int64_t n, std::int64_t d, const Params& params) {
  const int threads = parallel::resolve_threads(params.n_threads);
  Result result;
  std::vector<double> sorted(static_cast<std::size_t>(n * d));
  wasserstein::sort_rows(x, n, d, sorted.data(), threads);
  Space space{sorted.data(), n, d, params.p == 1.0 ? Cost::MeanAbs : Cost::MeanSquare,
              params.p == 1.0};
  std::vector<double> col_values;
  std::vector<std::int32_t> col_rows;
  if (params.mode == Mode::Paper && space.median && n > 1 && n <= INT32_MAX) {
    sort_columns(space, col_values, col_rows, threads);
    space.col_values = col_values.data();
    space.col_rows = col_rows.data();
  }
  if (params.mode == Mode::Official) {
    result.distances.resize(static_cast<std::size_t>(n * n));
    wasserstein::pairwise_wasserstein_sorted(sorted.data(), n, d, params.p, result.distances.data(),
                                             threads);
    space = Space{result.distances.data(), n, n, Cost::SumSquare, false};
  }
  // Restarts run in parallel (each on one thread); with a single restart the per-sample loops
  // use the threads instead. The winner is chosen serially.
  const int n_init = params.n_init;
  const int inner_threads = n_init == 1 ? threads : 1;
  std::vector<Run> runs(static_cast<std::size_t>(n_init));
  parallel::parallel_for(n_init, threads, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      runs[r] = lloyd(space, params, rng::restart_seed(params.seed, static_cast<int>(r)),
                      inner_threads);
    }
  });
  int best = 0;
  for (int r = 1; r < n_init; ++r) {
    if (runs[r].inertia < runs[best].inertia) best = r;
  }
  Run& win = runs[best];
  result.labels = win.labels;
  result.inertia = win.inertia;
  result.n_iter = win.n_iter;
  result.best_init = best;
  if (params.mode == Mode::Paper) {
    result.centers = win.centers;
    return result;
  }
  // Official: centers are the element-wise means of the members' original (unsorted) rows.
  const int k = params.n_clusters;
  result.embedding_centers = win.centers;
  result.centers.assign(static_cast<std::size_t>(k * d), 0.0);
  std::vector<std::int64_t> count(static_cast<std::size_t>(k), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    ++count[win.labels[i]];
    for (std::int64_t j = 0; j < d; ++j) result.centers[win.labels[i] * d + j] += x[i * d + j];
  }
  for (int c = 0; c < k; ++c) {
    for (std::int64_t j = 0; j < d; ++j) result.centers[c * d + j] /= static_cast<double>(count[c]);
  }
  return result;
}

void predict_paper(const double* x, std::int64_t m, std::int64_t d, const double* centers, int k,
                   double p, std::int64_t* labels, int n_threads) {
  std::vector<double> sorted(static_cast<std::size_t>(m * d));
  wasserstein::sort_rows(x, m, d, sorted.data(), n_threads);
  const Space space{sorted.data(), m, d, p == 1.0 ? Cost::MeanAbs : Cost::MeanSquare, p == 1.0};
  std::vector<double> costs(static_cast<std::size_t>(m));
  assign(space, k, centers, labels, costs.data(), n_threads);
}

void predict_official(const double* x, std::int64_t m, std::int64_t d, const double* train,
                      std::int64_t n, const double* embedding_centers, int k, double p,
                      std::int64_t* labels, int n_threads) {
  std::vector<double> xs(static_cast<std::size_t>(m * d)), ts(static_cast<std::size_t>(n * d));
  wasserstein::sort_rows(x, m, d, xs.data(), n_threads);
  wasserstein::sort_rows(train, n, d, ts.data(), n_threads);
  std::vector<double> dist(static_cast<std::size_t>(m * n));
  wasserstein::cross_wasserstein_sorted(xs.data(), m, ts.data(), n, d, p, dist.data(), n_threads);
  const Space space{dist.data(), m, n, Cost::SumSquare, false};
  std::vector<double> costs(static_cast<std::size_t>(m));
  assign(space, k, embedding_centers, labels, costs.data(), n_threads);
}

}  // namespace kwmeans
}  // namespace mars
