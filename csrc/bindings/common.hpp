// Shared pybind11 helpers for the mars_native bindings. Every binding file includes this header
// and defines one register_<concern>(py::module_&) function that module.cpp calls.
//
// Conventions: bad values raise ValueError (std::invalid_argument), bad types raise TypeError
// (py::type_error); messages name the argument and its shape / dtype.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace mars_bindings {

void register_info(py::module_& m);
void register_spectral(py::module_& m);
void register_topk(py::module_& m);
void register_wasserstein(py::module_& m);
void register_aggregate(py::module_& m);
void register_kwmeans(py::module_& m);
void register_cuda(py::module_& m);
void register_buffers(py::module_& m);

// "(3, 4)" for a (3, 4) array, "(5,)" for a 1-D one, "()" for a scalar.
inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(a.shape(i));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// "dtype float64 and shape (3, 4)"
inline std::string describe(const py::array& a) {
  return "dtype " + dtype_str(a) + " and shape " + shape_str(a);
}

// Thread count argument of a kernel: 0 = the library default, otherwise >= 1.
inline int threads_arg(int n_threads) {
  if (n_threads < 0) {
    throw std::invalid_argument("n_threads must be >= 1 (or None / 0 for the default), got " +
                                std::to_string(n_threads));
  }
  return n_threads;
}

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Any real numeric array-like (float, signed or unsigned int) as a C-contiguous float64 array
// (no copy when it already is one). bool, complex, object and string arrays are a TypeError.
inline DoubleArray as_float64(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + " must be an array of real numbers, got " +
                         py::str(py::type::of(obj)).cast<std::string>());
  }
  const char kind = arr.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(name) + " must hold real numbers (float or int), got " +
                         describe(arr));
  }
  // A misaligned float64 view would be passed through without a copy: copy it (aligned).
  if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) arr = arr.attr("copy")();
  DoubleArray out = DoubleArray::ensure(arr);
  if (!out) throw py::error_already_set();
  return out;
}

// Flat index -> "(i, j)" (or "i" for 1-D) in the array's shape.
inline std::string index_str(const py::array& a, std::int64_t flat) {
  if (a.ndim() <= 1) return std::to_string(flat);
  std::string s;
  std::int64_t rest = flat;
  for (py::ssize_t d = a.ndim() - 1; d >= 0; --d) {
    const std::int64_t extent = a.shape(d) > 0 ? a.shape(d) : 1;
    const std::string part = std::to_string(rest % extent);
    s = d == a.ndim() - 1 ? part : part + ", " + s;
    rest /= extent;
  }
  return "(" + s + ")";
}

// ValueError naming the first NaN/Inf of a float64 array.
inline void require_finite(const DoubleArray& a, const char* name) {
  const double* p = a.data();
  const std::int64_t n = static_cast<std::int64_t>(a.size());
  for (std::int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) {
      const char* what = std::isnan(p[i]) ? "NaN" : "Inf";
      throw std::invalid_argument(std::string(name) + " contains " + what + " at index " +
                                  index_str(a, i) + " (shape " + shape_str(a) +
                                  "); only finite values are accepted");
    }
  }
}

}  // namespace mars_bindings
