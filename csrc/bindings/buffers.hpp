// Host memory for the large arrays the extension returns (means, the streaming round's fp64
// running sum): blocks that Python frees are kept, up to a limit, and handed out again for a
// request of the same size.
//
// Why: a round allocates a new model (45 MB for a ResNet-18) and the server drops an older one.
// glibc returns the freed top of its heap to the kernel (trim threshold ~2x its largest freed
// block) and serves big requests with fresh mmaps, so a round can page-fault its output in
// again (4 KiB at a time, each fault a trap plus zeroing): up to 4,600 faults in the mean of a
// 20-client ResNet-18 batch round, and a fresh 90 MB float64 running sum in every streaming
// round (cache on vs off: streaming 0.42-0.47x the time, batch 0.94-0.99x). Reused blocks are
// already mapped.
//
// Arrays from the cache are ordinary NumPy arrays whose base is a capsule that gives the block
// back when the last reference dies. The cache never holds more than its limit (default
// 512 MiB; a block that would exceed it is freed); set_buffer_cache_limit(0) frees everything and
// turns it off.
#pragma once

#include <cstddef>
#include <vector>

#include "common.hpp"

namespace mars_bindings {

// A C-contiguous array of `dtype` and `shape` (uninitialised, or zero-filled with `zero`) backed
// by a cached block. Call with the GIL held.
py::array cached_array(const py::dtype& dtype, const std::vector<py::ssize_t>& shape,
                       bool zero = false, int n_threads = 0);

template <typename T>
py::array cached_array_of(const std::vector<py::ssize_t>& shape) {
  return cached_array(py::dtype::of<T>(), shape);
}

}  // namespace mars_bindings
