// top_k_energy(values, kappa, rule) -> float64 1-D
// top_k_concat(layers, kappa, rule) -> float64 1-D: top_k_energy of every layer, concatenated
#include "common.hpp"
#include "mars/topk.hpp"

#include <algorithm>
#include <vector>

namespace mars_bindings {

namespace {

void check_rule(const std::string& rule, double kappa) {
  if (rule != "ceil" && rule != "quantile") {
    throw std::invalid_argument("rule must be \"ceil\" or \"quantile\", got \"" + rule + "\"");
  }
  if (!(kappa > 0.0 && kappa <= 1.0)) {
    throw std::invalid_argument("kappa must be in (0, 1], got " + py::repr(py::float_(kappa)).cast<std::string>());
  }
}

// One layer's values: 1-D, non-empty, finite (ValueError naming `name` otherwise).
DoubleArray layer_values(const py::handle& obj, const std::string& name) {
  DoubleArray values = as_float64(obj, name.c_str());
  if (values.ndim() != 1) {
    throw std::invalid_argument(name + " must be 1-D, got shape " + shape_str(values));
  }
  if (values.shape(0) == 0) {
    throw std::invalid_argument(name + " must not be empty (shape (0,))");
  }
  require_finite(values, name.c_str());
  return values;
}

std::vector<double> top_values(const DoubleArray& values, double kappa, const std::string& rule) {
  const double* vp = values.data();
  const std::int64_t n = values.shape(0);
  return rule == "ceil" ? mars::topk::top_k_ceil(vp, n, kappa)
                        : mars::topk::top_k_quantile(vp, n, kappa);
}

py::array_t<double> to_array(const std::vector<double>& v) {
  py::array_t<double> result(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), result.mutable_data());
  return result;
}

py::array_t<double> top_k_energy(const py::object& values_obj, double kappa,
                                 const std::string& rule) {
  check_rule(rule, kappa);
  const DoubleArray values = layer_values(values_obj, "values");
  std::vector<double> kept;
  {
    py::gil_scoped_release release;
    kept = top_values(values, kappa, rule);
  }
  return to_array(kept);
}

// The CBE of one model from its layers' values: top_k_energy of each, concatenated in order
// (one call instead of one per layer; the layers are small, so the GIL is kept).
py::array_t<double> top_k_concat(const py::object& layers_obj, double kappa,
                                 const std::string& rule) {
  check_rule(rule, kappa);
  if (!py::isinstance<py::list>(layers_obj) && !py::isinstance<py::tuple>(layers_obj)) {
    throw py::type_error("layers must be a list or tuple of arrays, got " +
                         py::str(py::type::of(layers_obj)).cast<std::string>());
  }
  const auto layers = py::reinterpret_borrow<py::sequence>(layers_obj);
  if (py::len(layers) == 0) throw std::invalid_argument("layers must not be empty");
  std::vector<double> out;
  for (std::size_t i = 0; i < py::len(layers); ++i) {
    const DoubleArray values = layer_values(layers[i], "layers[" + std::to_string(i) + "]");
    const std::vector<double> kept = top_values(values, kappa, rule);
    out.insert(out.end(), kept.begin(), kept.end());
  }
  return to_array(out);
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
  m.def("top_k_concat", &top_k_concat, py::arg("layers"), py::arg("kappa") = 0.05,
        py::arg("rule") = "ceil",
        "top_k_energy of every layer's values (1-D, non-empty, finite), concatenated in layer "
        "order: a model's CBE from its BE values in one call.");
  m.def("linear_quantile", &linear_quantile, py::arg("values"), py::arg("q"),
        "numpy.quantile(values, q) (method \"linear\"), bit for bit: the threshold of rule "
        "\"quantile\".");
  m.def("top_k_count", &mars::topk::ceil_count, py::arg("kappa"), py::arg("n"),
        "k = max(1, ceil(kappa * n)) robust to rounding (kappa*n within 1e-9 of an integer).");
}

}  // namespace mars_bindings
