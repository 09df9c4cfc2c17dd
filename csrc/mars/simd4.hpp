// A 4-lane float64 vector for the CPU kernels: AVX2 + FMA registers when the build enables them
// (-march=native on any x86-64 since 2013), a plain 4-double struct otherwise (the compiler
// vectorises it as it can). Every operation is lane-wise: lane l of a result depends only on lane
// l of the operands, so a kernel that packs independent problems into the 4 lanes gets, for each
// problem, exactly the bits it would get alone in any lane, with any neighbours.
//
// fmadd(a, b, c) = a * b + c is one fused operation (one rounding) in the AVX2 + FMA build and a
// multiply then an add (two roundings) otherwise; results are deterministic within a build.
#pragma once

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MARS_SIMD4_AVX2 1
#endif

namespace mars {
namespace simd4 {

#if defined(MARS_SIMD4_AVX2)

struct V4 {
  __m256d v;
};
struct M4 {  // lane mask: all bits set = true
  __m256d m;
};

inline V4 splat(double x) { return {_mm256_set1_pd(x)}; }
inline V4 zero() { return {_mm256_setzero_pd()}; }
inline V4 load(const double* p) { return {_mm256_loadu_pd(p)}; }
inline void store(double* p, V4 a) { _mm256_storeu_pd(p, a.v); }
inline V4 operator+(V4 a, V4 b) { return {_mm256_add_pd(a.v, b.v)}; }
inline V4 operator-(V4 a, V4 b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline V4 operator*(V4 a, V4 b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline V4 operator/(V4 a, V4 b) { return {_mm256_div_pd(a.v, b.v)}; }
inline V4 fmadd(V4 a, V4 b, V4 c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
// c - a * b
inline V4 fnmadd(V4 a, V4 b, V4 c) { return {_mm256_fnmadd_pd(a.v, b.v, c.v)}; }
inline V4 sqrt(V4 a) { return {_mm256_sqrt_pd(a.v)}; }
inline V4 abs(V4 a) { return {_mm256_andnot_pd(_mm256_set1_pd(-0.0), a.v)}; }
// max/min: the second operand when either is NaN (x86 semantics; callers rely on it only for
// finite values).
inline V4 max(V4 a, V4 b) { return {_mm256_max_pd(a.v, b.v)}; }
inline M4 operator>(V4 a, V4 b) { return {_mm256_cmp_pd(a.v, b.v, _CMP_GT_OQ)}; }
inline M4 operator>=(V4 a, V4 b) { return {_mm256_cmp_pd(a.v, b.v, _CMP_GE_OQ)}; }
inline M4 operator<(V4 a, V4 b) { return {_mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ)}; }
inline M4 operator|(M4 a, M4 b) { return {_mm256_or_pd(a.m, b.m)}; }
inline M4 operator&(M4 a, M4 b) { return {_mm256_and_pd(a.m, b.m)}; }
inline M4 operator~(M4 a) { return {_mm256_xor_pd(a.m, _mm256_castsi256_pd(_mm256_set1_epi64x(-1)))}; }
// mask ? a : b, lane-wise.
inline V4 select(M4 mask, V4 a, V4 b) { return {_mm256_blendv_pd(b.v, a.v, mask.m)}; }
inline bool all(M4 mask) { return _mm256_movemask_pd(mask.m) == 0xF; }
inline bool any(M4 mask) { return _mm256_movemask_pd(mask.m) != 0; }

#else  // portable fallback

struct V4 {
  double v[4];
};
struct M4 {
  bool m[4];
};

#define MARS_SIMD4_LANES(expr) \
  for (int l = 0; l < 4; ++l) r.v[l] = (expr)
#define MARS_SIMD4_MASK(expr) \
  for (int l = 0; l < 4; ++l) r.m[l] = (expr)

inline V4 splat(double x) { return {{x, x, x, x}}; }
inline V4 zero() { return splat(0.0); }
inline V4 load(const double* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline void store(double* p, V4 a) {
  for (int l = 0; l < 4; ++l) p[l] = a.v[l];
}
inline V4 operator+(V4 a, V4 b) { V4 r; MARS_SIMD4_LANES(a.v[l] + b.v[l]); return r; }
inline V4 operator-(V4 a, V4 b) { V4 r; MARS_SIMD4_LANES(a.v[l] - b.v[l]); return r; }
inline V4 operator*(V4 a, V4 b) { V4 r; MARS_SIMD4_LANES(a.v[l] * b.v[l]); return r; }
inline V4 operator/(V4 a, V4 b) { V4 r; MARS_SIMD4_LANES(a.v[l] / b.v[l]); return r; }
inline V4 fmadd(V4 a, V4 b, V4 c) { V4 r; MARS_SIMD4_LANES(a.v[l] * b.v[l] + c.v[l]); return r; }
inline V4 fnmadd(V4 a, V4 b, V4 c) { V4 r; MARS_SIMD4_LANES(c.v[l] - a.v[l] * b.v[l]); return r; }
inline V4 sqrt(V4 a) { V4 r; MARS_SIMD4_LANES(std::sqrt(a.v[l])); return r; }
inline V4 abs(V4 a) { V4 r; MARS_SIMD4_LANES(std::fabs(a.v[l])); return r; }
inline V4 max(V4 a, V4 b) { V4 r; MARS_SIMD4_LANES(a.v[l] > b.v[l] ? a.v[l] : b.v[l]); return r; }
inline M4 operator>(V4 a, V4 b) { M4 r; MARS_SIMD4_MASK(a.v[l] > b.v[l]); return r; }
inline M4 operator>=(V4 a, V4 b) { M4 r; MARS_SIMD4_MASK(a.v[l] >= b.v[l]); return r; }
inline M4 operator<(V4 a, V4 b) { M4 r; MARS_SIMD4_MASK(a.v[l] < b.v[l]); return r; }
inline M4 operator|(M4 a, M4 b) { M4 r; MARS_SIMD4_MASK(a.m[l] || b.m[l]); return r; }
inline M4 operator&(M4 a, M4 b) { M4 r; MARS_SIMD4_MASK(a.m[l] && b.m[l]); return r; }
inline M4 operator~(M4 a) { M4 r; MARS_SIMD4_MASK(!a.m[l]); return r; }
inline V4 select(M4 mask, V4 a, V4 b) { V4 r; MARS_SIMD4_LANES(mask.m[l] ? a.v[l] : b.v[l]); return r; }
inline bool all(M4 mask) { return mask.m[0] && mask.m[1] && mask.m[2] && mask.m[3]; }
inline bool any(M4 mask) { return mask.m[0] || mask.m[1] || mask.m[2] || mask.m[3]; }

#undef MARS_SIMD4_LANES
#undef MARS_SIMD4_MASK

#endif

}  // namespace simd4
}  // namespace mars
