// A tiny deterministic random generator shared by the C++ core and its NumPy twin
// (mars_native.reference.SplitMix64 implements exactly the same arithmetic).
//
// SplitMix64 (Steele, Lea & Flood 2014; the seeding generator of xoshiro): a 64-bit counter
// advanced by the golden-ratio increment and passed through a fixed mixing function. Uniform
// doubles take the top 53 bits: (x >> 11) * 2^-53, in [0, 1).
// Restart r of a K-Means fit with random_state s uses the generator seeded with the (r+1)-th
// output of SplitMix64(s), so restarts are independent of each other and of the thread count.
#pragma once

#include <cstdint>

namespace mars {
namespace rng {

class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  // Uniform double in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  std::uint64_t state_;
};

// Seed of restart `restart` (0-based) derived from the user's random_state.
inline std::uint64_t restart_seed(std::uint64_t random_state, int restart) {
  SplitMix64 master(random_state);
  std::uint64_t seed = 0;
  for (int r = 0; r <= restart; ++r) seed = master.next();
  return seed;
}

}  // namespace rng
}  // namespace mars
