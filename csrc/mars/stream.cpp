#include "mars/stream.hpp"

#include <algorithm>
#include <cstring>

#include "mars/parallel.hpp"

namespace mars {
namespace stream {

namespace {

struct Block {
  std::int32_t span;
  std::int64_t begin, end;
};

// Independent lanes: the compiler vectorises the inner loop without reassociating anything.
template <typename T, int L>
double block_sum(const T* x, std::int64_t n) {
  T lane[L] = {};
  std::int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) lane[j] += x[i + j];
  }
  double s = 0.0;
  for (int j = 0; j < L; ++j) s += static_cast<double>(lane[j]);
  for (; i < n; ++i) s += static_cast<double>(x[i]);
  return s;
}

// True when some x[i] is NaN/Inf: its exponent field is all ones. U is the unsigned integer of
// the float's width; the loop ORs lanes of flags so that it vectorises and exits once per chunk.
template <typename U>
bool has_non_finite(const void* data, std::int64_t n) {
  constexpr U kExp = static_cast<U>(sizeof(U) == 4 ? 0x7f800000ull : 0x7ff0000000000000ull);
  const auto* x = static_cast<const unsigned char*>(data);
  constexpr std::int64_t kChunk = 4096;
  for (std::int64_t c = 0; c < n; c += kChunk) {
    const std::int64_t end = std::min(n, c + kChunk);
    U any = 0;
    for (std::int64_t i = c; i < end; ++i) {
      U bits;
      std::memcpy(&bits, x + i * static_cast<std::int64_t>(sizeof(U)), sizeof(U));
      any |= static_cast<U>((bits & kExp) == kExp);
    }
    if (any) return true;
  }
  return false;
}

}  // namespace

std::int64_t first_non_finite(const std::vector<Span>& spans) {
  for (std::size_t k = 0; k < spans.size(); ++k) {
    const bool bad = spans[k].f64 ? has_non_finite<std::uint64_t>(spans[k].data, spans[k].n)
                                  : has_non_finite<std::uint32_t>(spans[k].data, spans[k].n);
    if (bad) return static_cast<std::int64_t>(k);
  }
  return -1;
}

double sum(const std::vector<Span>& spans, int n_threads) {
  std::vector<Block> blocks;
  for (std::size_t k = 0; k < spans.size(); ++k) {
    for (std::int64_t b = 0; b < spans[k].n; b += kBlock) {
      blocks.push_back({static_cast<std::int32_t>(k), b, std::min(spans[k].n, b + kBlock)});
    }
  }
  std::vector<double> partial(blocks.size(), 0.0);
  parallel::parallel_for(static_cast<std::int64_t>(blocks.size()), n_threads, 4,
                         [&](std::int64_t lo, std::int64_t hi) {
                           for (std::int64_t b = lo; b < hi; ++b) {
                             const Block& blk = blocks[b];
                             const Span& s = spans[blk.span];
                             const std::int64_t len = blk.end - blk.begin;
                             partial[b] = s.f64 ? block_sum<double, 8>(
                                                      static_cast<const double*>(s.data) + blk.begin, len)
                                                : block_sum<float, 16>(
                                                      static_cast<const float*>(s.data) + blk.begin, len);
                           }
                         });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace stream
}  // namespace mars
