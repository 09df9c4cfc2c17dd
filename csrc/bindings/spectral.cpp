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
};

template <typename T>
void add_layer(Batch<T>& batch, const py::array& weight, const DoubleArray* scale,
               py::array_t<double>& result, std::size_t i) {
  typename Batch<T>::Contig w = Batch<T>::Contig::ensure(weight);
  if (!w) throw py::error_already_set();
  std::int64_t cols = 1;
  for (py::ssize_t d = 2; d < w.ndim(); ++d) cols *= w.shape(d);
  batch.views.push_back({w.data(), w.shape(0), w.shape(1), cols,
                         scale ? scale->data() : nullptr, result.mutable_data()});
  batch.arrays.push_back(std::move(w));
  batch.index.push_back(i);
}

// The inputs of a batch, parsed and checked: weights[i] and scales[i] go into f32 or f64.
struct Parsed {
  Batch<float> f32;
  Batch<double> f64;
  std::vector<DoubleArray> scale_arrays;
  std::vector<py::array_t<double>> results;
  std::vector<std::pair<bool, std::size_t>> where;  // (is float32, position in f32/f64)
};

void parse_batch(const py::sequence& weights, const py::sequence& scales, Parsed& p) {
  const std::size_t n = static_cast<std::size_t>(py::len(weights));
  if (static_cast<std::size_t>(py::len(scales)) != n) {
    throw std::invalid_argument("scales must have one entry (an array or None) per weight: " +
                                std::to_string(n) + " weights, " +
                                std::to_string(py::len(scales)) + " scales");
  }
  p.scale_arrays.resize(n);
  p.results.reserve(n);
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
    const DoubleArray* sp = nullptr;
    if (!scale_obj.is_none()) {
      const std::string sname = "scales[" + std::to_string(i) + "]";
      p.scale_arrays[i] = as_float64(scale_obj, sname.c_str());
      if (p.scale_arrays[i].ndim() != 1 || p.scale_arrays[i].shape(0) != weight.shape(0)) {
        throw std::invalid_argument(sname + " must have shape (" + std::to_string(weight.shape(0)) +
                                    ",) to match " + name + " of shape " + shape_str(weight) +
                                    ", got " + shape_str(p.scale_arrays[i]));
      }
      require_finite(p.scale_arrays[i], sname.c_str());
      sp = &p.scale_arrays[i];
    }
    p.results.emplace_back(static_cast<py::ssize_t>(weight.shape(0)));
    if (is_f32) {
      p.where.emplace_back(true, p.f32.views.size());
      add_layer(p.f32, weight, sp, p.results.back(), i);
    } else {
      p.where.emplace_back(false, p.f64.views.size());
      add_layer(p.f64, weight, sp, p.results.back(), i);
    }
  }
}

py::list channel_spectral_norms_batch(const py::sequence& weights, const py::sequence& scales,
                                      int n_threads) {
  n_threads = threads_arg(n_threads);
  Parsed p;
  parse_batch(weights, scales, p);
  {
    py::gil_scoped_release release;
    if (!p.f32.views.empty()) {
      mars::spectral::channel_spectral_norms_batch(p.f32.views.data(),
                                                   static_cast<std::int64_t>(p.f32.views.size()), n_threads);
    }
    if (!p.f64.views.empty()) {
      mars::spectral::channel_spectral_norms_batch(p.f64.views.data(),
                                                   static_cast<std::int64_t>(p.f64.views.size()), n_threads);
    }
  }
  py::list out;
  for (auto& r : p.results) out.append(r);
  return out;
}

// The keys of one dtype for the fused pass: per key, its n_clients views (key-major), where they
// start, its sum and its max_abs row. The SummedKey list is built once the views stop moving.
template <typename T>
struct SumKeys {
  std::vector<mars::spectral::LayerView<T>> views;
  std::vector<std::size_t> first;
  std::vector<double*> sums, max_abs;
  std::vector<mars::spectral::SummedKey<T>> keys() const {
    std::vector<mars::spectral::SummedKey<T>> out;
    for (std::size_t k = 0; k < first.size(); ++k) out.push_back({views.data() + first[k], sums[k], max_abs[k]});
    return out;
  }
};

py::tuple channel_spectral_norms_and_sum(const py::sequence& weights, const py::sequence& scales,
                                         const py::object& client_weights_obj, int n_threads) {
  n_threads = threads_arg(n_threads);
  DoubleArray cw = as_float64(client_weights_obj, "client_weights");
  if (cw.ndim() != 1 || cw.shape(0) < 1) {
    throw std::invalid_argument("client_weights must have shape (n_clients,) with n_clients >= 1, "
                                "got shape " + shape_str(cw));
  }
  require_finite(cw, "client_weights");
  const std::size_t n_clients = static_cast<std::size_t>(cw.shape(0));
  const std::size_t n = static_cast<std::size_t>(py::len(weights));
  if (n % n_clients != 0) {
    throw std::invalid_argument("weights must hold n_clients x n_keys arrays (client-major): " +
                                std::to_string(n) + " weights for " + std::to_string(n_clients) +
                                " clients");
  }
  const std::size_t n_keys = n / n_clients;
  Parsed p;
  parse_batch(weights, scales, p);
  auto shape_of = [&](std::size_t i) {
    const py::array& a = p.where[i].first ? static_cast<const py::array&>(p.f32.arrays[p.where[i].second])
                                          : static_cast<const py::array&>(p.f64.arrays[p.where[i].second]);
    return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
  };
  SumKeys<float> f32;
  SumKeys<double> f64;
  py::list sums;
  py::array_t<double> max_abs({static_cast<py::ssize_t>(n_keys), static_cast<py::ssize_t>(n_clients)});
  for (std::size_t k = 0; k < n_keys; ++k) {
    const bool is_f32 = p.where[k].first;
    const auto shape = shape_of(k);
    for (std::size_t i = 1; i < n_clients; ++i) {
      const std::size_t j = i * n_keys + k;
      if (p.where[j].first != is_f32 || shape_of(j) != shape) {
        throw std::invalid_argument(
            "weights[" + std::to_string(j) + "] (client " + std::to_string(i) + ", key " +
            std::to_string(k) + ") must have the dtype and shape of weights[" + std::to_string(k) +
            "] (client 0): every client's key k is summed together");
      }
    }
    py::array_t<double> sum(shape);
    double* mp = max_abs.mutable_data(static_cast<py::ssize_t>(k), 0);
    auto add = [&](auto& keys, auto& batch) {
      keys.first.push_back(keys.views.size());
      for (std::size_t i = 0; i < n_clients; ++i) {
        keys.views.push_back(batch.views[p.where[i * n_keys + k].second]);
      }
      keys.sums.push_back(sum.mutable_data());
      keys.max_abs.push_back(mp);
    };
    if (is_f32) {
      add(f32, p.f32);
    } else {
      add(f64, p.f64);
    }
    sums.append(sum);
  }
  const auto k32 = f32.keys();
  const auto k64 = f64.keys();
  const double* wp = cw.data();
  {
    py::gil_scoped_release release;
    if (!k32.empty()) {
      mars::spectral::channel_spectral_norms_and_sum(k32.data(), static_cast<std::int64_t>(k32.size()),
                                                     static_cast<std::int64_t>(n_clients), wp, n_threads);
    }
    if (!k64.empty()) {
      mars::spectral::channel_spectral_norms_and_sum(k64.data(), static_cast<std::int64_t>(k64.size()),
                                                     static_cast<std::int64_t>(n_clients), wp, n_threads);
    }
  }
  py::list results;
  for (auto& r : p.results) results.append(r);
  return py::make_tuple(results, sums, max_abs);
}

}  // namespace

void register_spectral(py::module_& m) {
  m.def("channel_spectral_norms", &channel_spectral_norms, py::arg("weight"),
        py::arg("scale") = py::none(), py::arg("n_threads") = 0,
        "Largest singular value of every output channel (weight[k] reshaped to (in, prod(kernel))),"
        " times scale[k]. weight: float32/float64 (out, in, *kernel); returns float64 (out,).");
  m.def("channel_spectral_norms_batch", &channel_spectral_norms_batch, py::arg("weights"),
        py::arg("scales"), py::arg("n_threads") = 0,
        "channel_spectral_norms of many layers in one call (one parallel region, GIL released): "
        "weights: list of float32/float64 (out, in, *kernel) arrays; scales: list of (out,) "
        "float64 arrays or None. Returns a list of float64 (out,) arrays, bit-identical to one "
        "call per layer.");
  m.def("channel_spectral_norms_and_sum", &channel_spectral_norms_and_sum, py::arg("weights"),
        py::arg("scales"), py::arg("client_weights"), py::arg("n_threads") = 0,
        "Scores and sums a round's weight keys in one pass. weights/scales: n_clients x n_keys "
        "entries, client-major (weights[i * n_keys + k] is client i's key k; a key has one dtype "
        "and shape in every client); client_weights: (n_clients,) finite. Returns (results, sums, "
        "max_abs): results as channel_spectral_norms_batch (bit-identical), sums[k] = float64 "
        "sum_i client_weights[i] * weights[i * n_keys + k] in client order (zero weights "
        "skipped; bit-identical to aggregate()'s accumulator), max_abs (n_keys, n_clients) = max "
        "|weight| (NaN when it holds a NaN).");
}

}  // namespace mars_bindings
