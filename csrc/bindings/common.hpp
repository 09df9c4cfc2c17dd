// Shared pybind11 helpers for the mars_native bindings. Every binding file includes this header
// and defines one register_<concern>(py::module_&) function that module.cpp calls.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace mars_bindings {

void register_info(py::module_& m);

}  // namespace mars_bindings
