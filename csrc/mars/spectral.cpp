#include "mars/spectral.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "mars/parallel.hpp"
#include "mars/simd4.hpp"
#include "mars/topeig.hpp"

namespace mars {
namespace spectral {

namespace {

using simd4::V4;

// Channels are processed in groups of kGroup = 4: their Gram matrices are built one by one (each
// vectorised on its own) into the 4 lanes of one buffer, and the top eigenvalues of the group are
// found together (topeig.hpp), one channel per SIMD lane. Lanes never interact, so a channel's
// result does not depend on the group it falls in (nor on the thread count).
constexpr int kGroup = 4;
// Up to kMaxGroups groups (16 channels) go through one eigen-solve, their dependency chains
// interleaved (topeig::max_eigenvalues<K>).
constexpr int kMaxGroups = 4;
// fp64 rows of a channel are staged in blocks of about this many doubles (16 KiB: L1-resident).
constexpr std::int64_t kBlockDoubles = 2048;
// The float32 3x3 pass prefetches this many bytes ahead of the row it reads, every row (a
// steady stream of requests: measured 8-10% faster per row than prefetching the next block in
// a burst, on the 2-core AMD EPYC, data in DRAM; prefetching past the end is harmless).
constexpr std::int64_t kPrefetchAhead = 4096;
// Widest column tile of the Gram micro-kernel: kMaxTile accumulators + 2 registers.
constexpr int kMaxTile = 10;

inline std::int64_t round_up4(std::int64_t x) { return (x + 3) & ~std::int64_t{3}; }

// Order of a channel's Gram: that of its smaller side.
inline std::int64_t gram_order(std::int64_t rows, std::int64_t cols) { return cols <= rows ? cols : rows; }

inline void prefetch(const char* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// sum_i (s * x_i)^2 in fp64: the 1x1 Gram of a channel whose smaller side is 1.
template <typename T>
double sum_squares(const T* x, std::int64_t n, double s) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(x[k + l]) * s;
      acc[l] += v * v;
    }
  }
  double tail = 0.0;
  for (; k < n; ++k) {
    const double v = static_cast<double>(x[k]) * s;
    tail += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Power-of-two factor that brings the largest magnitude of a float64 channel near 1 when its
// squares could overflow or underflow in fp64; 1 otherwise (and always for float32, whose
// squares always fit). Returns NaN for a channel with NaN/Inf.
template <typename T>
double channel_scale(const T* x, std::int64_t n) {
  double max_abs = 0.0;
  bool finite = true;
  for (std::int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(x[i]));
    finite = finite && (a <= std::numeric_limits<double>::max());  // false for NaN and Inf
    max_abs = a > max_abs ? a : max_abs;
  }
  if (!finite) return std::numeric_limits<double>::quiet_NaN();
  if (max_abs == 0.0) return 1.0;
  if (max_abs > 0x1p-400 && max_abs < 0x1p400) return 1.0;
  // 2^-e with e = exponent of max_abs; for subnormal max_abs (e < -1022) 2^-e would overflow, and
  // 2^1000 already lifts it far into the normal range.
  return std::ldexp(1.0, std::min(-std::ilogb(max_abs), 1000));
}

// Copies nb rows of c values (row-major, stride c) to fp64 rows of stride ldb, times s. The
// padding columns c..ldb-1 of buf are left untouched (kept at zero by the caller).
template <typename T>
inline void stage_rows(const T* m, std::int64_t nb, int c, std::int64_t ldb, double s,
                       double* buf) {
  if constexpr (std::is_same<T, float>::value) {
#if defined(MARS_SIMD4_AVX2)
    if (c == 9) {  // 3x3 kernels: two 4-wide conversions and one scalar per row
      for (std::int64_t b = 0; b < nb; ++b) {
        const float* row = m + b * 9;
        double* dst = buf + b * ldb;
        _mm256_storeu_pd(dst, _mm256_cvtps_pd(_mm_loadu_ps(row)));
        _mm256_storeu_pd(dst + 4, _mm256_cvtps_pd(_mm_loadu_ps(row + 4)));
        dst[8] = static_cast<double>(row[8]);
      }
      return;
    }
#endif
    (void)s;  // float32 input is never rescaled (s == 1)
    for (std::int64_t b = 0; b < nb; ++b) {
      for (int j = 0; j < c; ++j) buf[b * ldb + j] = static_cast<double>(m[b * c + j]);
    }
  } else {
    for (std::int64_t b = 0; b < nb; ++b) {
      for (int j = 0; j < c; ++j) buf[b * ldb + j] = static_cast<double>(m[b * c + j]) * s;
    }
  }
}

// Gram micro-kernel: for the nb staged rows x_b (stride ldb), adds sum_b x_b[i0..i0+3] *
// x_b[j0 + t] to gacc entries (i0 + l, j0 + t) for t < W (entries with i0 + l >= c are dropped).
// W column accumulators of 4 lanes stay in registers; each row costs 1 vector load, W broadcast
// loads and W fused multiply-adds.
// Narrow tiles (W <= 6) keep two accumulator sets, for even and odd rows, so that enough
// independent fused multiply-adds are in flight to hide their latency; the two sets are added at
// the end of the block (a fixed order).
//
// pf: optional prefetch of the next block of the input (pf_lines cache lines of 64 bytes, spread
// over the rows), so that the next block streams in from memory while this one is computed.
template <int W>
inline void gram_tile(const double* buf, std::int64_t nb, std::int64_t ldb, int i0, int j0, int c,
                      double* gacc, const char* pf = nullptr, std::int64_t pf_lines = 0) {
  constexpr int kSets = W <= 6 ? 2 : 1;
  V4 acc[kSets][W];
  for (int u = 0; u < kSets; ++u) {
    for (int t = 0; t < W; ++t) acc[u][t] = simd4::zero();
  }
  const std::int64_t pf_per_row = pf == nullptr ? 0 : (pf_lines + nb - 1) / nb;
  std::int64_t b = 0;
  for (; b + kSets <= nb; b += kSets) {
    for (std::int64_t q = 0; q < pf_per_row * kSets; ++q) {
      const std::int64_t line = b * pf_per_row + q;
      if (line < pf_lines) prefetch(pf + line * 64);
    }
    for (int u = 0; u < kSets; ++u) {
      const double* row = buf + (b + u) * ldb;
      const V4 x = simd4::load(row + i0);
      for (int t = 0; t < W; ++t) acc[u][t] = simd4::fmadd(x, simd4::splat(row[j0 + t]), acc[u][t]);
    }
  }
  for (; b < nb; ++b) {
    const double* row = buf + b * ldb;
    const V4 x = simd4::load(row + i0);
    for (int t = 0; t < W; ++t) acc[0][t] = simd4::fmadd(x, simd4::splat(row[j0 + t]), acc[0][t]);
  }
  if constexpr (kSets == 2) {
    for (int t = 0; t < W; ++t) acc[0][t] = acc[0][t] + acc[1][t];
  }
  const int li = std::min(4, c - i0);
  for (int t = 0; t < W; ++t) {
    double lanes[4];
    simd4::store(lanes, acc[0][t]);
    for (int l = 0; l < li; ++l) gacc[(i0 + l) * c + j0 + t] += lanes[l];
  }
}

#if defined(MARS_SIMD4_AVX2)
// First pass of a float32 3x3 kernel (c = 9): converts nb rows to fp64 (stored with stride 12 for
// the second pass, gram_tile<4>) and, from the same registers, accumulates G[0..7][4..8] and
// G[8][8] (11 accumulators). Fusing the conversion with the widest part of the Gram saves a
// pass over the staged rows.
inline void gram9_stage(const float* m, std::int64_t nb, double* buf, double* gacc) {
  constexpr std::int64_t ldb = 12;
  // Named accumulators (not an array) so that all eleven stay in registers across the loop.
  __m256d a04 = _mm256_setzero_pd(), a05 = a04, a06 = a04, a07 = a04, a08 = a04;
  __m256d a44 = a04, a45 = a04, a46 = a04, a47 = a04, a48 = a04;
  double a88 = 0.0;
  for (std::int64_t b = 0; b < nb; ++b) {
    const float* row = m + b * 9;
    prefetch(reinterpret_cast<const char*>(row) + kPrefetchAhead);
    double* dst = buf + b * ldb;
    const __m256d x0 = _mm256_cvtps_pd(_mm_loadu_ps(row));
    const __m256d x1 = _mm256_cvtps_pd(_mm_loadu_ps(row + 4));
    const double x8 = static_cast<double>(row[8]);
    _mm256_storeu_pd(dst, x0);
    _mm256_storeu_pd(dst + 4, x1);
    dst[8] = x8;
    // Broadcasts straight from the just-staged doubles (load-port broadcasts, store-forwarded).
    __m256d bt = _mm256_broadcast_sd(dst + 4);
    a04 = _mm256_fmadd_pd(x0, bt, a04);
    a44 = _mm256_fmadd_pd(x1, bt, a44);
    bt = _mm256_broadcast_sd(dst + 5);
    a05 = _mm256_fmadd_pd(x0, bt, a05);
    a45 = _mm256_fmadd_pd(x1, bt, a45);
    bt = _mm256_broadcast_sd(dst + 6);
    a06 = _mm256_fmadd_pd(x0, bt, a06);
    a46 = _mm256_fmadd_pd(x1, bt, a46);
    bt = _mm256_broadcast_sd(dst + 7);
    a07 = _mm256_fmadd_pd(x0, bt, a07);
    a47 = _mm256_fmadd_pd(x1, bt, a47);
    bt = _mm256_broadcast_sd(dst + 8);
    a08 = _mm256_fmadd_pd(x0, bt, a08);
    a48 = _mm256_fmadd_pd(x1, bt, a48);
    a88 = std::fma(x8, x8, a88);
  }
  const __m256d acc0[5] = {a04, a05, a06, a07, a08};
  const __m256d acc1[5] = {a44, a45, a46, a47, a48};
  double lanes[4];
  for (int t = 0; t < 5; ++t) {
    _mm256_storeu_pd(lanes, acc0[t]);
    for (int l = 0; l < 4; ++l) gacc[l * 9 + 4 + t] += lanes[l];
    _mm256_storeu_pd(lanes, acc1[t]);
    for (int l = 0; l < 4; ++l) gacc[(4 + l) * 9 + 4 + t] += lanes[l];
  }
  gacc[8 * 9 + 8] += a88;
}
#endif

#if defined(MARS_SIMD4_AVX2)
// Second pass of a float32 3x3 kernel: G[0..3][0..3] from the staged rows, without broadcasts:
// with x = row[0..3], s1 = (x1, x0, x3, x2) and s2 = (x2, x3, x0, x1), the products x*x, x*s1,
// x*s2 and s1*s2 hold the 10 distinct entries (the 4-lane "rotation" trick): 1 load, 2 shuffles
// and 4 fused multiply-adds per row. Two row parities keep 8 independent accumulators.
inline void gram_sym4(const double* buf, std::int64_t nb, std::int64_t ldb, double* gacc, int c) {
  __m256d p0[2], p1[2], p2[2], p3[2];
  for (int u = 0; u < 2; ++u) p0[u] = p1[u] = p2[u] = p3[u] = _mm256_setzero_pd();
  std::int64_t b = 0;
  auto step = [&](int u, const double* row) {
    const __m256d x = _mm256_loadu_pd(row);
    const __m256d s1 = _mm256_permute_pd(x, 0x5);
    const __m256d s2 = _mm256_permute2f128_pd(x, x, 0x01);
    p0[u] = _mm256_fmadd_pd(x, x, p0[u]);
    p1[u] = _mm256_fmadd_pd(x, s1, p1[u]);
    p2[u] = _mm256_fmadd_pd(x, s2, p2[u]);
    p3[u] = _mm256_fmadd_pd(s1, s2, p3[u]);
  };
  for (; b + 2 <= nb; b += 2) {
    step(0, buf + b * ldb);
    step(1, buf + (b + 1) * ldb);
  }
  if (b < nb) step(0, buf + b * ldb);
  double q0[4], q1[4], q2[4], q3[4];
  _mm256_storeu_pd(q0, _mm256_add_pd(p0[0], p0[1]));
  _mm256_storeu_pd(q1, _mm256_add_pd(p1[0], p1[1]));
  _mm256_storeu_pd(q2, _mm256_add_pd(p2[0], p2[1]));
  _mm256_storeu_pd(q3, _mm256_add_pd(p3[0], p3[1]));
  for (int l = 0; l < 4; ++l) gacc[l * c + l] += q0[l];
  gacc[0 * c + 1] += q1[0];
  gacc[2 * c + 3] += q1[2];
  gacc[0 * c + 2] += q2[0];
  gacc[1 * c + 3] += q2[1];
  gacc[1 * c + 2] += q3[0];
  gacc[0 * c + 3] += q3[1];
}
#endif

// The second pass of a 3x3 kernel (c = 9, ldb = 12): G[4..7][4..8] and G[8][8] in one sweep
// (6 accumulators per row parity) instead of two narrow tiles.
inline void gram_tail9(const double* buf, std::int64_t nb, double* gacc) {
  constexpr std::int64_t ldb = 12;
  V4 acc[2][6];
  for (int u = 0; u < 2; ++u) {
    for (int t = 0; t < 6; ++t) acc[u][t] = simd4::zero();
  }
  std::int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    for (int u = 0; u < 2; ++u) {
      const double* row = buf + (b + u) * ldb;
      const V4 x1 = simd4::load(row + 4);
      for (int t = 0; t < 5; ++t) acc[u][t] = simd4::fmadd(x1, simd4::splat(row[4 + t]), acc[u][t]);
      acc[u][5] = simd4::fmadd(simd4::load(row + 8), simd4::splat(row[8]), acc[u][5]);
    }
  }
  for (; b < nb; ++b) {
    const double* row = buf + b * ldb;
    const V4 x1 = simd4::load(row + 4);
    for (int t = 0; t < 5; ++t) acc[0][t] = simd4::fmadd(x1, simd4::splat(row[4 + t]), acc[0][t]);
    acc[0][5] = simd4::fmadd(simd4::load(row + 8), simd4::splat(row[8]), acc[0][5]);
  }
  double lanes[4];
  for (int t = 0; t < 5; ++t) {
    simd4::store(lanes, acc[0][t] + acc[1][t]);
    for (int l = 0; l < 4; ++l) gacc[(4 + l) * 9 + 4 + t] += lanes[l];
  }
  simd4::store(lanes, acc[0][5] + acc[1][5]);
  gacc[8 * 9 + 8] += lanes[0];
}

#if defined(MARS_SIMD4_AVX2)
// ------------------------------------------------ approximate float32 Grams of 3x3 kernels
//
// layer_top only needs a channel's exact Gram when the channel is solved; to certify the others
// below T (and to rank channels by estimate) a Gram with a rigorous error bound is enough.
// gram9_f32 sums the products of a float32 3x3 channel in float32: 8 lanes per vector and no
// conversion, about half the work per row of the exact fp64 Gram, so the pass over the layer
// runs near the speed memory delivers the weights. Blocks of kF32Block rows are summed in
// float32 (one FMA chain per entry, from zero) and added in fp64.
//
// Error (Higham, Accuracy and Stability, sec. 3.1, with the underflow terms): for the computed
// entry g_ij of the true G = M^T M, |g_ij - G_ij| <= rel * sum_r |x_ri x_rj| + per-entry
// underflow terms, rel = gamma_B (float32, B = kF32Block) + gamma_nb (fp64, nb blocks). An
// underflowing float32 operation loses less than 2^-126 (even with flush-to-zero), and an input
// read as zero (denormals-are-zero) loses |x_ri x_rj| <= 2^-126 |x_rj|, summed over the rows
// <= 2^-126 (rows + G_jj) / 2. With sum_r |x_ri x_rj| <= sqrt(G_ii G_jj) and
// ||[sqrt(G_ii G_jj)]||_2 = trace(G), ||G - Ghat||_2 <= (rel + 9 * 2^-126) trace(G)
// + 9 * rows * 2^-125; and trace(G) <= (trace(Ghat) + 9 * rows * 2^-125) / (1 - rel) (the
// diagonal sums only non-negative terms). gram9_f32_error returns that bound (with slack).
constexpr std::int64_t kF32Block = 64;

inline double gram9_f32_error(double trace_hat, std::int64_t rows) {
  const double blocks = static_cast<double>((rows + kF32Block - 1) / kF32Block);
  const double rel = 1.01 * static_cast<double>(kF32Block + 1) * 0x1p-24 + (blocks + 2.0) * 0x1p-52 +
                     9.0 * 0x1p-126;
  const double abs = 9.0 * static_cast<double>(rows) * 0x1p-124;
  const double trace = (trace_hat + abs) / (1.0 - rel);
  return (rel * trace + abs) * (1.0 + 1e-12);  // (the rounding of this formula)
}

// Where gram9_f32 finds entry (i, j): {accumulator, lane}, from the eight products listed there
// (the first product that holds the pair; every pair i <= j is covered).
constexpr unsigned char kGram9Slot[9][9][2] = {
    {{2, 0}, {3, 1}, {3, 2}, {3, 3}, {2, 4}, {3, 5}, {3, 6}, {3, 7}, {0, 0}},
    {{3, 1}, {1, 0}, {5, 1}, {6, 0}, {7, 1}, {2, 5}, {5, 5}, {4, 1}, {0, 1}},
    {{3, 2}, {5, 1}, {1, 1}, {5, 2}, {6, 1}, {7, 2}, {2, 6}, {4, 2}, {0, 2}},
    {{3, 3}, {6, 0}, {5, 2}, {1, 2}, {5, 3}, {6, 2}, {7, 3}, {2, 7}, {0, 3}},
    {{2, 4}, {7, 1}, {6, 1}, {5, 3}, {1, 3}, {7, 5}, {6, 3}, {4, 4}, {0, 4}},
    {{3, 5}, {2, 5}, {7, 2}, {6, 2}, {7, 5}, {1, 4}, {7, 6}, {4, 5}, {0, 5}},
    {{3, 6}, {5, 5}, {2, 6}, {7, 3}, {6, 3}, {7, 6}, {1, 5}, {4, 6}, {0, 6}},
    {{3, 7}, {4, 1}, {4, 2}, {2, 7}, {4, 4}, {4, 5}, {4, 6}, {1, 6}, {0, 7}},
    {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}, {0, 5}, {0, 6}, {0, 7}, {1, 7}}};

// The float32-summed Gram of a (rows x 9) float32 channel m (rows >= 1) into lane `lane` of the
// lane-interleaved 9 x 9 matrix `lanes` (both triangles). Per row x, eight 8-wide fused
// multiply-adds and no shuffle cover the 45 distinct products x_i x_j (the fp64 kernel needs 15
// four-wide ones and a conversion). With U_a = x[a .. a+7] (unaligned loads), B_a = x[a .. a+3]
// in both 128-bit halves and S_j = x_j in every lane, the products are U0 S8, U1 U1, U0 B0,
// U0 S0, U0 S7, U1 B0, U1 B3 and U0 B3 (found by an exhaustive search over such products that
// read no further than x_8 and load few 256-bit vectors); kGram9Slot says which lane holds
// which entry. Seven loads per row, two of them 256-bit.
inline void gram9_f32(const float* m, std::int64_t rows, double* lanes, int lane) {
  alignas(32) double acc[8][8] = {};  // fp64 sums of the blocks' accumulators
  for (std::int64_t r0 = 0; r0 < rows; r0 += kF32Block) {
    const std::int64_t nb = std::min(kF32Block, rows - r0);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const float* row = m + r0 * 9;
    for (std::int64_t b = 0; b < nb; ++b, row += 9) {
      prefetch(reinterpret_cast<const char*>(row) + kPrefetchAhead);
      const __m256 u0 = _mm256_loadu_ps(row), u1 = _mm256_loadu_ps(row + 1);
      const __m256 b0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(row));
      const __m256 b3 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(row + 3));
      a0 = _mm256_fmadd_ps(u0, _mm256_broadcast_ss(row + 8), a0);
      a1 = _mm256_fmadd_ps(u1, u1, a1);
      a2 = _mm256_fmadd_ps(u0, b0, a2);
      a3 = _mm256_fmadd_ps(u0, _mm256_broadcast_ss(row), a3);
      a4 = _mm256_fmadd_ps(u0, _mm256_broadcast_ss(row + 7), a4);
      a5 = _mm256_fmadd_ps(u1, b0, a5);
      a6 = _mm256_fmadd_ps(u1, b3, a6);
      a7 = _mm256_fmadd_ps(u0, b3, a7);
    }
    const __m256 blk[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int q = 0; q < 8; ++q) {
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(blk[q]));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(blk[q], 1));
      _mm256_store_pd(acc[q], _mm256_add_pd(_mm256_load_pd(acc[q]), lo));
      _mm256_store_pd(acc[q] + 4, _mm256_add_pd(_mm256_load_pd(acc[q] + 4), hi));
    }
  }
  for (int i = 0; i < 9; ++i) {
    for (int j = 0; j < 9; ++j) {
      lanes[(i * 9 + j) * kGroup + lane] = acc[kGram9Slot[i][j][0]][kGram9Slot[i][j][1]];
    }
  }
}
#endif

inline void gram_tile_dispatch(int w, const double* buf, std::int64_t nb, std::int64_t ldb, int i0,
                               int j0, int c, double* gacc) {
  switch (w) {
    case 1: gram_tile<1>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 2: gram_tile<2>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 3: gram_tile<3>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 4: gram_tile<4>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 5: gram_tile<5>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 6: gram_tile<6>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 7: gram_tile<7>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 8: gram_tile<8>(buf, nb, ldb, i0, j0, c, gacc); break;
    case 9: gram_tile<9>(buf, nb, ldb, i0, j0, c, gacc); break;
    default: gram_tile<kMaxTile>(buf, nb, ldb, i0, j0, c, gacc); break;
  }
}

// Per-thread scratch space.
struct Workspace {
  std::vector<V4> buf_storage;  // staged fp64 rows (zero padding columns), 32-byte aligned
  double* buf = nullptr;
  std::vector<double> gacc;   // one channel's Gram, c x c (upper triangle used)
  std::vector<double> lanes;  // kMaxGroups groups' Gram matrices, lane-interleaved (n x n x 4 each)
  std::vector<V4> eig;        // topeig workspace, kMaxGroups groups
  std::int64_t rows = -1, cols = -1;  // the layout the buffers were prepared for
  // layer_top: a whole layer's TopData (Grams lane-interleaved per group of 4, square;
  // per-channel prescale, estimate, error bound of the stored Gram and kind: NaN / computed
  // exactly / to certify), and channel index lists.
  std::vector<double> top_doubles;
  std::vector<unsigned char> top_bytes;
  std::vector<std::int64_t> order, todo;
};

// Writes the (n x n) Gram matrix of channel m into lane `lane` of `lanes` (both triangles):
// (sM)^T (sM) when cols <= rows (n = cols), else (sM)(sM)^T (n = rows). Sums in fp64, in a fixed
// order (blocks of rows, then tiles), independent of the lane and of the thread.
template <typename T>
void gram_into_lane(const T* m, std::int64_t rows, std::int64_t cols, double s, double* lanes,
                    int lane, Workspace& ws) {
  double* out = lanes + lane;
  if (cols <= rows) {
    const int c = static_cast<int>(cols);
    const std::int64_t ldb = round_up4(c);
    const std::int64_t block = std::max<std::int64_t>(8, kBlockDoubles / ldb);
    double* gacc = ws.gacc.data();
    std::fill(gacc, gacc + static_cast<std::int64_t>(c) * c, 0.0);
    for (std::int64_t r0 = 0; r0 < rows; r0 += block) {
      const std::int64_t nb = std::min(block, rows - r0);
      // Prefetch the next block (possibly the next channel's first rows: channels are
      // contiguous; prefetching past the end of the array is harmless).
      const char* next = reinterpret_cast<const char*>(m + (r0 + nb) * c);
      const std::int64_t next_lines = (block * c * static_cast<std::int64_t>(sizeof(T)) + 63) / 64;
#if defined(MARS_SIMD4_AVX2)
      if constexpr (std::is_same<T, float>::value) {
        if (c == 9) {  // 3x3 kernels: G[0..7][4..8] and G[8][8] while staging, then G[0..3][0..3]
          gram9_stage(m + r0 * c, nb, ws.buf, gacc);
          gram_sym4(ws.buf, nb, ldb, gacc, c);
          continue;
        }
      }
#endif
      stage_rows(m + r0 * c, nb, c, ldb, s, ws.buf);
      if (c == 9) {  // 3x3 kernels: G[0..3][0..8], then G[4..7][4..8] and G[8][8]
        gram_tile<9>(ws.buf, nb, ldb, 0, 0, c, gacc, next, next_lines);
        gram_tail9(ws.buf, nb, gacc);
        continue;
      }
      for (int i0 = 0; i0 < c; i0 += 4) {
        for (int j0 = i0; j0 < c; j0 += kMaxTile) {
          gram_tile_dispatch(std::min(kMaxTile, c - j0), ws.buf, nb, ldb, i0, j0, c, gacc);
        }
      }
    }
    for (int i = 0; i < c; ++i) {
      for (int j = i; j < c; ++j) {
        const double v = gacc[i * c + j];
        out[(static_cast<std::int64_t>(i) * c + j) * kGroup] = v;
        out[(static_cast<std::int64_t>(j) * c + i) * kGroup] = v;
      }
    }
  } else {
    const int r = static_cast<int>(rows);
    const std::int64_t ldc = round_up4(cols);
    double* buf = ws.buf;
    stage_rows(m, r, static_cast<int>(cols), ldc, s, buf);
    for (int i = 0; i < r; ++i) {
      for (int j = i; j < r; ++j) {
        const double* a = buf + i * ldc;
        const double* b = buf + j * ldc;
        V4 acc = simd4::zero();
        for (std::int64_t k = 0; k < ldc; k += 4) acc = simd4::fmadd(simd4::load(a + k), simd4::load(b + k), acc);
        double l4[4];
        simd4::store(l4, acc);
        const double v = (l4[0] + l4[1]) + (l4[2] + l4[3]);
        out[(static_cast<std::int64_t>(i) * r + j) * kGroup] = v;
        out[(static_cast<std::int64_t>(j) * r + i) * kGroup] = v;
      }
    }
  }
}

// Prepares ws for channels of shape (rows, cols) with Gram order n > 1: zeroed staging buffer
// (rows staged with a stride of round_up4(cols) doubles: 32-byte aligned, no vector load
// crosses a cache line; the padding columns must read as zero), Gram and eigen scratch. A no-op
// when ws already has this layout.
inline void prepare(Workspace& ws, std::int64_t rows, std::int64_t cols) {
  if (ws.rows == rows && ws.cols == cols) return;
  const bool by_columns = cols <= rows;
  const std::int64_t n = gram_order(rows, cols);
  const std::int64_t ld = round_up4(cols);
  const std::int64_t staged =
      by_columns ? std::max<std::int64_t>(8, kBlockDoubles / ld) * ld : rows * ld;
  ws.buf_storage.assign(static_cast<std::size_t>(staged / 4), simd4::zero());
  ws.buf = reinterpret_cast<double*>(ws.buf_storage.data());
  ws.gacc.assign(static_cast<std::size_t>(by_columns ? n * n : 1), 0.0);
  ws.lanes.assign(static_cast<std::size_t>(n * n * kGroup * kMaxGroups), 0.0);
  ws.eig.resize(static_cast<std::size_t>(topeig::workspace_vectors(static_cast<int>(n)) * kMaxGroups));
  ws.rows = rows;
  ws.cols = cols;
}

// topeig::max_eigenvalues<K> for a run-time number of groups (1..kMaxGroups).
inline void max_eigenvalues_of_groups(int groups, double* const* a, int n, V4* const* work, V4* out) {
  switch (groups) {
    case 1: topeig::max_eigenvalues<1>(a, n, work, out); break;
    case 2: topeig::max_eigenvalues<2>(a, n, work, out); break;
    case 3: topeig::max_eigenvalues<3>(a, n, work, out); break;
    default: topeig::max_eigenvalues<kMaxGroups>(a, n, work, out); break;
  }
}

// Writes the Gram (both triangles) of channel k of the (out, rows, cols) weight w into lane
// `lane` of `lanes`, or the zero matrix for a channel holding NaN/Inf (then *bad = true);
// *sc: the power-of-two prescale of the channel (1 for float32). ws must be prepared for
// (rows, cols).
template <typename T>
void fill_lane(const T* w, std::int64_t rows, std::int64_t cols, std::int64_t k, double* lanes,
               int lane, double* sc, bool* bad, Workspace& ws) {
  const std::int64_t per_channel = rows * cols;
  const std::int64_t n = gram_order(rows, cols);
  const T* m = w + k * per_channel;
  *sc = std::is_same<T, double>::value ? channel_scale(m, per_channel) : 1.0;
  *bad = std::isnan(*sc);
  if (!*bad) {
    gram_into_lane(m, rows, cols, *sc, lanes, lane, ws);
    // A NaN/Inf input value makes its diagonal entry (a sum of squares) non-finite.
    double trace = 0.0;
    for (std::int64_t i = 0; i < n; ++i) trace += lanes[(i * n + i) * kGroup + lane];
    *bad = !std::isfinite(trace);
  }
  if (*bad) {  // a finite placeholder: the zero matrix
    for (std::int64_t i = 0; i < n * n; ++i) lanes[i * kGroup + lane] = 0.0;
  }
}

// Fills the 4 lanes of `lanes` with the Grams of channels k0 .. k0 + used - 1 (fill_lane), and
// zero matrices for the unused lanes (sc = 1, bad = false).
template <typename T>
void fill_group(const T* w, std::int64_t rows, std::int64_t cols, std::int64_t k0, int used,
                double* lanes, double* sc, bool* bad, Workspace& ws) {
  const std::int64_t n = gram_order(rows, cols);
  for (int l = 0; l < kGroup; ++l) {
    if (l < used) {
      fill_lane(w, rows, cols, k0 + l, lanes, l, sc + l, bad + l, ws);
    } else {
      sc[l] = 1.0;
      bad[l] = false;
      for (std::int64_t i = 0; i < n * n; ++i) lanes[i * kGroup + l] = 0.0;
    }
  }
}

// A channel's value from the top eigenvalue of its (prescaled) Gram: sigma times scale[k].
inline double channel_value(double lambda, double sc, bool bad, const double* scale, std::int64_t k) {
  const double sigma = bad ? std::numeric_limits<double>::quiet_NaN() : std::sqrt(std::max(lambda, 0.0)) / sc;
  return scale ? sigma * scale[k] : sigma;
}

// result[k] for channels k in [begin, end) of the (out, rows, cols) weight w; rows * cols > 0.
// Channels go 4 at a time (SIMD lanes) from `begin`; a channel's value does not depend on the
// range it is computed in.
template <typename T>
void channel_range(const T* w, std::int64_t rows, std::int64_t cols, const double* scale,
                   double* result, std::int64_t begin, std::int64_t end, Workspace& ws) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  const std::int64_t per_channel = rows * cols;
  const std::int64_t n = gram_order(rows, cols);
  if (n == 1) {
    for (std::int64_t k = begin; k < end; ++k) {
      const T* m = w + k * per_channel;
      const double s = std::is_same<T, double>::value ? channel_scale(m, per_channel) : 1.0;
      double sigma = kNaN;
      if (!std::isnan(s)) {
        const double lambda = sum_squares(m, per_channel, s);
        if (std::isfinite(lambda)) sigma = std::sqrt(lambda) / s;
      }
      result[k] = scale ? sigma * scale[k] : sigma;
    }
    return;
  }
  prepare(ws, rows, cols);
  const int nn = static_cast<int>(n);
  // Up to kMaxGroups * kGroup channels per eigen-solve (fewer at the end of the range).
  const std::int64_t gram_size = n * n * kGroup;
  const std::int64_t work_size = topeig::workspace_vectors(nn);
  for (std::int64_t k0 = begin; k0 < end;) {
    const std::int64_t left = end - k0;
    const int groups = static_cast<int>(std::min<std::int64_t>(kMaxGroups, (left + kGroup - 1) / kGroup));
    double sc[kMaxGroups * kGroup], lambda[kMaxGroups * kGroup];
    bool bad[kMaxGroups * kGroup];
    double* a[kMaxGroups];
    V4* work[kMaxGroups];
    int used[kMaxGroups];
    for (int g = 0; g < groups; ++g) {
      used[g] = static_cast<int>(std::min<std::int64_t>(kGroup, left - g * kGroup));
      a[g] = ws.lanes.data() + g * gram_size;
      work[g] = ws.eig.data() + g * work_size;
      fill_group(w, rows, cols, k0 + g * kGroup, used[g], a[g], sc + g * kGroup, bad + g * kGroup, ws);
    }
    V4 out[kMaxGroups];
    max_eigenvalues_of_groups(groups, a, nn, work, out);
    for (int g = 0; g < groups; ++g) simd4::store(lambda + g * kGroup, out[g]);
    const std::int64_t done = std::min<std::int64_t>(left, groups * kGroup);
    for (std::int64_t q = 0; q < done; ++q) result[k0 + q] = channel_value(lambda[q], sc[q], bad[q], scale, k0 + q);
    k0 += done;
  }
}

// ---------------------------------------------------------------- top values of a layer
//
// The CBE keeps only the top values of each layer. layer_top computes every channel's Gram, but
// the top eigenvalue only where it can matter: (1) the `keep` channels with the largest cheap
// estimates (a lower bound of lambda: the largest of the diagonal and the Rayleigh quotient of
// G^1/2 1) get their exact value; T = the smallest of those values, a value that at least `keep`
// channels reach; (2) every other channel is certified below T by one LDL^T factorisation of
// t I - G (topeig::certify_below, t = the channel's T in Gram units, less a 1e-9 margin that
// dwarfs the factorisation's rounding); (3) channels that cannot be certified get their exact
// value too. A certified channel's value (computed or not) lies below T <= the keep-th largest
// value, so the layer's `keep` largest values, and every value >= the keep-th largest, are the
// exact ones, bit for bit; certified channels hold T * sqrt(1 - margin), an upper bound of their
// value that stays below T.
constexpr int kMaxPruneOrder = 16;     // Gram orders 3..16 (3x3 kernels: 9) are pruned
constexpr double kPruneMargin = 1e-9;  // relative, on lambda
constexpr std::int64_t kPruneSpread = 16;

// What layer_top does with a channel: certify it below T (or solve it if that fails), nothing
// (NaN, or an unused lane), or solve it.
enum : unsigned char { kOther = 0, kBad = 1, kExact = 2 };

// A layer's Grams and per-channel data between the two phases of layer_top (padded to whole
// groups of four): store (one group's Grams after another, square lane-interleaved layout),
// prescale, estimate, error bound of the stored Gram, kind.
struct TopData {
  double* store;
  double* sc;
  double* est;
  double* err;
  unsigned char* kind;
};

// TopData of `out` channels with Gram order n: this many doubles and bytes.
inline std::int64_t top_padded(std::int64_t out) { return (out + kGroup - 1) / kGroup * kGroup; }
inline std::int64_t top_doubles(std::int64_t out, std::int64_t n) { return top_padded(out) * (n * n + 3); }

// TopData carved from dp and bp (advanced past it).
inline TopData carve_top_data(std::int64_t out, std::int64_t n, double*& dp, unsigned char*& bp) {
  const std::int64_t padded = top_padded(out);
  TopData d{dp, dp + padded * n * n, nullptr, nullptr, bp};
  d.est = d.sc + padded;
  d.err = d.est + padded;
  dp = d.err + padded;
  bp += padded;
  return d;
}

// Float32 3x3 kernels: the store holds float32-summed Grams with an error bound (gram9_f32),
// and the channels that are solved get their exact Gram from the weights again. Otherwise the
// store holds the exact Grams (error 0).
template <typename T>
bool approx_grams(const LayerView<T>& L) {
#if defined(MARS_SIMD4_AVX2)
  return std::is_same<T, float>::value && L.cols == 9 && L.rows >= L.cols;
#else
  (void)L;
  return false;
#endif
}

// Phase 1 of layer_top for the groups [g_begin, g_end): Grams straight into the store, estimates,
// error bounds and kinds. A channel's data depends on its weights alone (not on the range).
template <typename T>
void top_grams(const LayerView<T>& L, std::int64_t g_begin, std::int64_t g_end, const TopData& d,
               Workspace& ws) {
  const std::int64_t rows = L.rows, cols = L.cols, out = L.out;
  const std::int64_t n = gram_order(rows, cols);
  const int nn = static_cast<int>(n);
  prepare(ws, rows, cols);
  const std::int64_t sq = n * n * kGroup;  // one group's Grams
  const bool approx = approx_grams(L);
  for (std::int64_t g = g_begin; g < g_end; ++g) {
    const std::int64_t k0 = g * kGroup;
    const int used = static_cast<int>(std::min<std::int64_t>(kGroup, out - k0));
    bool bad[kGroup] = {false, false, false, false};
    double* gram = d.store + g * sq;
    if (approx) {
#if defined(MARS_SIMD4_AVX2)
      for (int l = 0; l < kGroup; ++l) {
        d.sc[k0 + l] = 1.0;
        if (l < used) {
          gram9_f32(reinterpret_cast<const float*>(L.weight) + (k0 + l) * rows * cols, rows, gram, l);
        } else {
          for (std::int64_t i = 0; i < n * n; ++i) gram[i * kGroup + l] = 0.0;
        }
      }
#endif
    } else {
      fill_group(L.weight, rows, cols, k0, used, gram, d.sc + k0, bad, ws);
    }
    V4 maxdiag = simd4::zero(), total = simd4::zero(), rowsq = simd4::zero(), trace = simd4::zero();
    for (int i = 0; i < nn; ++i) {  // (both triangles are stored)
      const double* row = gram + static_cast<std::int64_t>(i) * n * kGroup;
      V4 rowsum = simd4::zero();
      for (int j = 0; j < nn; ++j) rowsum = rowsum + simd4::load(row + j * kGroup);
      maxdiag = simd4::max(maxdiag, simd4::load(row + i * kGroup));
      trace = trace + simd4::load(row + i * kGroup);
      total = total + rowsum;
      rowsq = simd4::fmadd(rowsum, rowsum, rowsq);
    }
    double md[kGroup], tt[kGroup], rq[kGroup], tr[kGroup];
    simd4::store(md, maxdiag);
    simd4::store(tt, total);
    simd4::store(rq, rowsq);
    simd4::store(tr, trace);
    for (int l = 0; l < kGroup; ++l) {
      d.kind[k0 + l] = bad[l] || l >= used ? kBad : kOther;  // (unused lanes: padding)
      // 1^T G^2 1 / 1^T G 1 = x^T G x / x^T x for x = G^1/2 1: a Rayleigh quotient, <= lambda.
      const double rayleigh = tt[l] > 0.0 ? rq[l] / tt[l] : 0.0;
      d.est[k0 + l] = std::max(md[l], rayleigh);
      d.err[k0 + l] = 0.0;
      if (approx) {
        // A float32 Gram with a non-finite entry (NaN/Inf weights, or squares beyond the
        // float32 range): NaN estimate, the channel is solved from its exact Gram.
        const bool finite =
            std::isfinite(md[l]) && std::isfinite(tt[l]) && std::isfinite(rq[l]) && std::isfinite(tr[l]);
#if defined(MARS_SIMD4_AVX2)
        if (finite) d.err[k0 + l] = gram9_f32_error(tr[l], rows);
#endif
        if (!finite) d.est[k0 + l] = std::numeric_limits<double>::quiet_NaN();
      }
    }
  }
}

// Phase 2 of layer_top, once top_grams has filled d for every group of the layer.
template <typename T>
void top_finish(const LayerView<T>& L, std::int64_t keep, const TopData& d, Workspace& ws) {
  const std::int64_t rows = L.rows, cols = L.cols, out = L.out;
  const std::int64_t n = gram_order(rows, cols);
  const int nn = static_cast<int>(n);
  prepare(ws, rows, cols);
  const std::int64_t sq = n * n * kGroup;
  const std::int64_t groups = (out + kGroup - 1) / kGroup;
  const bool approx = approx_grams(L);
  double* lanes = ws.lanes.data();
  const double* scale = L.scale;
  // Exact values of the channels idx[0..count): exact Grams (gathered from the store, or computed
  // from the weights again when the store holds float32-summed ones) in lane groups, up to
  // kMaxGroups * kGroup per eigen-solve.
  const std::int64_t work_size = topeig::workspace_vectors(nn);
  const std::int64_t gram_size = n * n * kGroup;
  // (from the store's lower triangle: certify_below uses the upper one as scratch)
  auto gather = [&](std::int64_t k, double* a, int lane) {
    const double* src = d.store + (k / kGroup) * sq + (k % kGroup);
    for (int i = 0; i < nn; ++i) {
      for (int j = 0; j <= i; ++j) {
        const double v = src[(static_cast<std::int64_t>(i) * n + j) * kGroup];
        a[(static_cast<std::int64_t>(i) * n + j) * kGroup + lane] = v;
        a[(static_cast<std::int64_t>(j) * n + i) * kGroup + lane] = v;
      }
    }
  };
  auto solve = [&](const std::int64_t* idx, std::int64_t count) {
    for (std::int64_t b = 0; b < count;) {
      const std::int64_t batch = std::min<std::int64_t>(count - b, kMaxGroups * kGroup);
      const int ng = static_cast<int>((batch + kGroup - 1) / kGroup);
      double* a[kMaxGroups];
      V4* work[kMaxGroups];
      bool bad[kMaxGroups * kGroup] = {};
      for (int g = 0; g < ng; ++g) {
        a[g] = lanes + g * gram_size;
        work[g] = ws.eig.data() + g * work_size;
        for (int l = 0; l < kGroup; ++l) {
          const std::int64_t q = g * kGroup + l;
          if (q < batch && approx) {
            const std::int64_t k = idx[b + q];
            fill_lane(L.weight, rows, cols, k, a[g], l, d.sc + k, bad + q, ws);
          } else if (q < batch) {
            gather(idx[b + q], a[g], l);
          } else {  // an unused lane: the zero matrix
            for (std::int64_t e = 0; e < n * n; ++e) a[g][e * kGroup + l] = 0.0;
          }
        }
      }
      V4 vals[kMaxGroups];
      max_eigenvalues_of_groups(ng, a, nn, work, vals);
      double lambda[kMaxGroups * kGroup];
      for (int g = 0; g < ng; ++g) simd4::store(lambda + g * kGroup, vals[g]);
      for (std::int64_t q = 0; q < batch; ++q) {
        const std::int64_t k = idx[b + q];
        L.result[k] = channel_value(lambda[q], d.sc[k], bad[q], scale, k);
      }
      b += batch;
    }
  };
  // 2. Channel kinds: NaN channels are NaN; a negative scale reverses the order of its value and
  // lambda, so such a channel is always computed, as is one without a finite estimate; the others
  // compete for the top on their estimated value (est becomes that estimate).
  unsigned char* kind = d.kind;
  std::vector<std::int64_t>& order = ws.order;
  std::vector<std::int64_t>& todo = ws.todo;
  order.clear();
  todo.clear();
  for (std::int64_t k = 0; k < out; ++k) {
    if (kind[k] == kBad) {
      L.result[k] = std::numeric_limits<double>::quiet_NaN();
    } else if ((scale && !(scale[k] >= 0.0)) || !std::isfinite(d.est[k])) {
      todo.push_back(k);
      kind[k] = kExact;
    } else {
      const double sigma = std::sqrt(std::max(d.est[k], 0.0)) / d.sc[k];
      d.est[k] = scale ? sigma * scale[k] : sigma;
      order.push_back(k);
    }
  }
  if (static_cast<std::int64_t>(order.size()) <= keep) {
    todo.insert(todo.end(), order.begin(), order.end());
    solve(todo.data(), static_cast<std::int64_t>(todo.size()));
    return;
  }
  // The `keep` largest estimates (ties: the lower index first, so that the choice is fixed).
  const double* est = d.est;
  std::nth_element(order.begin(), order.begin() + (keep - 1), order.end(),
                   [est](std::int64_t x, std::int64_t y) { return est[x] > est[y] || (est[x] == est[y] && x < y); });
  solve(order.data(), keep);
  double t_value = std::numeric_limits<double>::infinity();
  for (std::int64_t q = 0; q < keep; ++q) {
    t_value = std::min(t_value, L.result[order[q]]);
    kind[order[q]] = kExact;
  }
  if (!(t_value > 0.0) || !std::isfinite(t_value)) {  // NaN, 0 or Inf: no certificate
    todo.insert(todo.end(), order.begin() + keep, order.end());
    solve(todo.data(), static_cast<std::int64_t>(todo.size()));
    return;
  }
  // 3. Certify the others below T, two stored groups of four at a time.
  const double bound = t_value * std::sqrt(1.0 - kPruneMargin);
  auto has_other = [&](std::int64_t g) {
    const std::int64_t k0 = g * kGroup;
    return kind[k0] == kOther || kind[k0 + 1] == kOther || kind[k0 + 2] == kOther || kind[k0 + 3] == kOther;
  };
  constexpr int kPair = 2;
  std::int64_t pending[kPair];
  int np = 0;
  auto certify = [&]() {
    double* a[kPair];
    V4* r[kPair];
    V4 tv[kPair];
    double t[kPair][kGroup];
    for (int q = 0; q < np; ++q) {
      const std::int64_t k0 = pending[q] * kGroup;
      a[q] = d.store + pending[q] * sq;
      r[q] = ws.eig.data() + q * 2 * n;
      for (int l = 0; l < kGroup; ++l) {
        const std::int64_t k = k0 + l;
        t[q][l] = 1.0;  // any finite value for lanes that are not certified
        if (kind[k] == kOther) {
          // value < T  <=>  lambda < (T * sc / scale)^2 (lambda of the prescaled exact Gram);
          // the stored Gram is within err of it (spectral norm). A margin of 2 * kPruneMargin
          // keeps lambda (1 + certify_below's rounding) below (T sqrt(1 - kPruneMargin))^2.
          const double limit = scale ? t_value * d.sc[k] / scale[k] : t_value * d.sc[k];
          t[q][l] = limit * limit * (1.0 - 2.0 * kPruneMargin) - d.err[k];  // +Inf for a zero scale
        }
      }
      tv[q] = simd4::load(t[q]);
    }
    // (reads the groups' lower triangles, writes their upper ones: the Grams stay for solve)
    simd4::M4 ok[kPair];
    if (np == kPair && nn == 9) {  // 3x3 kernels: the order known at compile time
      topeig::certify_below<kPair, 9>(a, nn, tv, r, ok);
    } else if (np == kPair) {
      topeig::certify_below<kPair>(a, nn, tv, r, ok);
    } else {
      topeig::certify_below<1>(a, nn, tv, r, ok);
    }
    for (int q = 0; q < np; ++q) {
      double okl[kGroup];
      simd4::store(okl, simd4::select(ok[q], simd4::splat(1.0), simd4::zero()));
      for (int l = 0; l < kGroup; ++l) {
        const std::int64_t k = pending[q] * kGroup + l;
        if (kind[k] != kOther) continue;
        if (scale && scale[k] == 0.0) {
          L.result[k] = 0.0 * scale[k];  // sigma (finite, >= 0) times a zero scale, sign included
        } else if (okl[l] == 1.0 && std::isfinite(t[q][l])) {
          L.result[k] = bound;
        } else {
          todo.push_back(k);
        }
      }
    }
    np = 0;
  };
  for (std::int64_t g = 0; g < groups; ++g) {
    if (!has_other(g)) continue;
    pending[np++] = g;
    if (np == kPair) certify();
  }
  if (np > 0) certify();
  solve(todo.data(), static_cast<std::int64_t>(todo.size()));
}

// The top values of a whole layer in one task (TopData in the thread's workspace).
template <typename T>
void layer_top(const LayerView<T>& L, std::int64_t keep, Workspace& ws) {
  const std::int64_t n = gram_order(L.rows, L.cols);
  ws.top_doubles.resize(static_cast<std::size_t>(top_doubles(L.out, n)));
  ws.top_bytes.resize(static_cast<std::size_t>(top_padded(L.out)));
  double* dp = ws.top_doubles.data();
  unsigned char* bp = ws.top_bytes.data();
  const TopData d = carve_top_data(L.out, n, dp, bp);
  top_grams(L, 0, top_padded(L.out) / kGroup, d, ws);
  top_finish(L, keep, d, ws);
}

template <typename T>
void spectral_impl(const T* w, std::int64_t out, std::int64_t rows, std::int64_t cols,
                   const double* scale, double* result, int n_threads) {
  if (out <= 0) return;
  const std::int64_t per_channel = rows * cols;
  if (per_channel == 0) {
    std::fill(result, result + out, 0.0);
    return;
  }
  const std::int64_t grain = std::max<std::int64_t>(kGroup, 32768 / per_channel);
  parallel::parallel_for(out, n_threads, grain, [&](std::int64_t begin, std::int64_t end) {
    Workspace ws;
    channel_range(w, rows, cols, scale, result, begin, end, ws);
  });
}

// Many layers in one parallel region: the channels of every layer are cut into tasks of about
// equal work (whole SIMD groups, at least kTaskElems elements, about 64 per thread), which the
// threads take one at a time. Values are those of one call per layer, bit for bit.
constexpr std::int64_t kTaskElems = 1 << 16;
// Pruned layers of a batch without the spread (one model) keep their Grams between two parallel
// phases, in shared buffers of at most this many bytes in all (3 MB for a ResNet-18); beyond it
// their values are all exact.
constexpr std::int64_t kSplitStoreMax = std::int64_t{64} << 20;

template <typename T>
void spectral_batch_impl(const LayerView<T>* layers, std::int64_t n_layers, int n_threads,
                         const std::int64_t* keep) {
  // range: channels [begin, end) of a layer, every value exact; top: a whole layer through
  // layer_top; grams / finish: the two phases of layer_top, split over tasks.
  enum class Kind { range, top, grams, finish };
  struct Task {
    std::int64_t layer, begin, end, work;
    Kind kind;
  };
  std::vector<Task> tasks, finish;
  std::int64_t total = 0;
  for (std::int64_t i = 0; i < n_layers; ++i) total += layers[i].out * layers[i].rows * layers[i].cols;
  const int threads = parallel::resolve_threads(n_threads);
  const std::int64_t target = std::max<std::int64_t>(kTaskElems, total / (64 * threads));
  // Pruning (layer_top) takes a whole layer per task when the prunable layers hold at least
  // kPruneSpread times the largest one's work (a round of many models: whole layers spread over
  // the threads, each thread's Grams stay in its cache). Otherwise (one model) the Grams of a
  // layer are computed by several tasks into shared buffers, and a finish task per layer, queued
  // after every Gram task, completes it once its Gram tasks are done. Either way a layer's values
  // are the same function of its weights, bit for bit: they do not depend on the schedule nor on
  // the thread count.
  auto prunable = [&](std::int64_t i) {
    const LayerView<T>& L = layers[i];
    const std::int64_t n = std::min(L.rows, L.cols);
    return keep != nullptr && keep[i] >= 1 && keep[i] < L.out && n >= 3 && n <= kMaxPruneOrder;
  };
  std::int64_t prune_work = 0, prune_max = 0;
  for (std::int64_t i = 0; i < n_layers; ++i) {
    if (!prunable(i)) continue;
    const std::int64_t w = layers[i].out * layers[i].rows * layers[i].cols;
    prune_work += w;
    prune_max = std::max(prune_max, w);
  }
  const bool whole = prune_max > 0 && prune_work >= kPruneSpread * prune_max;
  // Split layers store their Grams in memory between the phases: worth it only where a channel's
  // weights are at least twice its stored Gram (3x3 float32: 36 input channels or more); e.g.
  // the grouped 3x3 convs of a ResNeXt (4-32 input channels per group) measured slower pruned.
  auto splittable = [&](std::int64_t i) {
    const LayerView<T>& L = layers[i];
    const std::int64_t n = gram_order(L.rows, L.cols);
    return prunable(i) && L.rows * L.cols * static_cast<std::int64_t>(sizeof(T)) >= 2 * 8 * n * n;
  };
  std::int64_t n_doubles = 0, n_bytes = 0;
  for (std::int64_t i = 0; i < n_layers && !whole; ++i) {
    if (!splittable(i)) continue;
    n_doubles += top_doubles(layers[i].out, gram_order(layers[i].rows, layers[i].cols));
    n_bytes += top_padded(layers[i].out);
  }
  const bool split = n_doubles > 0 && n_doubles * 8 + n_bytes <= kSplitStoreMax;
  // Shared TopData of the split layers, carved from buffers that the calling thread keeps for
  // its next calls (at most kSplitStoreMax; fresh memory would cost a page fault per 4 KB on
  // every call).
  struct SplitCache {
    std::vector<double> doubles;
    std::vector<unsigned char> bytes;
  };
  thread_local SplitCache cache;
  std::vector<TopData> shared(split ? static_cast<std::size_t>(n_layers) : 0);
  if (split) {
    if (static_cast<std::int64_t>(cache.doubles.size()) < n_doubles) cache.doubles.resize(static_cast<std::size_t>(n_doubles));
    if (static_cast<std::int64_t>(cache.bytes.size()) < n_bytes) cache.bytes.resize(static_cast<std::size_t>(n_bytes));
    double* dp = cache.doubles.data();
    unsigned char* bp = cache.bytes.data();
    for (std::int64_t i = 0; i < n_layers; ++i) {
      if (!splittable(i)) continue;
      const std::int64_t n = gram_order(layers[i].rows, layers[i].cols);
      shared[static_cast<std::size_t>(i)] = carve_top_data(layers[i].out, n, dp, bp);
    }
  }
  for (std::int64_t i = 0; i < n_layers; ++i) {
    const LayerView<T>& L = layers[i];
    if (L.out <= 0) continue;
    const std::int64_t per_channel = L.rows * L.cols;
    if (per_channel == 0) {
      std::fill(L.result, L.result + L.out, 0.0);
      continue;
    }
    if (whole && prunable(i)) {
      tasks.push_back({i, 0, L.out, L.out * per_channel, Kind::top});
      continue;
    }
    std::int64_t step = std::max<std::int64_t>(1, target / per_channel);
    step = (step + kGroup - 1) / kGroup * kGroup;
    Kind kind = Kind::range;
    if (split && splittable(i)) {
      finish.push_back({i, 0, L.out, L.out * per_channel, Kind::finish});
      kind = Kind::grams;
    }
    for (std::int64_t b = 0; b < L.out; b += step) {
      const std::int64_t e = std::min(L.out, b + step);
      tasks.push_back({i, b, e, (e - b) * per_channel, kind});
    }
  }
  // Largest tasks first (whole layers vary in size); a stable order, so the schedule is fixed.
  // Gram tasks go first, finish tasks last (a finish task waits for its layer's Gram tasks, which
  // threads have then all taken: the wait is at most one Gram task).
  auto by_work = [](const Task& x, const Task& y) { return x.work > y.work; };
  if (whole) std::stable_sort(tasks.begin(), tasks.end(), by_work);
  std::stable_partition(tasks.begin(), tasks.end(), [](const Task& x) { return x.kind == Kind::grams; });
  std::stable_sort(finish.begin(), finish.end(), by_work);
  tasks.insert(tasks.end(), finish.begin(), finish.end());
  // Gram tasks not yet done, per layer.
  std::unique_ptr<std::atomic<std::int64_t>[]> pending(
      new std::atomic<std::int64_t>[static_cast<std::size_t>(std::max<std::int64_t>(n_layers, 1))]);
  for (std::int64_t i = 0; i < n_layers; ++i) pending[i].store(0);
  for (const Task& task : tasks) {
    if (task.kind == Kind::grams) pending[task.layer].fetch_add(1);
  }
  // Tasks are handed out dynamically (a thread that the machine slows down takes fewer); each
  // computes its channels from their weights alone, so the values do not depend on the schedule.
  std::vector<Workspace> ws(static_cast<std::size_t>(threads));
  // Set when a task throws: parallel_tasks then stops handing out tasks (a Gram task already
  // taken may never run), so a waiting finish task gives up.
  std::atomic<bool> failed{false};
  parallel::parallel_tasks(static_cast<std::int64_t>(tasks.size()), threads, [&](int thread, std::int64_t t) {
    const Task& task = tasks[static_cast<std::size_t>(t)];
    const LayerView<T>& L = layers[task.layer];
    Workspace& w = ws[static_cast<std::size_t>(thread)];
    try {
      switch (task.kind) {
        case Kind::range:
          channel_range(L.weight, L.rows, L.cols, L.scale, L.result, task.begin, task.end, w);
          break;
        case Kind::top: layer_top(L, keep[task.layer], w); break;
        case Kind::grams: {  // (begin is a multiple of kGroup)
          struct Done {  // counts the task as done even if it throws (the waiter then goes on)
            std::atomic<std::int64_t>& left;
            ~Done() { left.fetch_sub(1, std::memory_order_release); }
          } done{pending[task.layer]};
          top_grams(L, task.begin / kGroup, (task.end + kGroup - 1) / kGroup,
                    shared[static_cast<std::size_t>(task.layer)], w);
          break;
        }
        case Kind::finish:
          while (pending[task.layer].load(std::memory_order_acquire) > 0) {
            if (failed.load()) return;
            std::this_thread::yield();
          }
          top_finish(L, keep[task.layer], shared[static_cast<std::size_t>(task.layer)], w);
          break;
      }
    } catch (...) {
      failed.store(true);
      throw;
    }
  });
}

}  // namespace

void channel_spectral_norms(const float* weight, std::int64_t out, std::int64_t rows,
                            std::int64_t cols, const double* scale, double* result,
                            int n_threads) {
  spectral_impl(weight, out, rows, cols, scale, result, n_threads);
}

void channel_spectral_norms(const double* weight, std::int64_t out, std::int64_t rows,
                            std::int64_t cols, const double* scale, double* result,
                            int n_threads) {
  spectral_impl(weight, out, rows, cols, scale, result, n_threads);
}

void channel_spectral_norms_batch(const LayerView<float>* layers, std::int64_t n_layers,
                                  int n_threads, const std::int64_t* keep) {
  spectral_batch_impl(layers, n_layers, n_threads, keep);
}

void channel_spectral_norms_batch(const LayerView<double>* layers, std::int64_t n_layers,
                                  int n_threads, const std::int64_t* keep) {
  spectral_batch_impl(layers, n_layers, n_threads, keep);
}

}  // namespace spectral
}  // namespace mars
