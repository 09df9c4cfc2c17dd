// top_k_energy(values, kappa, rule) -> float64 1-D
#include "common.hpp"
#include "mars/topk.hpp"

#include <algorithm>
#include <vector>

namespace mars_bindings {

namespace {

py::array_t<double> top_k_energy(const py::object& values_obj, double kappa,
                                 const std::string& rule) {
  if (rule != "ceil" && rule != "quantile") {
    throw std::invalid_argument("rule must be \"ceil\" or \"quantile\", got \"" + rule + "\"");
  }
  if (!(kappa > 0.0 && kappa <= 1.0)) {
    throw std::invalid_argument("kappa must be in (0, 1], got " + py::repr(py::float_(kappa)).cast<std::string>());
  }
  DoubleArray values = as_float64(values_obj, "values");
  if (values.ndim() != 1) {
    throw std::invalid_argument("values must be 1-D, got shape " + shape_str(values));
  }
  if (values.shape(0) == 0) {
    throw std::invalid_argument("values must not be empty (shape (0,))");
  }
  require_finite(values, "values");
  const double* vp = values.data();
  const std::int64_t n = values.shape(0);
  std::vector<double> kept;
  {
    py::gil_scoped_release release;
    kept = rule == "ceil" ? mars::topk::top_k_ceil(vp, n, kappa)
                          : mars::topk::top_k_quantile(vp, n, kappa);
  }
  py::array_t<double> result(static_cast<py::ssize_t>(kept.size()));
  std::copy(kept.begin(), kept.end(), result.mutable_data());
  return result;
}

double linear_quantile(const py::object& values_obj, double q) {
  if (!(q >= 0.0 && q <= 1.0)) {
    throw std::invalid_argument("q must be in [0, 1], got " + py::repr(py::float_(q)).cast<std::string>());
  }
  DoubleArray values = as_float64(values_obj, "values");
  if (values.ndim() != 1 || values.shape(0) == 0) {
    throw std::invalid_argument("values must be 1-D and non-empty, got shape " + shape_str(values));
  }
  require_finite(values, "values");
  std::vector<double> sorted(values.data(), values.data() + values.shape(0));
  std::sort(sorted.begin(), sorted.end());
  return mars::topk::linear_quantile_sorted(sorted.data(), values.shape(0), q);
}

}  // namespace

void register_topk(py::module_& m) {
  m.def("top_k_energy", &top_k_energy, py::arg("values"), py::arg("kappa") = 0.05,
        py::arg("rule") = "ceil",
        "Per-layer concentration: the ceil(kappa*n) largest values sorted descending (rule "
        "\"ceil\"), or every value >= numpy's linear (1-kappa) quantile in input order (rule "
        "\"quantile\").");
  m.def("linear_quantile", &linear_quantile, py::arg("values"), py::arg("q"),
        "numpy.quantile(values, q) (method \"linear\"), bit for bit: the threshold of rule "
        "\"quantile\".");
  m.def("top_k_count", &mars::topk::ceil_count, py::arg("kappa"), py::arg("n"),
        "k = max(1, ceil(kappa * n)) robust to rounding (kappa*n within 1e-9 of an integer).");
}

}  // namespace mars_bindings
