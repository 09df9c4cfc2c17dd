// The stream-read floor: the fastest way to read every element of a set of float buffers once.
//
// The benchmarks divide kernel times by this: a kernel that reads the same bytes cannot beat it
// by more than cache effects. The sum is only there so that the reads cannot be optimised away.
#pragma once

#include <cstdint>
#include <vector>

namespace mars {
namespace stream {

struct Span {
  const void* data;  // float or double, aligned to its type
  std::int64_t n;    // elements
  bool f64;
};

// Sum of every element of every span (each read exactly once). Work is cut into fixed blocks
// of kBlock elements; each block is summed with 16 float (or 8 double) lanes and the block sums
// are added in block order in double, so the result does not depend on n_threads.
double sum(const std::vector<Span>& spans, int n_threads);

// Index of the first span holding a NaN or an infinity (a float whose exponent bits are all
// ones), or -1 when every value is finite. One pass, integer bit tests (no floating-point
// exceptions); spans are checked in order and the scan stops at the first bad span.
std::int64_t first_non_finite(const std::vector<Span>& spans);

// Elements per block (exposed for the NumPy twin).
constexpr std::int64_t kBlock = 1 << 14;

}  // namespace stream
}  // namespace mars
