// wasserstein_1d(u, v, p) -> float ; pairwise_wasserstein(X, p, n_threads) -> (n, n) float64
#include <numeric>

#include "common.hpp"
#include "mars/wasserstein.hpp"

namespace mars_bindings {

namespace {

void check_p(double p) {
  if (!(p >= 1.0) || !std::isfinite(p)) {
    throw std::invalid_argument("p must be a finite real number >= 1, got " +
                                py::repr(py::float_(p)).cast<std::string>());
  }
}

DoubleArray sample_arg(const py::object& obj, const char* name) {
  DoubleArray a = as_float64(obj, name);
  if (a.ndim() != 1) {
    throw std::invalid_argument(std::string(name) + " must be 1-D, got shape " + shape_str(a));
  }
  if (a.shape(0) == 0) {
    throw std::invalid_argument(std::string(name) + " must not be empty (shape (0,))");
  }
  require_finite(a, name);
  return a;
}

double wasserstein_1d(const py::object& u_obj, const py::object& v_obj, double p) {
  check_p(p);
  DoubleArray u = sample_arg(u_obj, "u");
  DoubleArray v = sample_arg(v_obj, "v");
  const std::int64_t m = u.shape(0), n = v.shape(0);
  if (static_cast<double>(m / std::gcd(m, n)) * static_cast<double>(n) >= 0x1p62) {
    throw std::invalid_argument("lengths of u and v are too large: lcm(" + std::to_string(m) +
                                ", " + std::to_string(n) + ") must be < 2^62");
  }
  const double* up = u.data();
  const double* vp = v.data();
  py::gil_scoped_release release;
  return mars::wasserstein::wasserstein_1d(up, m, vp, n, p);
}

py::array_t<double> pairwise_wasserstein(const py::object& x_obj, double p, int n_threads) {
  check_p(p);
  n_threads = threads_arg(n_threads);
  DoubleArray x = as_float64(x_obj, "X");
  if (x.ndim() != 2) {
    throw std::invalid_argument("X must be 2-D (n_samples, d), got shape " + shape_str(x));
  }
  if (x.shape(0) == 0 || x.shape(1) == 0) {
    throw std::invalid_argument("X must not be empty, got shape " + shape_str(x));
  }
  require_finite(x, "X");
  const std::int64_t n = x.shape(0), d = x.shape(1);
  py::array_t<double> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(n)});
  const double* xp = x.data();
  double* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    mars::wasserstein::pairwise_wasserstein(xp, n, d, p, op, n_threads);
  }
  return out;
}

}  // namespace

void register_wasserstein(py::module_& m) {
  m.def("wasserstein_1d", &wasserstein_1d, py::arg("u"), py::arg("v"), py::arg("p") = 1.0,
        "W_p between the empirical distributions of two 1-D samples of any lengths.");
  m.def("pairwise_wasserstein", &pairwise_wasserstein, py::arg("X"), py::arg("p") = 1.0,
        py::arg("n_threads") = 0,
        "(n, n) matrix of W_p between the rows of X (n, d) seen as empirical distributions.");
}

}  // namespace mars_bindings
