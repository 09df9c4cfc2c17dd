// aggregate(buffers, weights, out_dtype, n_threads, base, server_lr) -> weighted mean array
// aggregate_many(groups, weights, out_dtypes, n_threads, bases, server_lr) -> list of means
// accumulate(acc, x, weight, n_threads) -> (max_abs, checksum); acc += weight * x in place
// finalize_mean(acc, total_weight, out_dtype, n_threads, base, server_lr) -> array
// stream_sum(arrays, n_threads) -> float: every element read once (the benchmarks' floor)
// first_non_finite(arrays) -> int: index of the first array holding NaN/Inf, or -1
//
// These read float32/float64 arrays in place: no conversion and no copy. Anything else (other
// dtypes, non-contiguous or misaligned views, read-only accumulators) is a TypeError/ValueError
// naming the argument; mars_native.aggregation converts and validates for Python users.
#include <cstring>
#include <vector>

#include "buffers.hpp"
#include "common.hpp"
#include "mars/aggregate.hpp"
#include "mars/stream.hpp"

namespace mars_bindings {

namespace {

enum class Float { f32, f64 };

std::string item_name(const char* name, std::size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

// The dtype of a float32/float64 ndarray; TypeError for anything else.
Float float_kind(const py::handle& obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(name + " must be a numpy.ndarray of float32 or float64, got " +
                         py::str(py::type::of(obj)).cast<std::string>());
  }
  const auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.dtype().equal(py::dtype::of<float>())) return Float::f32;
  if (arr.dtype().equal(py::dtype::of<double>())) return Float::f64;
  throw py::type_error(name + " must be float32 or float64, got " + describe(arr));
}

// ValueError unless arr can be read as a flat buffer: C-contiguous and aligned.
void require_flat(const py::array& arr, const std::string& name) {
  if (!(arr.flags() & py::array::c_style)) {
    throw std::invalid_argument(name + " must be C-contiguous (got a strided view with " +
                                describe(arr) + "); pass numpy.ascontiguousarray(...)");
  }
  if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw std::invalid_argument(name + " must be aligned to its dtype (" + describe(arr) +
                                "); pass a copy");
  }
}

Float parse_out_dtype(const py::object& out_dtype, Float fallback) {
  if (out_dtype.is_none()) return fallback;
  const py::dtype dt = py::dtype::from_args(out_dtype);  // TypeError for junk
  if (dt.equal(py::dtype::of<float>())) return Float::f32;
  if (dt.equal(py::dtype::of<double>())) return Float::f64;
  throw py::type_error("out_dtype must be float32 or float64, got " +
                       py::str(dt).cast<std::string>());
}

double finite_arg(double v, const char* name) {
  if (!std::isfinite(v)) {
    throw std::invalid_argument(std::string(name) + " must be finite, got " +
                                py::repr(py::float_(v)).cast<std::string>());
  }
  return v;
}

std::vector<py::ssize_t> shape_of(const py::array& a) {
  return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

// Outputs come from the buffer cache (buffers.hpp): a round's new model reuses the pages of one
// the server has dropped instead of faulting fresh ones in.
template <typename O>
py::array make_output(const std::vector<py::ssize_t>& shape) {
  return cached_array_of<O>(shape);
}

// The checked weights of a mean over n buffers: finite, >= 0, a positive finite sum.
std::vector<double> mean_weights(const py::object& weights_obj, std::size_t n) {
  DoubleArray weights = as_float64(weights_obj, "weights");
  if (weights.ndim() != 1 || weights.shape(0) != static_cast<py::ssize_t>(n)) {
    throw std::invalid_argument("weights must have shape (" + std::to_string(n) +
                                ",) (one per buffer), got shape " + shape_str(weights));
  }
  require_finite(weights, "weights");
  std::vector<double> w(weights.data(), weights.data() + weights.shape(0));
  double total = 0.0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    if (w[i] < 0.0) {
      throw std::invalid_argument("weights must be >= 0, got " + std::to_string(w[i]) +
                                  " at index " + std::to_string(i));
    }
    total += w[i];
  }
  if (!(total > 0.0) || !std::isfinite(total)) {
    throw std::invalid_argument("weights must have a positive, finite sum, got " +
                                std::to_string(total));
  }
  return w;
}

// The arrays of `seq` (named prefix[i]): float32/float64, one dtype (returned in `kind`), one
// shape, C-contiguous and aligned; not empty.
std::vector<py::array> same_buffers(const py::sequence& seq, const std::string& prefix,
                                    Float& kind) {
  if (py::len(seq) == 0) throw std::invalid_argument(prefix + " must not be empty");
  std::vector<py::array> buffers;
  buffers.reserve(py::len(seq));
  for (std::size_t i = 0; i < py::len(seq); ++i) {
    const py::object item = seq[i];
    const std::string name = item_name(prefix.c_str(), i);
    const Float k = float_kind(item, name);
    auto arr = py::reinterpret_borrow<py::array>(item);
    if (i == 0) {
      kind = k;
    } else {
      if (k != kind) {
        throw py::type_error(name + " has " + describe(arr) + " but " + prefix + "[0] has " +
                             describe(buffers[0]) + "; all buffers must share one dtype");
      }
      if (shape_of(arr) != shape_of(buffers[0])) {
        throw std::invalid_argument(name + " has shape " + shape_str(arr) + " but " + prefix +
                                    "[0] has shape " + shape_str(buffers[0]));
      }
    }
    require_flat(arr, name);
    buffers.push_back(std::move(arr));
  }
  return buffers;
}

// The base of a mean over `buffers` (named `name`): their dtype (`kind`) and shape, flat.
// `owner` names the buffers in messages ("the buffers have", "groups[3] has").
py::array mean_base(const py::object& obj, const std::string& name, Float kind,
                    const py::array& first, const std::string& owner) {
  if (float_kind(obj, name) != kind) {
    throw py::type_error(name + " has " + describe(py::reinterpret_borrow<py::array>(obj)) +
                         " but " + owner + " dtype " + dtype_str(first));
  }
  auto base = py::reinterpret_borrow<py::array>(obj);
  if (shape_of(base) != shape_of(first)) {
    throw std::invalid_argument(name + " has shape " + shape_str(base) + " but " + owner +
                                " shape " + shape_str(first));
  }
  require_flat(base, name);
  return base;
}

template <typename T, typename O>
py::array aggregate_typed(const std::vector<py::array>& buffers, const std::vector<double>& w,
                          const py::array* base, double server_lr, int n_threads) {
  const auto shape = shape_of(buffers[0]);
  py::array out = make_output<O>(shape);
  std::vector<const T*> ptrs(buffers.size());
  for (std::size_t i = 0; i < buffers.size(); ++i) {
    ptrs[i] = static_cast<const T*>(buffers[i].data());
  }
  const T* bp = base ? static_cast<const T*>(base->data()) : nullptr;
  O* op = static_cast<O*>(out.mutable_data());
  const auto n = static_cast<std::int64_t>(buffers[0].size());
  {
    py::gil_scoped_release release;
    mars::aggregate::aggregate<T, O>(ptrs.data(), w.data(), static_cast<std::int64_t>(ptrs.size()),
                                     n, op, n_threads, bp, server_lr);
  }
  return out;
}

py::array aggregate(const py::object& buffers_obj, const py::object& weights_obj,
                    const py::object& out_dtype, int n_threads, const py::object& base_obj,
                    double server_lr) {
  n_threads = threads_arg(n_threads);
  finite_arg(server_lr, "server_lr");
  if (!py::isinstance<py::list>(buffers_obj) && !py::isinstance<py::tuple>(buffers_obj)) {
    throw py::type_error("buffers must be a list or tuple of arrays, got " +
                         py::str(py::type::of(buffers_obj)).cast<std::string>());
  }
  Float kind = Float::f32;
  const std::vector<py::array> buffers =
      same_buffers(py::reinterpret_borrow<py::sequence>(buffers_obj), "buffers", kind);
  const std::vector<double> w = mean_weights(weights_obj, buffers.size());
  const bool has_base = !base_obj.is_none();
  py::array base;
  if (has_base) base = mean_base(base_obj, "base", kind, buffers[0], "the buffers have");
  const Float out_kind = parse_out_dtype(out_dtype, kind);
  const py::array* bp = has_base ? &base : nullptr;
  if (kind == Float::f32) {
    return out_kind == Float::f32 ? aggregate_typed<float, float>(buffers, w, bp, server_lr, n_threads)
                                  : aggregate_typed<float, double>(buffers, w, bp, server_lr, n_threads);
  }
  return out_kind == Float::f32 ? aggregate_typed<double, float>(buffers, w, bp, server_lr, n_threads)
                                : aggregate_typed<double, double>(buffers, w, bp, server_lr, n_threads);
}

py::sequence sequence_arg(const py::object& obj, const std::string& name) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj)) {
    throw py::type_error(name + " must be a list or tuple, got " +
                         py::str(py::type::of(obj)).cast<std::string>());
  }
  return py::reinterpret_borrow<py::sequence>(obj);
}

// The tensors of one model (groups[k]: one array per client, one dtype and shape per group),
// averaged with one set of weights in one parallel region: the values of aggregate() per group.
py::list aggregate_many(const py::object& groups_obj, const py::object& weights_obj,
                        const py::object& out_dtypes_obj, int n_threads, const py::object& bases_obj,
                        double server_lr) {
  n_threads = threads_arg(n_threads);
  finite_arg(server_lr, "server_lr");
  const auto groups = sequence_arg(groups_obj, "groups");
  const std::size_t n_groups = py::len(groups);
  const bool per_group_dtype = !out_dtypes_obj.is_none();
  py::sequence out_dtypes;
  if (per_group_dtype) {
    out_dtypes = sequence_arg(out_dtypes_obj, "out_dtypes");
    if (py::len(out_dtypes) != n_groups) {
      throw std::invalid_argument("out_dtypes has " + std::to_string(py::len(out_dtypes)) +
                                  " entries but there are " + std::to_string(n_groups) + " groups");
    }
  }
  py::sequence bases;
  const bool has_bases = !bases_obj.is_none();
  if (has_bases) {
    bases = sequence_arg(bases_obj, "bases");
    if (py::len(bases) != n_groups) {
      throw std::invalid_argument("bases has " + std::to_string(py::len(bases)) +
                                  " entries but there are " + std::to_string(n_groups) + " groups");
    }
  }
  std::size_t n_buffers = 0;
  std::vector<py::array> keep;  // every array read or written, alive until the end
  std::vector<std::vector<const void*>> pointers(n_groups);
  std::vector<mars::aggregate::MeanJob> jobs(n_groups);
  py::list outs;
  for (std::size_t k = 0; k < n_groups; ++k) {
    const std::string gname = item_name("groups", k);
    const auto group = sequence_arg(groups[k], gname);
    if (k == 0) {
      n_buffers = py::len(group);  // (same_buffers: not empty)
    } else if (py::len(group) != n_buffers) {
      throw std::invalid_argument(gname + " has " + std::to_string(py::len(group)) +
                                  " arrays but groups[0] has " + std::to_string(n_buffers));
    }
    Float kind = Float::f32;
    std::vector<py::array> arrays = same_buffers(group, gname, kind);
    for (const py::array& arr : arrays) pointers[k].push_back(arr.data());
    const std::vector<py::ssize_t> shape = shape_of(arrays[0]);
    const void* base = nullptr;
    if (has_bases && !py::object(bases[k]).is_none()) {
      py::array b = mean_base(bases[k], item_name("bases", k), kind, arrays[0], gname + " has");
      base = b.data();
      keep.push_back(std::move(b));
    }
    for (py::array& arr : arrays) keep.push_back(std::move(arr));
    const Float out_kind =
        per_group_dtype ? parse_out_dtype(py::object(out_dtypes[k]), kind) : kind;
    py::array out = out_kind == Float::f32 ? make_output<float>(shape) : make_output<double>(shape);
    jobs[k] = {pointers[k].data(), base, out.mutable_data(), static_cast<std::int64_t>(out.size()),
               kind == Float::f64, out_kind == Float::f64};
    outs.append(out);
  }
  if (n_groups == 0) return outs;
  const std::vector<double> w = mean_weights(weights_obj, n_buffers);
  {
    py::gil_scoped_release release;
    mars::aggregate::aggregate_many(jobs.data(), static_cast<std::int64_t>(n_groups), w.data(),
                                    static_cast<std::int64_t>(n_buffers), n_threads, server_lr);
  }
  return outs;
}

// The float64 accumulator: C-contiguous, aligned, writeable.
py::array accumulator_arg(const py::object& acc_obj) {
  if (float_kind(acc_obj, "acc") != Float::f64) {
    throw py::type_error("acc must be float64, got " +
                         describe(py::reinterpret_borrow<py::array>(acc_obj)));
  }
  auto acc = py::reinterpret_borrow<py::array>(acc_obj);
  require_flat(acc, "acc");
  return acc;
}

// ValueError unless `a` has as many elements as the accumulator.
void require_same_size(const py::array& a, const char* name, const py::array& acc) {
  if (a.size() != acc.size()) {
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.size()) +
                                " elements (shape " + shape_str(a) + ") but acc has " +
                                std::to_string(acc.size()) + " (shape " + shape_str(acc) + ")");
  }
}

bool overlaps(const py::array& a, const py::array& b) {
  const auto* a0 = static_cast<const char*>(a.data());
  const auto* b0 = static_cast<const char*>(b.data());
  return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

py::tuple accumulate(const py::object& acc_obj, const py::object& x_obj, double weight,
                     int n_threads) {
  n_threads = threads_arg(n_threads);
  finite_arg(weight, "weight");
  py::array acc = accumulator_arg(acc_obj);
  if (!acc.writeable()) throw std::invalid_argument("acc must be writeable (got a read-only array)");
  const Float kind = float_kind(x_obj, "x");
  auto x = py::reinterpret_borrow<py::array>(x_obj);
  require_flat(x, "x");
  require_same_size(x, "x", acc);
  if (overlaps(acc, x) && acc.data() != x.data()) {
    throw std::invalid_argument("x and acc overlap in memory; pass a copy of x");
  }
  double* ap = static_cast<double*>(acc.mutable_data());
  const auto n = static_cast<std::int64_t>(acc.size());
  mars::aggregate::BufferStats stats;
  {
    py::gil_scoped_release release;
    if (kind == Float::f32) {
      stats = mars::aggregate::accumulate<float>(ap, static_cast<const float*>(x.data()), weight,
                                                 n, n_threads);
    } else {
      stats = mars::aggregate::accumulate<double>(ap, static_cast<const double*>(x.data()),
                                                  weight, n, n_threads);
    }
  }
  return py::make_tuple(stats.max_abs, py::int_(stats.checksum));
}

template <typename T, typename O>
py::array finalize_typed(const py::array& acc, double total_weight, const py::array* base,
                         double server_lr, int n_threads) {
  py::array out = make_output<O>(shape_of(acc));
  const double* ap = static_cast<const double*>(acc.data());
  const T* bp = base ? static_cast<const T*>(base->data()) : nullptr;
  O* op = static_cast<O*>(out.mutable_data());
  const auto n = static_cast<std::int64_t>(acc.size());
  {
    py::gil_scoped_release release;
    mars::aggregate::finalize<T, O>(ap, total_weight, n, op, n_threads, bp, server_lr);
  }
  return out;
}

py::array finalize_mean(const py::object& acc_obj, double total_weight, const py::object& out_dtype,
                        int n_threads, const py::object& base_obj, double server_lr) {
  n_threads = threads_arg(n_threads);
  finite_arg(server_lr, "server_lr");
  if (!(total_weight > 0.0) || !std::isfinite(total_weight)) {
    throw std::invalid_argument("total_weight must be positive and finite, got " +
                                py::repr(py::float_(total_weight)).cast<std::string>());
  }
  py::array acc = accumulator_arg(acc_obj);
  const Float out_kind = parse_out_dtype(out_dtype, Float::f64);
  if (base_obj.is_none()) {
    return out_kind == Float::f32 ? finalize_typed<double, float>(acc, total_weight, nullptr, server_lr, n_threads)
                                  : finalize_typed<double, double>(acc, total_weight, nullptr, server_lr, n_threads);
  }
  const Float kind = float_kind(base_obj, "base");
  auto base = py::reinterpret_borrow<py::array>(base_obj);
  require_flat(base, "base");
  require_same_size(base, "base", acc);
  if (kind == Float::f32) {
    return out_kind == Float::f32 ? finalize_typed<float, float>(acc, total_weight, &base, server_lr, n_threads)
                                  : finalize_typed<float, double>(acc, total_weight, &base, server_lr, n_threads);
  }
  return out_kind == Float::f32 ? finalize_typed<double, float>(acc, total_weight, &base, server_lr, n_threads)
                                : finalize_typed<double, double>(acc, total_weight, &base, server_lr, n_threads);
}

// Flat views of a list/tuple of float32/float64 C-contiguous arrays (kept alive in keep).
std::vector<mars::stream::Span> float_spans(const py::object& arrays_obj, std::vector<py::array>& keep) {
  if (!py::isinstance<py::list>(arrays_obj) && !py::isinstance<py::tuple>(arrays_obj)) {
    throw py::type_error("arrays must be a list or tuple of arrays, got " +
                         py::str(py::type::of(arrays_obj)).cast<std::string>());
  }
  const auto seq = py::reinterpret_borrow<py::sequence>(arrays_obj);
  std::vector<mars::stream::Span> spans;
  keep.reserve(py::len(seq));
  spans.reserve(py::len(seq));
  for (std::size_t i = 0; i < py::len(seq); ++i) {
    const py::object item = seq[i];
    const std::string name = item_name("arrays", i);
    const Float k = float_kind(item, name);
    auto arr = py::reinterpret_borrow<py::array>(item);
    require_flat(arr, name);
    spans.push_back({arr.data(), static_cast<std::int64_t>(arr.size()), k == Float::f64});
    keep.push_back(std::move(arr));
  }
  return spans;
}

double stream_sum(const py::object& arrays_obj, int n_threads) {
  n_threads = threads_arg(n_threads);
  std::vector<py::array> keep;
  const auto spans = float_spans(arrays_obj, keep);
  py::gil_scoped_release release;
  return mars::stream::sum(spans, n_threads);
}

std::int64_t first_non_finite(const py::object& arrays_obj) {
  std::vector<py::array> keep;
  const auto spans = float_spans(arrays_obj, keep);
  py::gil_scoped_release release;
  return mars::stream::first_non_finite(spans);
}

}  // namespace

void register_aggregate(py::module_& m) {
  m.def("stream_sum", &stream_sum, py::arg("arrays"), py::arg("n_threads") = 0,
        "Sum of every element of float32/float64 C-contiguous arrays, each read once (the "
        "benchmarks' stream-read floor). Blocks of 16384 elements, lane sums in the input dtype, "
        "block sums added in order in float64: the same result for any n_threads.");
  m.def("first_non_finite", &first_non_finite, py::arg("arrays"),
        "Index of the first of the float32/float64 C-contiguous arrays that holds a NaN or an "
        "infinity, or -1 when all values are finite (one pass, bit tests, stops at the first bad "
        "array).");
  m.def("aggregate", &aggregate, py::arg("buffers"), py::arg("weights"),
        py::arg("out_dtype") = py::none(), py::arg("n_threads") = 0, py::arg("base") = py::none(),
        py::arg("server_lr") = 1.0,
        "Weighted mean of equally shaped float32/float64 arrays (one dtype, C-contiguous) with fp64 "
        "accumulation in buffer order: sum_i w_i x_i / sum_i w_i; with base: base + server_lr * "
        "(mean - base). Zero-weight buffers are not read. Bit-identical for any n_threads.");
  m.def("aggregate_many", &aggregate_many, py::arg("groups"), py::arg("weights"),
        py::arg("out_dtypes") = py::none(), py::arg("n_threads") = 0, py::arg("bases") = py::none(),
        py::arg("server_lr") = 1.0,
        "aggregate() of several tensors with one set of weights: groups[k] holds one array per "
        "buffer (float32/float64, one dtype and shape per group, C-contiguous); out_dtypes[k] and "
        "bases[k] (None entries allowed) as aggregate()'s out_dtype and base. Returns the list of "
        "means, the same values bit for bit as one aggregate() call per group, computed in one "
        "parallel region whose tasks go to whichever thread is free.");
  m.def("accumulate", &accumulate, py::arg("acc"), py::arg("x"), py::arg("weight"),
        py::arg("n_threads") = 0,
        "acc += weight * x in place (acc float64, x float32/float64, same size, C-contiguous). "
        "Returns (max |x|, 64-bit checksum of x's bit patterns).");
  m.def("finalize_mean", &finalize_mean, py::arg("acc"), py::arg("total_weight"),
        py::arg("out_dtype") = py::none(), py::arg("n_threads") = 0, py::arg("base") = py::none(),
        py::arg("server_lr") = 1.0,
        "acc / total_weight (or base + server_lr * (acc / total_weight - base)) as float32/float64.");
}

}  // namespace mars_bindings
