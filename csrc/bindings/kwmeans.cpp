// kwmeans_fit(...) -> dict ; kwmeans_predict(...) -> int64 labels. The estimator API lives in
// mars_native/cluster.py; these functions validate everything again so that direct calls can
// never crash.
#include <algorithm>

#include "common.hpp"
#include "mars/kwmeans.hpp"
#include "mars/rng.hpp"

namespace mars_bindings {

namespace {

using mars::kwmeans::Mode;

Mode mode_arg(const std::string& mode) {
  if (mode == "paper") return Mode::Paper;
  if (mode == "official") return Mode::Official;
  throw std::invalid_argument("mode must be \"paper\" or \"official\", got \"" + mode + "\"");
}

void check_p(double p, Mode mode) {
  if (mode == Mode::Paper && p != 1.0 && p != 2.0) {
    throw std::invalid_argument(
        "p must be 1 or 2 in paper mode (the W_1 / W_2 barycenters are the coordinate-wise "
        "median / mean of the sorted rows), got " + py::repr(py::float_(p)).cast<std::string>());
  }
  if (!(p >= 1.0) || !std::isfinite(p)) {
    throw std::invalid_argument("p must be a finite real number >= 1, got " +
                                py::repr(py::float_(p)).cast<std::string>());
  }
}

DoubleArray matrix_arg(const py::object& obj, const char* name, bool finite = true) {
  DoubleArray a = as_float64(obj, name);
  if (a.ndim() != 2) {
    throw std::invalid_argument(std::string(name) + " must be 2-D (n_samples, d), got shape " +
                                shape_str(a));
  }
  if (a.shape(0) == 0 || a.shape(1) == 0) {
    throw std::invalid_argument(std::string(name) + " must not be empty, got shape " +
                                shape_str(a));
  }
  if (finite) require_finite(a, name);
  return a;
}

py::array_t<double> to_array(const std::vector<double>& v, py::ssize_t rows, py::ssize_t cols) {
  py::array_t<double> out({rows, cols});
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

py::dict kwmeans_fit(const py::object& x_obj, int n_clusters, double p, int n_init, int max_iter,
                     double tol, std::uint64_t seed, const std::string& mode_name, int n_threads) {
  const Mode mode = mode_arg(mode_name);
  check_p(p, mode);
  n_threads = threads_arg(n_threads);
  DoubleArray x = matrix_arg(x_obj, "X");
  const std::int64_t n = x.shape(0), d = x.shape(1);
  if (n_clusters < 1 || n_clusters > n) {
    throw std::invalid_argument("n_clusters=" + std::to_string(n_clusters) +
                                " must be >= 1 and <= n_samples=" + std::to_string(n) +
                                " (X has shape " + shape_str(x) + ")");
  }
  if (n_init < 1) throw std::invalid_argument("n_init must be >= 1, got " + std::to_string(n_init));
  if (max_iter < 1) {
    throw std::invalid_argument("max_iter must be >= 1, got " + std::to_string(max_iter));
  }
  if (!(tol >= 0.0) || !std::isfinite(tol)) {
    throw std::invalid_argument("tol must be a finite number >= 0, got " +
                                py::repr(py::float_(tol)).cast<std::string>());
  }
  mars::kwmeans::Params params;
  params.n_clusters = n_clusters;
  params.p = p;
  params.n_init = n_init;
  params.max_iter = max_iter;
  params.tol = tol;
  params.seed = seed;
  params.mode = mode;
  params.n_threads = n_threads;
  const double* xp = x.data();
  mars::kwmeans::Result r;
  {
    py::gil_scoped_release release;
    r = mars::kwmeans::fit(xp, n, d, params);
  }
  py::dict out;
  py::array_t<std::int64_t> labels(static_cast<py::ssize_t>(n));
  std::copy(r.labels.begin(), r.labels.end(), labels.mutable_data());
  out["labels"] = labels;
  out["centers"] = to_array(r.centers, n_clusters, d);
  out["inertia"] = r.inertia;
  out["n_iter"] = r.n_iter;
  out["best_init"] = r.best_init;
  if (mode == Mode::Official) {
    out["distances"] = to_array(r.distances, n, n);
    out["embedding_centers"] = to_array(r.embedding_centers, n_clusters, n);
  }
  return out;
}

py::array_t<std::int64_t> kwmeans_predict(const py::object& x_obj, const py::object& centers_obj,
                                          double p, const std::string& mode_name,
                                          const py::object& train_obj, int n_threads) {
  const Mode mode = mode_arg(mode_name);
  check_p(p, mode);
  n_threads = threads_arg(n_threads);
  DoubleArray x = matrix_arg(x_obj, "X");
  // Fitted centers may hold Inf/NaN when the training distances overflowed: accepted here.
  DoubleArray centers = matrix_arg(centers_obj, "centers", false);
  const std::int64_t m = x.shape(0), d = x.shape(1);
  const int k = static_cast<int>(centers.shape(0));
  py::array_t<std::int64_t> labels(static_cast<py::ssize_t>(m));
  std::int64_t* lp = labels.mutable_data();
  const double* xp = x.data();
  const double* cp = centers.data();
  if (mode == Mode::Paper) {
    if (centers.shape(1) != d) {
      throw std::invalid_argument("X has " + std::to_string(d) + " features per sample (shape " +
                                  shape_str(x) + ") but the centers have " +
                                  std::to_string(centers.shape(1)) + " (shape " +
                                  shape_str(centers) + ")");
    }
    py::gil_scoped_release release;
    mars::kwmeans::predict_paper(xp, m, d, cp, k, p, lp, n_threads);
    return labels;
  }
  if (train_obj.is_none()) throw std::invalid_argument("official mode needs the training rows");
  DoubleArray train = matrix_arg(train_obj, "train");
  const std::int64_t n = train.shape(0);
  if (train.shape(1) != d || centers.shape(1) != n) {
    throw std::invalid_argument("X has shape " + shape_str(x) + ", the training rows " +
                                shape_str(train) + " and the embedding centers " +
                                shape_str(centers) + "; expected (m, d), (n, d) and (k, n)");
  }
  const double* tp = train.data();
  py::gil_scoped_release release;
  mars::kwmeans::predict_official(xp, m, d, tp, n, cp, k, p, lp, n_threads);
  return labels;
}

// The first `count` outputs and uniforms of SplitMix64(seed): lets the tests compare the C++
// generator with its Python twin directly.
py::tuple splitmix64_stream(std::uint64_t seed, int count) {
  if (count < 0 || count > (1 << 20)) {
    throw std::invalid_argument("count must be in [0, 2^20], got " + std::to_string(count));
  }
  py::array_t<std::uint64_t> raw(count);
  py::array_t<double> uniform(count);
  mars::rng::SplitMix64 a(seed), b(seed);
  for (int i = 0; i < count; ++i) {
    raw.mutable_data()[i] = a.next();
    uniform.mutable_data()[i] = b.uniform();
  }
  return py::make_tuple(raw, uniform, mars::rng::restart_seed(seed, count));
}

}  // namespace

void register_kwmeans(py::module_& m) {
  m.def("kwmeans_fit", &kwmeans_fit, py::arg("X"), py::arg("n_clusters"), py::arg("p"),
        py::arg("n_init"), py::arg("max_iter"), py::arg("tol"), py::arg("seed"), py::arg("mode"),
        py::arg("n_threads") = 0,
        "K-WMeans fit; returns a dict (labels, centers, inertia, n_iter, best_init[, distances, "
        "embedding_centers]). Use mars_native.KWMeans.");
  m.def("kwmeans_predict", &kwmeans_predict, py::arg("X"), py::arg("centers"), py::arg("p"),
        py::arg("mode"), py::arg("train") = py::none(), py::arg("n_threads") = 0,
        "Labels of new samples for a fitted K-WMeans. Use mars_native.KWMeans.predict.");
  m.def("splitmix64_stream", &splitmix64_stream, py::arg("seed"), py::arg("count"),
        "(outputs, uniforms, restart_seed(seed, count)) of the core's generator (for tests).");
}

}  // namespace mars_bindings
