// channel_spectral_norms(weight, scale=None, n_threads=0) -> float64 (out,)
#include "common.hpp"
#include "mars/spectral.hpp"

namespace mars_bindings {

namespace {

template <typename T>
py::array_t<double> spectral_typed(const py::array& weight, const DoubleArray* scale,
                                   int n_threads) {
  // float32 / float64 C-contiguous input is read in place; anything else is copied to a
  // C-contiguous array of the same dtype first.
  using Contig = py::array_t<T, py::array::c_style | py::array::forcecast>;
  Contig w = Contig::ensure(weight);
  if (!w) throw py::error_already_set();
  const std::int64_t out = w.shape(0);
  const std::int64_t rows = w.shape(1);
  std::int64_t cols = 1;
  for (py::ssize_t d = 2; d < w.ndim(); ++d) cols *= w.shape(d);
  py::array_t<double> result(static_cast<py::ssize_t>(out));
  const T* wp = w.data();
  const double* sp = scale ? scale->data() : nullptr;
  double* rp = result.mutable_data();
  {
    py::gil_scoped_release release;
    mars::spectral::channel_spectral_norms(wp, out, rows, cols, sp, rp, n_threads);
  }
  return result;
}

py::array_t<double> channel_spectral_norms(const py::object& weight_obj, const py::object& scale_obj,
                                           int n_threads) {
  n_threads = threads_arg(n_threads);
  py::array weight = py::array::ensure(weight_obj);
  if (!weight) {
    PyErr_Clear();
    throw py::type_error("weight must be a float32 or float64 array, got " +
                         py::str(py::type::of(weight_obj)).cast<std::string>());
  }
  const bool is_f32 = weight.dtype().equal(py::dtype::of<float>());
  const bool is_f64 = weight.dtype().equal(py::dtype::of<double>());
  if (!is_f32 && !is_f64) {
    throw py::type_error("weight must be a float32 or float64 array, got " + describe(weight));
  }
  if (weight.ndim() < 2) {
    throw std::invalid_argument(
        "weight must have ndim >= 2, shape (out, in, *kernel) or (out, in) for a Linear layer; "
        "got shape " + shape_str(weight));
  }
  DoubleArray scale;
  const bool has_scale = !scale_obj.is_none();
  if (has_scale) {
    scale = as_float64(scale_obj, "scale");
    if (scale.ndim() != 1 || scale.shape(0) != weight.shape(0)) {
      throw std::invalid_argument("scale must have shape (" + std::to_string(weight.shape(0)) +
                                  ",) to match weight of shape " + shape_str(weight) + ", got " +
                                  shape_str(scale));
    }
    require_finite(scale, "scale");
  }
  const DoubleArray* sp = has_scale ? &scale : nullptr;
  return is_f32 ? spectral_typed<float>(weight, sp, n_threads)
                : spectral_typed<double>(weight, sp, n_threads);
}

}  // namespace

void register_spectral(py::module_& m) {
  m.def("channel_spectral_norms", &channel_spectral_norms, py::arg("weight"),
        py::arg("scale") = py::none(), py::arg("n_threads") = 0,
        "Largest singular value of every output channel (weight[k] reshaped to (in, prod(kernel))),"
        " times scale[k]. weight: float32/float64 (out, in, *kernel); returns float64 (out,).");
}

}  // namespace mars_bindings
