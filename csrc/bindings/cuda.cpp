// The CUDA backend's bindings: register_cuda(m).
//
// Registers the submodule _core.cuda (a submodule, so that the generic fuzzing of _core's
// host-array bindings does not apply: these take raw device pointers). Always compiled. Without
// MARS_WITH_CUDA (the CUDA backend was not built) available() is False, device_count() is 0 and
// every kernel entry point raises RuntimeError saying so.
// With it, the kernels take device arrays described by
//   * a dict in the __cuda_array_interface__ format (v2/v3: "data", "shape", "typestr",
//     "strides"; no "mask"),
//   * any object with a __cuda_array_interface__ attribute (CuPy, Numba, torch CUDA tensors), or
//   * the fast descriptor tuple (ptr, shape, typestr, device) built by mars_native._cuda from a
//     torch tensor or CuPy array (device -1: unknown, the pointer is asked).
// No torch or CuPy headers or libraries are involved. Arrays must be C-contiguous; outputs are
// allocated by the caller (mars_native._cuda allocates them with the input's library, on the
// input's device). Work is enqueued on `stream` (an integer cudaStream_t; 0 = legacy default
// stream) and the call returns without synchronising. The GIL is released around the launches.
#include "common.hpp"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#if defined(MARS_WITH_CUDA)
#include "cuda/api.hpp"
#include "mars/topk.hpp"
#endif

namespace mars_bindings {

namespace {

#if defined(MARS_WITH_CUDA)

namespace mc = mars::cuda;

enum class Kind { f32, f64, i64 };

struct DeviceArray {
  std::uintptr_t ptr = 0;
  std::vector<std::int64_t> shape;
  Kind kind = Kind::f32;
  int device = -1;  // -1: unknown
  std::string name;

  std::int64_t size() const {
    std::int64_t s = 1;
    for (auto d : shape) s *= d;
    return s;
  }
  std::string shape_str() const {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }
  std::string dtype_str() const {
    return kind == Kind::f32 ? "float32" : kind == Kind::f64 ? "float64" : "int64";
  }
  std::string describe() const { return "dtype " + dtype_str() + " and shape " + shape_str(); }
  mc::DType dtype() const { return kind == Kind::f64 ? mc::DType::f64 : mc::DType::f32; }
  const void* cptr() const { return reinterpret_cast<const void*>(ptr); }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(ptr);
  }
};

std::string type_name(const py::handle& obj) {
  return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

Kind parse_typestr(const std::string& typestr, const std::string& name) {
  // Little-endian ('<') or native ('=' / '|' for 1-byte types) float32, float64, int64.
  if (typestr.size() >= 3 && (typestr[0] == '<' || typestr[0] == '=')) {
    const std::string rest = typestr.substr(1);
    if (rest == "f4") return Kind::f32;
    if (rest == "f8") return Kind::f64;
    if (rest == "i8") return Kind::i64;
  }
  throw py::type_error(name + " must be a float32 or float64 CUDA array, got typestr '" +
                       typestr + "'");
}

std::int64_t itemsize(Kind k) { return k == Kind::f32 ? 4 : 8; }

std::vector<std::int64_t> parse_shape(const py::handle& shape_obj, const std::string& name) {
  if (!py::isinstance<py::tuple>(shape_obj) && !py::isinstance<py::list>(shape_obj)) {
    throw py::type_error(name + ": the array interface 'shape' must be a tuple");
  }
  const auto seq = py::reinterpret_borrow<py::sequence>(shape_obj);
  std::vector<std::int64_t> shape;
  shape.reserve(seq.size());
  for (const auto& d : seq) {
    const auto v = d.cast<std::int64_t>();
    if (v < 0) throw std::invalid_argument(name + " has a negative dimension");
    shape.push_back(v);
  }
  return shape;
}

void parse_interface(const py::handle& obj, const std::string& name, bool writable, DeviceArray& a);

// Parses a descriptor tuple, an interface dict or an object exposing __cuda_array_interface__.
DeviceArray parse(const py::handle& obj, const std::string& name, bool writable) {
  DeviceArray a;
  a.name = name;
  if (py::isinstance<py::tuple>(obj) && py::len(obj) == 4) {
    const auto t = py::reinterpret_borrow<py::tuple>(obj);
    a.ptr = t[0].cast<std::uintptr_t>();
    a.shape = parse_shape(t[1], name);
    a.kind = parse_typestr(t[2].cast<std::string>(), name);
    a.device = t[3].cast<int>();
  } else {
    parse_interface(obj, name, writable, a);
  }
  if (a.ptr % static_cast<std::uintptr_t>(itemsize(a.kind)) != 0) {
    throw std::invalid_argument(name + " is not aligned to its dtype");
  }
  return a;
}

// The __cuda_array_interface__ path of parse().
void parse_interface(const py::handle& obj, const std::string& name, bool writable, DeviceArray& a) {
  py::object iface;
  if (py::isinstance<py::dict>(obj)) {
    iface = py::reinterpret_borrow<py::object>(obj);
  } else if (py::hasattr(obj, "__cuda_array_interface__")) {
    iface = obj.attr("__cuda_array_interface__");
  } else {
    throw py::type_error(name + " must be a CUDA array (an object with __cuda_array_interface__, "
                         "e.g. a torch CUDA tensor or a CuPy array), got " + type_name(obj));
  }
  const auto d = iface.cast<py::dict>();
  for (const char* key : {"data", "shape", "typestr"}) {
    if (!d.contains(key)) {
      throw py::type_error(name + ": __cuda_array_interface__ has no '" + std::string(key) + "'");
    }
  }
  if (d.contains("mask") && !d["mask"].is_none()) {
    throw std::invalid_argument(name + ": masked CUDA arrays are not supported");
  }
  a.shape = parse_shape(d["shape"], name);
  a.kind = parse_typestr(d["typestr"].cast<std::string>(), name);
  const auto data = d["data"].cast<py::tuple>();
  if (py::len(data) != 2) throw py::type_error(name + ": the interface 'data' must be (ptr, readonly)");
  a.ptr = data[0].cast<std::uintptr_t>();
  if (writable && data[1].cast<bool>()) {
    throw std::invalid_argument(name + " is read-only but is written to");
  }
  if (d.contains("strides") && !d["strides"].is_none()) {
    const auto strides = parse_shape(d["strides"], name);
    if (strides.size() != a.shape.size()) {
      throw std::invalid_argument(name + ": 'strides' and 'shape' have different lengths");
    }
    std::int64_t expected = itemsize(a.kind);
    for (std::size_t i = a.shape.size(); i-- > 0;) {
      if (a.shape[i] != 1 && strides[i] != expected) {
        throw std::invalid_argument(name + " must be C-contiguous (shape " + a.shape_str() +
                                    "); make a contiguous copy on the device first");
      }
      expected *= a.shape[i];
    }
  }
}

DeviceArray parse_float(const py::handle& obj, const std::string& name, bool writable = false) {
  DeviceArray a = parse(obj, name, writable);
  if (a.kind == Kind::i64) {
    throw py::type_error(name + " must be float32 or float64, got " + a.describe());
  }
  return a;
}

void require_kind(const DeviceArray& a, Kind k, const char* what) {
  if (a.kind != k) throw py::type_error(a.name + " must be " + what + ", got " + a.describe());
}

// 1-D shape (n,) without building a vector (the per-task checks of the batch launchers).
void require_shape(const DeviceArray& a, std::int64_t n) {
  if (a.shape.size() != 1 || a.shape[0] != n) {
    throw std::invalid_argument(a.name + " must have shape (" + std::to_string(n) + ",), got " +
                                a.shape_str());
  }
}

void require_shape(const DeviceArray& a, const std::vector<std::int64_t>& shape) {
  if (a.shape != shape) {
    DeviceArray expected;
    expected.shape = shape;
    throw std::invalid_argument(a.name + " must have shape " + expected.shape_str() + ", got " +
                                a.shape_str());
  }
}

// Every array must live on `device` (asking the runtime for arrays of unknown device).
void require_on_device(const DeviceArray& a, int device) {
  if (a.size() == 0) return;
  int owner = a.device;
  if (owner < 0) owner = mc::pointer_device(a.ptr);
  if (owner != device) {
    throw std::invalid_argument(a.name + " is on cuda:" + std::to_string(owner) +
                                " but the call runs on cuda:" + std::to_string(device) +
                                "; move the arrays to one device");
  }
}

// Arrays whose device is checked after every argument was validated (so that a bad argument is
// reported as such even on a machine without a device).
class DeviceCheck {
 public:
  void add(DeviceArray a) { arrays_.push_back(std::move(a)); }
  void reserve(std::size_t n) { arrays_.reserve(n); }
  void run(int device) const {
    for (const DeviceArray& a : arrays_) require_on_device(a, device);
  }

 private:
  std::vector<DeviceArray> arrays_;
};

std::vector<py::object> as_list(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj)) {
    throw py::type_error(std::string(name) + " must be a list or tuple, got " + type_name(obj));
  }
  std::vector<py::object> out;
  for (const auto& item : py::reinterpret_borrow<py::sequence>(obj)) {
    out.push_back(py::reinterpret_borrow<py::object>(item));
  }
  return out;
}

std::string item(const char* name, std::size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// ---------------------------------------------------------------- kernels

void spectral(const py::object& weights_obj, const py::object& scales_obj,
              const py::object& results_obj, int device, std::uintptr_t stream) {
  const auto weights = as_list(weights_obj, "weights");
  const auto scales = as_list(scales_obj, "scales");
  const auto results = as_list(results_obj, "results");
  if (scales.size() != weights.size() || results.size() != weights.size()) {
    throw std::invalid_argument("weights, scales and results must have the same length, got " +
                                std::to_string(weights.size()) + ", " + std::to_string(scales.size()) +
                                ", " + std::to_string(results.size()));
  }
  std::vector<mc::SpectralTask> tasks(weights.size());
  DeviceCheck devices;
  devices.reserve(3 * weights.size());
  for (std::size_t i = 0; i < weights.size(); ++i) {
    DeviceArray w = parse_float(weights[i], item("weights", i));
    if (w.shape.size() < 2) {
      throw std::invalid_argument(w.name + " must have ndim >= 2, shape (out, in, *kernel) or "
                                  "(out, in) for a Linear layer; got shape " + w.shape_str());
    }
    mc::SpectralTask& t = tasks[i];
    t.weight = w.cptr();
    t.dtype = w.dtype();
    t.out = w.shape[0];
    t.rows = w.shape[1];
    t.cols = 1;
    for (std::size_t d = 2; d < w.shape.size(); ++d) t.cols *= w.shape[d];
    DeviceArray r = parse(results[i], item("results", i), true);
    require_kind(r, Kind::f64, "float64");
    require_shape(r, t.out);
    t.result = r.as<double>();
    devices.add(std::move(w));
    devices.add(std::move(r));
    if (!scales[i].is_none()) {
      DeviceArray s = parse(scales[i], item("scales", i), false);
      require_kind(s, Kind::f64, "float64");
      require_shape(s, t.out);
      t.scale = s.as<const double>();
      devices.add(std::move(s));
    }
  }
  devices.run(device);
  py::gil_scoped_release release;
  mc::channel_spectral_norms(tasks, device, stream);
}

void top_k_ceil(const py::object& values_obj, double kappa, const py::object& outs_obj, int device,
                std::uintptr_t stream) {
  if (!(kappa > 0.0 && kappa <= 1.0)) {
    throw std::invalid_argument("kappa must be in (0, 1], got " + std::to_string(kappa));
  }
  const auto values = as_list(values_obj, "values");
  const auto outs = as_list(outs_obj, "outs");
  if (outs.size() != values.size()) throw std::invalid_argument("values and outs must have the same length");
  std::vector<mc::TopKTask> tasks(values.size());
  DeviceCheck devices;
  for (std::size_t i = 0; i < values.size(); ++i) {
    DeviceArray v = parse(values[i], item("values", i), false);
    require_kind(v, Kind::f64, "float64");
    if (v.shape.size() != 1 || v.shape[0] == 0) {
      throw std::invalid_argument(v.name + " must be 1-D and non-empty, got shape " + v.shape_str());
    }
    const std::int64_t k = mars::topk::ceil_count(kappa, v.shape[0]);
    DeviceArray o = parse(outs[i], item("outs", i), true);
    require_kind(o, Kind::f64, "float64");
    require_shape(o, k);
    tasks[i] = mc::TopKTask{v.as<const double>(), v.shape[0], k, o.as<double>()};
    devices.add(std::move(v));
    devices.add(std::move(o));
  }
  devices.run(device);
  py::gil_scoped_release release;
  mc::top_k_ceil(tasks, device, stream);
}

void top_k_quantile(const py::object& values_obj, double kappa, const py::object& outs_obj,
                    const py::object& counts_obj, int device, std::uintptr_t stream) {
  if (!(kappa > 0.0 && kappa <= 1.0)) {
    throw std::invalid_argument("kappa must be in (0, 1], got " + std::to_string(kappa));
  }
  const auto values = as_list(values_obj, "values");
  const auto outs = as_list(outs_obj, "outs");
  if (outs.size() != values.size()) throw std::invalid_argument("values and outs must have the same length");
  const DeviceArray counts = parse(counts_obj, "counts", true);
  require_kind(counts, Kind::i64, "int64");
  require_shape(counts, {static_cast<std::int64_t>(values.size())});
  DeviceCheck devices;
  devices.add(counts);
  std::vector<mc::TopKQuantileTask> tasks(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    DeviceArray v = parse(values[i], item("values", i), false);
    require_kind(v, Kind::f64, "float64");
    if (v.shape.size() != 1 || v.shape[0] == 0) {
      throw std::invalid_argument(v.name + " must be 1-D and non-empty, got shape " + v.shape_str());
    }
    DeviceArray o = parse(outs[i], item("outs", i), true);
    require_kind(o, Kind::f64, "float64");
    require_shape(o, v.shape[0]);
    tasks[i] = mc::TopKQuantileTask{v.as<const double>(), v.shape[0], 1.0 - kappa, o.as<double>(),
                                    counts.as<std::int64_t>() + i};
    devices.add(std::move(v));
    devices.add(std::move(o));
  }
  devices.run(device);
  py::gil_scoped_release release;
  mc::top_k_quantile(tasks, device, stream);
}

DeviceArray parse_matrix(const py::handle& obj, const char* name) {
  DeviceArray x = parse_float(obj, name);
  if (x.shape.size() != 2) {
    throw std::invalid_argument(std::string(name) + " must be 2-D (n, d), got shape " + x.shape_str());
  }
  return x;
}

void sort_rows(const py::object& x_obj, const py::object& out_obj, int device, std::uintptr_t stream) {
  const DeviceArray x = parse_matrix(x_obj, "X");
  const DeviceArray out = parse(out_obj, "out", true);
  require_kind(out, Kind::f64, "float64");
  require_shape(out, x.shape);
  require_on_device(x, device);
  require_on_device(out, device);
  py::gil_scoped_release release;
  mc::sort_rows(x.cptr(), x.dtype(), x.shape[0], x.shape[1], out.as<double>(), device, stream);
}

void pairwise(const py::object& x_obj, double p, bool rows_sorted, const py::object& out_obj,
              int device, std::uintptr_t stream) {
  const DeviceArray x = parse_matrix(x_obj, "X");
  const DeviceArray out = parse(out_obj, "out", true);
  require_kind(out, Kind::f64, "float64");
  require_shape(out, {x.shape[0], x.shape[0]});
  require_on_device(x, device);
  require_on_device(out, device);
  py::gil_scoped_release release;
  mc::pairwise_wasserstein(x.cptr(), x.dtype(), x.shape[0], x.shape[1], p, rows_sorted,
                           out.as<double>(), device, stream);
}

void kwmeans_assign(const py::object& x_obj, const py::object& centers_obj, double p, bool sorted,
                    const py::object& labels_obj, const py::object& costs_obj, int device,
                    std::uintptr_t stream) {
  const DeviceArray x = parse_matrix(x_obj, "X");
  const DeviceArray c = parse_matrix(centers_obj, "centers");
  if (c.shape[1] != x.shape[1]) {
    throw std::invalid_argument("centers must have as many columns as X: X has shape " +
                                x.shape_str() + ", centers " + c.shape_str());
  }
  const DeviceArray labels = parse(labels_obj, "labels", true);
  require_kind(labels, Kind::i64, "int64");
  require_shape(labels, {x.shape[0]});
  const DeviceArray dist = parse(costs_obj, "costs", true);
  require_kind(dist, Kind::f64, "float64");
  require_shape(dist, {x.shape[0]});
  for (const DeviceArray* a : {&x, &c, &labels, &dist}) require_on_device(*a, device);
  py::gil_scoped_release release;
  mc::kwmeans_assign(x.cptr(), x.dtype(), x.shape[0], x.shape[1], c.cptr(), c.dtype(), c.shape[0],
                     p, sorted, labels.as<std::int64_t>(), dist.as<double>(), device, stream);
}

void weighted_mean(const py::object& buffers_obj, const std::vector<double>& weights,
                   const py::object& base_obj, double server_lr, const py::object& out_obj,
                   int device, std::uintptr_t stream) {
  const auto items = as_list(buffers_obj, "buffers");
  if (items.empty()) throw std::invalid_argument("buffers must not be empty");
  std::vector<DeviceArray> bufs;
  std::vector<const void*> ptrs;
  for (std::size_t i = 0; i < items.size(); ++i) {
    bufs.push_back(parse_float(items[i], item("buffers", i)));
    const DeviceArray& b = bufs.back();
    if (i > 0 && b.kind != bufs[0].kind) {
      throw py::type_error(b.name + " has " + b.describe() + " but buffers[0] has " +
                           bufs[0].describe() + "; all buffers must share one dtype");
    }
    if (i > 0 && b.shape != bufs[0].shape) {
      throw std::invalid_argument(b.name + " has shape " + b.shape_str() +
                                  " but buffers[0] has shape " + bufs[0].shape_str());
    }
    ptrs.push_back(b.cptr());
  }
  if (weights.size() != bufs.size()) {
    throw std::invalid_argument("weights must have one entry per buffer: got " +
                                std::to_string(weights.size()) + " weights for " +
                                std::to_string(bufs.size()) + " buffers");
  }
  const DeviceArray out = parse_float(out_obj, "out", true);
  require_shape(out, bufs[0].shape);
  DeviceCheck devices;
  for (const DeviceArray& b : bufs) devices.add(b);
  devices.add(out);
  const void* base = nullptr;
  if (!base_obj.is_none()) {
    const DeviceArray b = parse_float(base_obj, "base");
    if (b.kind != bufs[0].kind) {
      throw py::type_error("base has " + b.describe() + " but the buffers have dtype " +
                           bufs[0].dtype_str());
    }
    require_shape(b, bufs[0].shape);
    devices.add(b);
    base = b.cptr();
  }
  devices.run(device);
  py::gil_scoped_release release;
  mc::weighted_mean(ptrs, bufs[0].dtype(), bufs[0].size(), weights, base, server_lr,
                    out.as<void>(), out.dtype(), device, stream);
}

py::dict cuda_info() {
  py::dict d;
  d["compiled"] = true;
  const int n = mc::device_count();
  d["devices"] = n;
  py::list names;
  for (int i = 0; i < n; ++i) names.append(mc::device_description(i));
  d["device_names"] = names;
  d["reason"] = n > 0 ? std::string() : mc::device_count_error();
  d["runtime_version"] = mc::runtime_version();
  d["driver_version"] = mc::driver_version();
  d["architectures"] = std::string(mc::compiled_architectures());
  return d;
}

#else  // !MARS_WITH_CUDA

[[noreturn]] void not_compiled() {
  throw std::runtime_error(
      "mars_native was built without the CUDA backend (no CUDA compiler was found at build time, "
      "or MARS_NATIVE_CUDA=OFF). Rebuild with a CUDA toolkit on PATH and MARS_NATIVE_CUDA=ON to "
      "run on GPUs, or pass CPU arrays.");
}

py::dict cuda_info() {
  py::dict d;
  d["compiled"] = false;
  d["devices"] = 0;
  d["device_names"] = py::list();
  d["reason"] = "the CUDA backend is not compiled in";
  d["runtime_version"] = 0;
  d["driver_version"] = 0;
  d["architectures"] = "";
  return d;
}

#endif

}  // namespace

void register_cuda(py::module_& parent) {
  py::module_ m = parent.def_submodule(
      "cuda",
      "The CUDA backend (use mars_native._cuda). Kernels take device arrays: "
      "__cuda_array_interface__ dicts or objects, or (ptr, shape, typestr, device) tuples.");
#if defined(MARS_WITH_CUDA)
  m.def("available", [] { return mc::device_count() > 0; },
        "True when the CUDA backend is compiled in and at least one device is usable.");
  m.def("device_count", [] { return mc::device_count(); },
        "Number of CUDA devices (0 without a driver or device).");
  m.def("pointer_device", [](std::uintptr_t ptr) { return mc::pointer_device(ptr); },
        py::arg("ptr"), "Ordinal of the CUDA device that owns a device pointer.");
  m.def("trim_memory", [] { mc::trim_memory(); },
        "Release the unused scratch memory the CUDA backend keeps reserved between calls.");
  m.def("channel_spectral_norms", &spectral, py::arg("weights"), py::arg("scales"),
        py::arg("results"), py::arg("device"), py::arg("stream"),
        "results[i][k] = sigma_max(weights[i][k] as (in, prod(kernel))) * scales[i][k], for "
        "every tensor i in one batch of launches. float32/float64 weights, float64 scales "
        "(or None) and results, all on `device`.");
  m.def("top_k_ceil", &top_k_ceil, py::arg("values"), py::arg("kappa"), py::arg("outs"),
        py::arg("device"), py::arg("stream"),
        "outs[i] = the ceil(kappa*n_i) largest of values[i], descending (float64 device arrays).");
  m.def("top_k_quantile", &top_k_quantile, py::arg("values"), py::arg("kappa"),
        py::arg("outs"), py::arg("counts"), py::arg("device"), py::arg("stream"),
        "outs[i][:counts[i]] = values[i] >= numpy's linear (1-kappa) quantile, in input order.");
  m.def("sort_rows", &sort_rows, py::arg("X"), py::arg("out"), py::arg("device"),
        py::arg("stream"), "out (float64) = every row of X sorted ascending.");
  m.def("pairwise_wasserstein", &pairwise, py::arg("X"), py::arg("p"),
        py::arg("rows_sorted"), py::arg("out"), py::arg("device"), py::arg("stream"),
        "out (n, n) float64 = W_p between the rows of X (n, d).");
  m.def("kwmeans_assign", &kwmeans_assign, py::arg("X"), py::arg("centers"), py::arg("p"),
        py::arg("sorted"), py::arg("labels"), py::arg("costs"), py::arg("device"),
        py::arg("stream"),
        "labels[i] = argmin_c W_p^p(X[i], centers[c]) (first on ties), costs[i] = that W_p^p.");
  m.def("weighted_mean", &weighted_mean, py::arg("buffers"), py::arg("weights"),
        py::arg("base"), py::arg("server_lr"), py::arg("out"), py::arg("device"),
        py::arg("stream"),
        "out = sum_i w_i buffers[i] / sum_i w_i (fp64 accumulation, buffer order), or "
        "base + server_lr * (mean - base).");
#else
  m.def("available", [] { return false; }, "False: the CUDA backend is not compiled in.");
  m.def("device_count", [] { return 0; }, "0: the CUDA backend is not compiled in.");
  m.def("pointer_device", [](std::uintptr_t) -> int { not_compiled(); }, py::arg("ptr"));
  m.def("trim_memory", [] {}, "Nothing to release: the CUDA backend is not compiled in.");
  m.def("channel_spectral_norms", [](py::args, py::kwargs) { not_compiled(); });
  m.def("top_k_ceil", [](py::args, py::kwargs) { not_compiled(); });
  m.def("top_k_quantile", [](py::args, py::kwargs) { not_compiled(); });
  m.def("sort_rows", [](py::args, py::kwargs) { not_compiled(); });
  m.def("pairwise_wasserstein", [](py::args, py::kwargs) { not_compiled(); });
  m.def("kwmeans_assign", [](py::args, py::kwargs) { not_compiled(); });
  m.def("weighted_mean", [](py::args, py::kwargs) { not_compiled(); });
#endif
  m.def("info", &cuda_info,
        "CUDA backend status: compiled, devices, device_names, reason (why 0 devices), "
        "runtime_version, driver_version, architectures.");
}

}  // namespace mars_bindings
