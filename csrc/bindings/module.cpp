// The _core extension: nothing but the registration of each concern.
#include "common.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "mars_native compiled core (C++17). Use the mars_native package, not this module.";
  mars_bindings::register_info(m);
}
