// 1-D Wasserstein distances between equal-length rows on the GPU (mars/wasserstein.hpp
// semantics) and the K-WMeans assignment step.
//
//  * sort_rows: one block per row, a bitonic sort of order-preserving uint64 keys (shared memory
//    up to kSharedKeys values per row, scratch global memory above), written back as float64.
//  * pairwise: one 16 x 16 thread block per tile of row pairs (upper-triangle tiles only); the
//    two tiles' rows are staged in shared memory in chunks of kChunk columns and every thread
//    sums |a_k - b_k|^p over k = 0, 1, ..., d-1 left to right, like the CPU kernel: for p = 1
//    and p = 2 the distances equal the CPU's bit for bit (no FMA contraction), and D is
//    symmetric bit for bit with a zero diagonal.
//  * kwmeans_assign: one thread per row, centers in order, cost W_p^p = (serial sum of
//    |x_t - c_t|^p) / d without FMA, first minimum wins: the CPU K-WMeans assignment
//    (mars/kwmeans.hpp, predict_paper) bit for bit for p = 1 and p = 2.
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"

namespace mars {
namespace cuda {

namespace {

using detail::check;

constexpr int kSortThreads = 256;
constexpr std::int64_t kSharedKeys = 4096;
constexpr std::size_t kMaxSortScratch = std::size_t(256) << 20;  // global keys per launch
constexpr int kTile = 16;
constexpr int kChunk = 32;

template <typename T>
__global__ void __launch_bounds__(kSortThreads)
    sort_rows_kernel(const T* x, std::int64_t d, std::int64_t row0, double* out,
                     std::uint64_t* global_keys) {
  extern __shared__ std::uint64_t shared_keys[];
  const std::int64_t size = detail::next_pow2(d);
  std::uint64_t* keys = global_keys != nullptr ? global_keys + blockIdx.x * size : shared_keys;
  const std::int64_t row = row0 + blockIdx.x;
  const T* src = x + row * d;
  for (std::int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    keys[i] = i < d ? detail::key_of_double(static_cast<double>(src[i])) : detail::kPadKey;
  }
  __syncthreads();
  detail::block_bitonic_sort(keys, size);
  double* dst = out + row * d;
  for (std::int64_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = detail::double_of_key(keys[i]);
}

template <typename T>
void launch_sort(const T* x, std::int64_t n, std::int64_t d, double* out, cudaStream_t stream) {
  const std::int64_t size = detail::next_pow2(d);
  if (size <= kSharedKeys) {
    const std::size_t smem = static_cast<std::size_t>(size) * sizeof(std::uint64_t);
    for (std::int64_t row0 = 0; row0 < n; row0 += 0x7FFFFFFF) {
      const std::int64_t rows = n - row0 < 0x7FFFFFFF ? n - row0 : 0x7FFFFFFF;
      sort_rows_kernel<T><<<static_cast<unsigned>(rows), kSortThreads, smem, stream>>>(
          x, d, row0, out, nullptr);
      detail::check_launch("sort_rows_kernel");
    }
    return;
  }
  // Long rows: keys in global scratch memory, at most kMaxSortScratch bytes per launch.
  const std::size_t row_bytes = static_cast<std::size_t>(size) * sizeof(std::uint64_t);
  std::int64_t batch = static_cast<std::int64_t>(kMaxSortScratch / row_bytes);
  batch = batch < 1 ? 1 : (batch > n ? n : batch);
  detail::Scratch scratch(static_cast<std::size_t>(batch) * row_bytes, stream);
  for (std::int64_t row0 = 0; row0 < n; row0 += batch) {
    const std::int64_t rows = n - row0 < batch ? n - row0 : batch;
    sort_rows_kernel<T><<<static_cast<unsigned>(rows), kSortThreads, 0, stream>>>(
        x, d, row0, out, scratch.as<std::uint64_t>());
    detail::check_launch("sort_rows_kernel");
  }
}

void sort_any(const void* x, DType dtype, std::int64_t n, std::int64_t d, double* out,
              cudaStream_t stream) {
  if (n == 0 || d == 0) return;
  if (dtype == DType::f64) {
    launch_sort(static_cast<const double*>(x), n, d, out, stream);
  } else {
    launch_sort(static_cast<const float*>(x), n, d, out, stream);
  }
}

__global__ void __launch_bounds__(kTile * kTile)
    pairwise_kernel(const double* sorted, std::int64_t n, std::int64_t d, double p, double* out) {
  const std::int64_t bi = blockIdx.y, bj = blockIdx.x;
  if (bj < bi) return;  // lower-triangle tiles are the transposes of upper ones
  __shared__ double a_tile[kTile][kChunk + 1];
  __shared__ double b_tile[kTile][kChunk + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTile + tx;
  const std::int64_t i = bi * kTile + ty;
  const std::int64_t j = bj * kTile + tx;
  double sum = 0.0;
  for (std::int64_t k0 = 0; k0 < d; k0 += kChunk) {
    for (int e = tid; e < kTile * kChunk; e += kTile * kTile) {
      const int r = e / kChunk, c = e % kChunk;
      const std::int64_t col = k0 + c;
      const std::int64_t ra = bi * kTile + r, rb = bj * kTile + r;
      a_tile[r][c] = (ra < n && col < d) ? sorted[ra * d + col] : 0.0;
      b_tile[r][c] = (rb < n && col < d) ? sorted[rb * d + col] : 0.0;
    }
    __syncthreads();
    const int len = d - k0 < kChunk ? static_cast<int>(d - k0) : kChunk;
    for (int c = 0; c < len; ++c) {
      sum = __dadd_rn(sum, detail::abs_pow(__dsub_rn(a_tile[ty][c], b_tile[tx][c]), p));
    }
    __syncthreads();
  }
  if (i >= n || j >= n) return;
  if (i == j) {
    out[i * n + i] = 0.0;
  } else if (i < j) {
    const double w = detail::root_p(sum / static_cast<double>(d), p);
    out[i * n + j] = w;
    out[j * n + i] = w;
  }
}

__global__ void kwmeans_assign_kernel(const double* x, std::int64_t n, std::int64_t d,
                                      const double* centers, std::int64_t k, double p,
                                      std::int64_t* labels, double* costs) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double* row = x + i * d;
  double best = 0.0;
  std::int64_t label = 0;
  for (std::int64_t c = 0; c < k; ++c) {
    const double* center = centers + c * d;
    double sum = 0.0;
    for (std::int64_t t = 0; t < d; ++t) sum = __dadd_rn(sum, detail::abs_pow(__dsub_rn(row[t], center[t]), p));
    const double w = sum / static_cast<double>(d);
    if (c == 0 || w < best) {
      best = w;
      label = c;
    }
  }
  labels[i] = label;
  costs[i] = best;
}

void validate_matrix(const void* x, DType dtype, std::int64_t n, std::int64_t d, const char* name,
                     std::int64_t min_rows) {
  if (dtype != DType::f32 && dtype != DType::f64) {
    throw std::invalid_argument(std::string(name) + " must be float32 or float64");
  }
  if (n < min_rows || d < 1) {
    throw std::invalid_argument(std::string(name) + " must have shape (n, d) with n >= " +
                                std::to_string(min_rows) + " and d >= 1, got " + detail::dims(n, d));
  }
  detail::require_pointer(x, n * d, name);
}

void validate_p(double p) {
  if (!(p >= 1.0) || !std::isfinite(p)) {
    throw std::invalid_argument("p must be a finite real number >= 1, got " + std::to_string(p));
  }
}

}  // namespace

void sort_rows(const void* x, DType dtype, std::int64_t n, std::int64_t d, double* out, int device,
               Stream stream_id) {
  if (dtype != DType::f32 && dtype != DType::f64) {
    throw std::invalid_argument("x must be float32 or float64");
  }
  if (n < 0 || d < 0) throw std::invalid_argument("x has a negative dimension " + detail::dims(n, d));
  detail::require_pointer(x, n * d, "x");
  detail::require_pointer(out, n * d, "out");
  if (n * d == 0) return;
  detail::DeviceGuard guard(device);
  sort_any(x, dtype, n, d, out, detail::as_stream(stream_id));
}

void pairwise_wasserstein(const void* x, DType dtype, std::int64_t n, std::int64_t d, double p,
                          bool rows_sorted, double* out, int device, Stream stream_id) {
  validate_matrix(x, dtype, n, d, "X", 1);
  validate_p(p);
  detail::require_pointer(out, n * n, "out");
  const std::int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles > 65535) {
    throw std::invalid_argument("X has " + std::to_string(n) + " rows; the CUDA pairwise kernel "
                                "supports at most " + std::to_string(65535 * kTile));
  }
  detail::DeviceGuard guard(device);
  const cudaStream_t stream = detail::as_stream(stream_id);
  const double* sorted = static_cast<const double*>(x);
  detail::Scratch scratch(rows_sorted && dtype == DType::f64 ? 0 : n * d * sizeof(double), stream);
  if (!(rows_sorted && dtype == DType::f64)) {
    sort_any(x, dtype, n, d, scratch.as<double>(), stream);
    sorted = scratch.as<double>();
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  pairwise_kernel<<<grid, dim3(kTile, kTile), 0, stream>>>(sorted, n, d, p, out);
  detail::check_launch("pairwise_kernel");
}

void kwmeans_assign(const void* x, DType x_dtype, std::int64_t n, std::int64_t d,
                    const void* centers, DType c_dtype, std::int64_t k, double p, bool sorted,
                    std::int64_t* labels, double* costs, int device, Stream stream_id) {
  validate_matrix(x, x_dtype, n, d, "X", 1);
  validate_matrix(centers, c_dtype, k, d, "centers", 1);
  validate_p(p);
  detail::require_pointer(labels, n, "labels");
  detail::require_pointer(costs, n, "costs");
  detail::DeviceGuard guard(device);
  const cudaStream_t stream = detail::as_stream(stream_id);
  const bool x_direct = sorted && x_dtype == DType::f64;
  const bool c_direct = sorted && c_dtype == DType::f64;
  const std::size_t x_bytes = x_direct ? 0 : detail::align_up(n * d * sizeof(double));
  const std::size_t c_bytes = c_direct ? 0 : k * d * sizeof(double);
  detail::Scratch scratch(x_bytes + c_bytes, stream);
  const double* xs = static_cast<const double*>(x);
  const double* cs = static_cast<const double*>(centers);
  if (!x_direct) {
    sort_any(x, x_dtype, n, d, scratch.as<double>(), stream);
    xs = scratch.as<double>();
  }
  if (!c_direct) {
    sort_any(centers, c_dtype, k, d, scratch.as<double>(x_bytes), stream);
    cs = scratch.as<double>(x_bytes);
  }
  kwmeans_assign_kernel<<<detail::grid_1d(n, 128), 128, 0, stream>>>(xs, n, d, cs, k, p, labels,
                                                                      costs);
  detail::check_launch("kwmeans_assign_kernel");
}

}  // namespace cuda
}  // namespace mars
