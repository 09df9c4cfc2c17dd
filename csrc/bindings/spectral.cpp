// channel_spectral_norms(weight, scale=None, n_threads=0) -> float64 (out,)
#include "common.hpp"
#include "mars/spectral.hpp"

#include <string>
#include <vector>

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

// The layers of one dtype: contiguous arrays kept alive, their views, their results.
template <typename T>
struct Batch {
  using Contig = py::array_t<T, py::array::c_style | py::array::forcecast>;
  std::vector<Contig> arrays;
  std::vector<mars::spectral::LayerView<T>> views;
  std::vector<std::size_t> index;  // position of each layer in the caller's list
  std::vector<std::int64_t> keep;  // per layer; -1: every value exact
};

template <typename T>
void add_layer(Batch<T>& batch, const py::array& weight, const DoubleArray* scale,
               py::array_t<double>& result, std::size_t i, std::int64_t keep) {
  typename Batch<T>::Contig w = Batch<T>::Contig::ensure(weight);
  if (!w) throw py::error_already_set();
  std::int64_t cols = 1;
  for (py::ssize_t d = 2; d < w.ndim(); ++d) cols *= w.shape(d);
  batch.views.push_back({w.data(), w.shape(0), w.shape(1), cols,
                         scale ? scale->data() : nullptr, result.mutable_data()});
  batch.arrays.push_back(std::move(w));
  batch.index.push_back(i);
  batch.keep.push_back(keep);
}

py::list channel_spectral_norms_batch(const py::sequence& weights, const py::sequence& scales,
                                      int n_threads, const py::object& keep_obj) {
  n_threads = threads_arg(n_threads);
  const std::size_t n = static_cast<std::size_t>(py::len(weights));
  if (static_cast<std::size_t>(py::len(scales)) != n) {
    throw std::invalid_argument("scales must have one entry (an array or None) per weight: " +
                                std::to_string(n) + " weights, " +
                                std::to_string(py::len(scales)) + " scales");
  }
  std::vector<std::int64_t> keep(n, -1);
  const bool has_keep = !keep_obj.is_none();
  if (has_keep) {
    if (!py::isinstance<py::sequence>(keep_obj) || py::isinstance<py::str>(keep_obj)) {
      throw py::type_error("keep must be None or a sequence of ints (one per weight)");
    }
    const py::sequence ks = keep_obj.cast<py::sequence>();
    if (static_cast<std::size_t>(py::len(ks)) != n) {
      throw std::invalid_argument("keep must have one count per weight: " + std::to_string(n) +
                                  " weights, " + std::to_string(py::len(ks)) + " counts");
    }
    for (std::size_t i = 0; i < n; ++i) {
      const py::object k = ks[i];
      if (!py::isinstance<py::int_>(k) || py::isinstance<py::bool_>(k)) {
        throw py::type_error("keep[" + std::to_string(i) + "] must be an int, got " +
                             py::str(py::type::of(k)).cast<std::string>());
      }
      try {
        keep[i] = k.cast<std::int64_t>();
      } catch (const py::cast_error&) {
        throw std::invalid_argument("keep[" + std::to_string(i) + "] does not fit in int64");
      }
    }
  }
  Batch<float> f32;
  Batch<double> f64;
  std::vector<DoubleArray> scale_arrays(n);
  std::vector<bool> has_scale(n, false);
  std::vector<py::array_t<double>> results;
  results.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::string name = "weights[" + std::to_string(i) + "]";
    py::array weight = py::array::ensure(weights[i]);
    if (!weight) {
      PyErr_Clear();
      throw py::type_error(name + " must be a float32 or float64 array");
    }
    const bool is_f32 = weight.dtype().equal(py::dtype::of<float>());
    if (!is_f32 && !weight.dtype().equal(py::dtype::of<double>())) {
      throw py::type_error(name + " must be a float32 or float64 array, got " + describe(weight));
    }
    if (weight.ndim() < 2) {
      throw std::invalid_argument(name + " must have ndim >= 2, got shape " + shape_str(weight));
    }
    const py::object scale_obj = scales[i];
    if (!scale_obj.is_none()) {
      const std::string sname = "scales[" + std::to_string(i) + "]";
      scale_arrays[i] = as_float64(scale_obj, sname.c_str());
      if (scale_arrays[i].ndim() != 1 || scale_arrays[i].shape(0) != weight.shape(0)) {
        throw std::invalid_argument(sname + " must have shape (" + std::to_string(weight.shape(0)) +
                                    ",) to match " + name + " of shape " + shape_str(weight) +
                                    ", got " + shape_str(scale_arrays[i]));
      }
      require_finite(scale_arrays[i], sname.c_str());
      has_scale[i] = true;
    }
    results.emplace_back(static_cast<py::ssize_t>(weight.shape(0)));
    const DoubleArray* sp = has_scale[i] ? &scale_arrays[i] : nullptr;
    if (is_f32) {
      add_layer(f32, weight, sp, results.back(), i, keep[i]);
    } else {
      add_layer(f64, weight, sp, results.back(), i, keep[i]);
    }
  }
  {
    py::gil_scoped_release release;
    if (!f32.views.empty()) {
      mars::spectral::channel_spectral_norms_batch(f32.views.data(),
                                                   static_cast<std::int64_t>(f32.views.size()), n_threads,
                                                   has_keep ? f32.keep.data() : nullptr);
    }
    if (!f64.views.empty()) {
      mars::spectral::channel_spectral_norms_batch(f64.views.data(),
                                                   static_cast<std::int64_t>(f64.views.size()), n_threads,
                                                   has_keep ? f64.keep.data() : nullptr);
    }
  }
  py::list out;
  for (auto& r : results) out.append(r);
  return out;
}

}  // namespace

void register_spectral(py::module_& m) {
  m.def("channel_spectral_norms", &channel_spectral_norms, py::arg("weight"),
        py::arg("scale") = py::none(), py::arg("n_threads") = 0,
        "Largest singular value of every output channel (weight[k] reshaped to (in, prod(kernel))),"
        " times scale[k]. weight: float32/float64 (out, in, *kernel); returns float64 (out,).");
  m.def("channel_spectral_norms_batch", &channel_spectral_norms_batch, py::arg("weights"),
        py::arg("scales"), py::arg("n_threads") = 0, py::arg("keep") = py::none(),
        "channel_spectral_norms of many layers in one call (one parallel region, GIL released): "
        "weights: list of float32/float64 (out, in, *kernel) arrays; scales: list of (out,) "
        "float64 arrays or None. Returns a list of float64 (out,) arrays, bit-identical to one "
        "call per layer. keep: None, or one int per weight: only that layer's keep largest values "
        "are wanted (the CBE); they and every value >= the keep-th largest are exact, the other "
        "channels may hold an upper bound below the keep-th largest (their eigen-solve skipped).");
}

}  // namespace mars_bindings
