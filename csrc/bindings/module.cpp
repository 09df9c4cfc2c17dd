// The _core extension: nothing but the registration of each concern.
#include "common.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "mars_native compiled core (C++17). Use the mars_native package, not this module.";
  mars_bindings::register_info(m);
  mars_bindings::register_spectral(m);
  mars_bindings::register_topk(m);
  mars_bindings::register_wasserstein(m);
  mars_bindings::register_aggregate(m);
  mars_bindings::register_kwmeans(m);
  mars_bindings::register_cuda(m);
  mars_bindings::register_buffers(m);
}
