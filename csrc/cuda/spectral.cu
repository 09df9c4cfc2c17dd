// Per-channel spectral norms on the GPU: batched small fp64 Gram matrices + top eigenvalue.
//
// Same math as csrc/mars/spectral.cpp: for channel k, M_k is the (rows x cols) block of the
// weight; G = Gram of the smaller side in fp64 (M^T M if cols <= rows, else M M^T), lambda = the
// top eigenvalue of G by mars::symeig::max_eigenvalue_tridiagonal (Householder + Laguerre in a
// __host__ __device__ header: the scalar twin, operation for operation, of the CPU kernel's
// 4-lane solver in mars/topeig.hpp), sigma = sqrt(max(lambda, 0)) / s, times scale[k]. float64 channels whose
// largest magnitude would overflow/underflow the squares are rescaled by the same power of two
// s as on the CPU (float64 weights are read twice for that; float32 never needs it).
//
// Phase 1 (memory bound): the Grams, one warp or a group of lanes per channel. Three paths,
// chosen per weight tensor:
//  * n == 1 (1x1 convs, Linear rows): a warp per channel, sum of squares, lane-strided + a
//    shuffle tree;
//  * cols == 9 <= rows (3x3 convs, the bulk of CNN weights): 8 lanes per channel, each reading
//    whole rows and keeping the 45 upper-triangle sums in registers, then a shuffle tree;
//  * otherwise: a warp per channel; chunks of the long side staged in shared memory as fp64,
//    each lane owning a fixed set of Gram entries.
// Phase 2: one thread per channel runs Householder + Laguerre on its Gram, copied to a private
// slice of shared memory (cyclic Jacobi in place in global memory for Grams too large for that).
// Every sum has a fixed order (per-lane sequential sums, then a fixed shuffle tree), so results
// are bit-identical from run to run; they agree with the CPU kernel to ~1e-13 relative (the
// summation order differs; the eigen solvers agree to a few ulps).
#include <math_constants.h>

#include <cmath>

#include "cuda/common.cuh"
#include "mars/symeig.hpp"

namespace mars {
namespace cuda {

namespace {

using detail::check;
using detail::find_task;

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarpsPerBlock = 4;
constexpr int kStageDoubles = 1024;  // shared staging per warp (generic path), 8 KiB

struct DevTask {
  const void* weight;
  const double* scale;
  double* result;
  double* gram;        // n*n doubles per channel (n >= 2), else null
  double* chan_scale;  // s per channel (n >= 2), else null
  std::int64_t rows, cols;
  int n;          // min(rows, cols)
  int by_columns; // cols <= rows: G = M^T M (n = cols); else G = M M^T (n = rows)
  int f64;
};

struct Table {
  const DevTask* tasks;
  const std::int64_t* begin;  // first channel of each task in this launch's numbering
  int n_tasks;
  std::int64_t n_items;
};

// ---------------------------------------------------------------- warp helpers

__device__ __forceinline__ double warp_sum_to_lane0(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// The CPU's channel_scale for a float64 channel, computed by the `Width` lanes (a power of two
// <= 32, aligned within the warp) that own the channel; every lane of the group gets the same
// value: NaN if any value is NaN/Inf, 1 unless the largest magnitude is outside
// (2^-400, 2^400), else the power of two that brings it near 1. float32 channels always use 1.
// All 32 lanes of the warp must call it (xor shuffles over the full mask; a group with nothing
// to do passes count = 0).
template <int Width, typename T>
__device__ double channel_scale(const T* x, std::int64_t count, int sub) {
  if (sizeof(T) == 4) return 1.0;
  double max_abs = 0.0;
  int finite = 1;
  for (std::int64_t i = sub; i < count; i += Width) {
    const double a = fabs(static_cast<double>(__ldg(x + i)));
    finite &= isfinite(a) ? 1 : 0;
    max_abs = a > max_abs ? a : max_abs;
  }
  for (int offset = Width / 2; offset > 0; offset >>= 1) {
    max_abs = fmax(max_abs, __shfl_xor_sync(kFullMask, max_abs, offset));
    finite &= __shfl_xor_sync(kFullMask, finite, offset);
  }
  if (!finite) return CUDART_NAN;
  if (max_abs == 0.0) return 1.0;
  if (max_abs > 0x1p-400 && max_abs < 0x1p400) return 1.0;
  return ldexp(1.0, -ilogb(max_abs));
}

__device__ __forceinline__ double finish(double sigma, const DevTask& t, std::int64_t k) {
  return t.scale != nullptr ? sigma * t.scale[k] : sigma;
}

// ---------------------------------------------------------------- phase 1: n == 1

template <typename T>
__device__ void sum_squares_channel(const DevTask& t, std::int64_t k, int lane) {
  const std::int64_t count = t.rows * t.cols;
  const T* x = static_cast<const T*>(t.weight) + k * count;
  const double s = channel_scale<32>(x, count, lane);
  double sigma;
  if (isnan(s)) {
    sigma = s;
  } else {
    // 4 independent accumulators per lane, combined in a fixed order.
    double acc0 = 0.0, acc1 = 0.0, acc2 = 0.0, acc3 = 0.0;
    std::int64_t i = lane;
    for (; i + 96 < count; i += 128) {
      const double v0 = static_cast<double>(__ldg(x + i)) * s;
      const double v1 = static_cast<double>(__ldg(x + i + 32)) * s;
      const double v2 = static_cast<double>(__ldg(x + i + 64)) * s;
      const double v3 = static_cast<double>(__ldg(x + i + 96)) * s;
      acc0 = fma(v0, v0, acc0);
      acc1 = fma(v1, v1, acc1);
      acc2 = fma(v2, v2, acc2);
      acc3 = fma(v3, v3, acc3);
    }
    for (; i < count; i += 32) {
      const double v = static_cast<double>(__ldg(x + i)) * s;
      acc0 = fma(v, v, acc0);
    }
    const double lambda = warp_sum_to_lane0((acc0 + acc1) + (acc2 + acc3));
    sigma = isfinite(lambda) ? sqrt(lambda) / s : CUDART_NAN;
  }
  if (lane == 0) t.result[k] = finish(sigma, t, k);
}

__global__ void sum_squares_kernel(Table table) {
  const int lane = threadIdx.x & 31;
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= table.n_items) return;
  const int ti = find_task(table.begin, table.n_tasks, item);
  const DevTask t = table.tasks[ti];
  const std::int64_t k = item - table.begin[ti];
  if (t.f64) {
    sum_squares_channel<double>(t, k, lane);
  } else {
    sum_squares_channel<float>(t, k, lane);
  }
}

// ---------------------------------------------------------------- phase 1: 3x3 kernels

// A channel group of kGroup lanes per channel (kGroupsPerWarp channels per warp): each lane reads
// whole rows r = sub, sub + kGroup, ... and keeps the 45 upper-triangle sums of the 9x9 Gram in
// registers; then a 3-step shuffle tree per entry (one shuffle instruction serves all the
// channels of the warp, so the reduction costs ~45 * 3 / 4 shuffles per channel instead of
// 45 * 5 for a warp per channel). One dtype per launch (T), so all lanes take the same path.
constexpr int kC9 = 9;
constexpr int kE9 = kC9 * (kC9 + 1) / 2;  // 45 upper-triangle entries
constexpr int kGroup = 8;
constexpr int kGroupsPerWarp = 32 / kGroup;

__device__ __forceinline__ double group_sum_to_sub0(double v) {
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;  // complete in the group's first lane (sub == 0)
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gram9_kernel(Table table) {
  const int lane = threadIdx.x & 31;
  const int sub = lane % kGroup;
  const std::int64_t warp = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp * kGroupsPerWarp >= table.n_items) return;  // the whole warp has no channel
  const std::int64_t item = warp * kGroupsPerWarp + lane / kGroup;
  const bool active = item < table.n_items;
  DevTask t{};
  std::int64_t k = 0, rows = 0;
  const T* x = nullptr;
  if (active) {
    const int ti = find_task(table.begin, table.n_tasks, item);
    t = table.tasks[ti];
    k = item - table.begin[ti];
    rows = t.rows;
    x = static_cast<const T*>(t.weight) + k * rows * kC9;
  }
  const double s = channel_scale<kGroup>(x, rows * kC9, sub);
  double acc[kE9];
#pragma unroll
  for (int e = 0; e < kE9; ++e) acc[e] = 0.0;
  if (!isnan(s)) {
    for (std::int64_t r = sub; r < rows; r += kGroup) {
      double v[kC9];
#pragma unroll
      for (int j = 0; j < kC9; ++j) v[j] = static_cast<double>(__ldg(x + r * kC9 + j)) * s;
      int e = 0;
#pragma unroll
      for (int i = 0; i < kC9; ++i) {
#pragma unroll
        for (int j = i; j < kC9; ++j) {
          acc[e] = fma(v[i], v[j], acc[e]);
          ++e;
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kE9; ++e) acc[e] = group_sum_to_sub0(acc[e]);
  if (active && sub == 0) {
    double* g = t.gram + k * (kC9 * kC9);
    int e = 0;
#pragma unroll
    for (int i = 0; i < kC9; ++i) {
#pragma unroll
      for (int j = i; j < kC9; ++j) {
        g[i * kC9 + j] = acc[e];
        g[j * kC9 + i] = acc[e];
        ++e;
      }
    }
    t.chan_scale[k] = s;
  }
}

// ---------------------------------------------------------------- phase 1: any n

// Entry (i, j), i <= j, of the upper triangle of an n x n matrix, enumerated row by row;
// advance() moves `step` entries forward.
struct TriangleCursor {
  int i, j, n;
  __device__ TriangleCursor(int start, int n_) : i(0), j(start), n(n_) { carry(); }
  __device__ void carry() {
    while (i < n && j >= n) {
      const int over = j - n;
      ++i;
      j = i + over;
    }
  }
  __device__ void advance(int step) {
    j += step;
    carry();
  }
  __device__ bool valid() const { return i < n; }
};

template <typename T>
__device__ void gram_generic_channel(const DevTask& t, std::int64_t k, int lane, double* buf) {
  const std::int64_t rows = t.rows, cols = t.cols;
  const int n = t.n;
  const std::int64_t count = rows * cols;
  const T* x = static_cast<const T*>(t.weight) + k * count;
  double* g = t.gram + k * static_cast<std::int64_t>(n) * n;
  const double s = channel_scale<32>(x, count, lane);
  if (isnan(s)) {  // NaN/Inf in the channel: the result is NaN, the Gram is not needed
    if (lane == 0) t.chan_scale[k] = s;
    return;
  }
  const std::int64_t long_len = t.by_columns ? rows : cols;  // the summed-over side (>= n)
  const int chunk = kStageDoubles / n;
  bool first = true;
  for (std::int64_t l0 = 0; l0 < long_len; l0 += chunk) {
    const int len = static_cast<int>(long_len - l0 < chunk ? long_len - l0 : chunk);
    // Stage buf[l * n + i] = s * X(l0 + l, i) where X(l, i) = M[l][i] (by columns) or M[i][l].
    if (t.by_columns) {
      const T* src = x + l0 * cols;  // rows l0 .. l0+len are contiguous
      for (int e = lane; e < len * n; e += 32) buf[e] = static_cast<double>(__ldg(src + e)) * s;
    } else {
      for (int e = lane; e < len * n; e += 32) {
        const int i = e / len, l = e - i * len;
        buf[l * n + i] = static_cast<double>(__ldg(x + i * cols + l0 + l)) * s;
      }
    }
    __syncwarp();
    for (TriangleCursor c(lane, n); c.valid(); c.advance(32)) {
      double acc = first ? 0.0 : g[c.i * n + c.j];
      for (int l = 0; l < len; ++l) acc = fma(buf[l * n + c.i], buf[l * n + c.j], acc);
      g[c.i * n + c.j] = acc;
    }
    first = false;
    __syncwarp();
  }
  for (TriangleCursor c(lane, n); c.valid(); c.advance(32)) g[c.j * n + c.i] = g[c.i * n + c.j];
  if (lane == 0) t.chan_scale[k] = s;
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) gram_generic_kernel(Table table) {
  __shared__ double stage[kWarpsPerBlock][kStageDoubles];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (item >= table.n_items) return;
  const int ti = find_task(table.begin, table.n_tasks, item);
  const DevTask t = table.tasks[ti];
  const std::int64_t k = item - table.begin[ti];
  if (t.f64) {
    gram_generic_channel<double>(t, k, lane, stage[warp]);
  } else {
    gram_generic_channel<float>(t, k, lane, stage[warp]);
  }
}

// ---------------------------------------------------------------- phase 2: eigenvalues

// One thread per channel; its Gram is copied into a private slice of dynamic shared memory of
// `slot` doubles (>= n * n + tridiagonal_workspace(n) for every task of the launch; odd, so the
// slices of a half-warp start in distinct banks) and solved there by Householder + Laguerre.
__global__ void eigen_shared_kernel(Table table, int slot) {
  extern __shared__ double smem[];
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= table.n_items) return;
  const int ti = find_task(table.begin, table.n_tasks, item);
  const DevTask& t = table.tasks[ti];
  const std::int64_t k = item - table.begin[ti];
  const int n = t.n;
  const double s = t.chan_scale[k];
  double sigma = s;  // NaN: the channel holds NaN/Inf
  if (!isnan(s)) {
    double* a = smem + static_cast<std::int64_t>(threadIdx.x) * slot;
    const double* g = t.gram + k * static_cast<std::int64_t>(n) * n;
    for (int e = 0; e < n * n; ++e) a[e] = g[e];
    sigma = symeig::sigma_from_lambda(symeig::max_eigenvalue_tridiagonal(a, n, a + n * n)) / s;
  }
  t.result[k] = finish(sigma, t, k);
}

// Same, by cyclic Jacobi in place in the global workspace (Grams too large for shared memory:
// Jacobi needs no workspace beyond the matrix).
__global__ void eigen_global_kernel(Table table) {
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= table.n_items) return;
  const int ti = find_task(table.begin, table.n_tasks, item);
  const DevTask& t = table.tasks[ti];
  const std::int64_t k = item - table.begin[ti];
  double* a = t.gram + k * static_cast<std::int64_t>(t.n) * t.n;
  const double s = t.chan_scale[k];
  const double sigma = isnan(s) ? s : symeig::sigma_from_lambda(symeig::max_eigenvalue(a, t.n)) / s;
  t.result[k] = finish(sigma, t, k);
}

// ---------------------------------------------------------------- host side

enum Path { kSumSquares = 0, kGram9F32 = 1, kGram9F64 = 2, kGeneric = 3, kEigen = 4, kPaths = 5 };

struct HostList {
  std::vector<DevTask> tasks;
  std::vector<std::int64_t> begin;
  std::vector<std::int64_t> outs;
  std::int64_t items = 0;
  int max_n = 0;
  std::size_t task_offset = 0, begin_offset = 0;  // in the scratch block
  void add(const DevTask& t, std::int64_t out) {
    tasks.push_back(t);
    begin.push_back(items);
    outs.push_back(out);
    items += out;
    max_n = t.n > max_n ? t.n : max_n;
  }
  Table table(const detail::Scratch& scratch) const {
    return Table{scratch.as<DevTask>(task_offset), scratch.as<std::int64_t>(begin_offset),
                 static_cast<int>(tasks.size()), items};
  }
};

std::string task_name(std::size_t i) { return "weights[" + std::to_string(i) + "]"; }

void validate(const SpectralTask& t, std::size_t i) {
  if (t.out < 0 || t.rows < 0 || t.cols < 0) {
    throw std::invalid_argument(task_name(i) + " has a negative dimension (out=" +
                                std::to_string(t.out) + ", rows=" + std::to_string(t.rows) +
                                ", cols=" + std::to_string(t.cols) + ")");
  }
  if (t.dtype != DType::f32 && t.dtype != DType::f64) {
    throw std::invalid_argument(task_name(i) + " must be float32 or float64");
  }
  const std::int64_t total = t.out * t.rows * t.cols;
  detail::require_pointer(t.weight, total, task_name(i));
  detail::require_pointer(t.result, t.out, "result of " + task_name(i));
  const std::int64_t n = t.rows < t.cols ? t.rows : t.cols;
  if (total > 0 && n > kMaxGramSide) {
    throw std::invalid_argument(
        task_name(i) + ": channel matrices of shape " + detail::dims(t.rows, t.cols) +
        " have a smaller side of " + std::to_string(n) + " > " + std::to_string(kMaxGramSide) +
        ", the largest Gram matrix the CUDA kernel solves; use the CPU kernel for this layer");
  }
}

}  // namespace

void channel_spectral_norms(const std::vector<SpectralTask>& tasks, int device, Stream stream_id) {
  for (std::size_t i = 0; i < tasks.size(); ++i) validate(tasks[i], i);
  if (tasks.empty()) return;
  detail::DeviceGuard guard(device);
  const cudaStream_t stream = detail::as_stream(stream_id);

  HostList lists[kPaths];
  std::size_t gram_doubles = 0, scale_doubles = 0;
  std::vector<const SpectralTask*> zero_fill;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const SpectralTask& s = tasks[i];
    if (s.out == 0) continue;
    if (s.rows * s.cols == 0) {
      zero_fill.push_back(&s);
      continue;
    }
    DevTask d{};
    d.weight = s.weight;
    d.scale = s.scale;
    d.result = s.result;
    d.rows = s.rows;
    d.cols = s.cols;
    d.by_columns = s.cols <= s.rows;
    d.n = static_cast<int>(d.by_columns ? s.cols : s.rows);
    d.f64 = s.dtype == DType::f64;
    if (d.n == 1) {
      lists[kSumSquares].add(d, s.out);
      continue;
    }
    // Gram and s workspaces are assigned below, once their total size is known.
    d.gram = reinterpret_cast<double*>(static_cast<std::uintptr_t>(gram_doubles));
    d.chan_scale = reinterpret_cast<double*>(static_cast<std::uintptr_t>(scale_doubles));
    gram_doubles += static_cast<std::size_t>(s.out) * d.n * d.n;
    scale_doubles += static_cast<std::size_t>(s.out);
    const bool gram9 = d.by_columns && d.n == kC9;
    lists[!gram9 ? kGeneric : d.f64 ? kGram9F64 : kGram9F32].add(d, s.out);
  }

  // One scratch block: Grams, per-channel s, then every list's task table and begin array.
  std::size_t bytes = 0;
  const std::size_t gram_offset = bytes;
  bytes += detail::align_up(gram_doubles * sizeof(double));
  const std::size_t scale_offset = bytes;
  bytes += detail::align_up(scale_doubles * sizeof(double));
  for (int q : {kGram9F32, kGram9F64, kGeneric}) {
    for (std::size_t j = 0; j < lists[q].tasks.size(); ++j) lists[kEigen].add(lists[q].tasks[j], lists[q].outs[j]);
  }
  for (int p = 0; p < kPaths; ++p) {
    lists[p].task_offset = bytes;
    bytes += detail::align_up(lists[p].tasks.size() * sizeof(DevTask));
    lists[p].begin_offset = bytes;
    bytes += detail::align_up(lists[p].begin.size() * sizeof(std::int64_t));
  }
  detail::Scratch scratch(bytes, stream);
  for (int p = 0; p < kPaths; ++p) {
    for (DevTask& d : lists[p].tasks) {
      if (d.n < 2) continue;
      d.gram = scratch.as<double>(gram_offset) + reinterpret_cast<std::uintptr_t>(d.gram);
      d.chan_scale = scratch.as<double>(scale_offset) + reinterpret_cast<std::uintptr_t>(d.chan_scale);
    }
    detail::upload(lists[p].tasks, scratch, lists[p].task_offset, stream, "upload of spectral tasks");
    detail::upload(lists[p].begin, scratch, lists[p].begin_offset, stream, "upload of spectral tasks");
  }

  for (const SpectralTask* s : zero_fill) {
    check(cudaMemsetAsync(s->result, 0, static_cast<std::size_t>(s->out) * sizeof(double), stream),
          "cudaMemsetAsync");
  }
  const int threads = kWarpsPerBlock * 32;
  if (lists[kSumSquares].items > 0) {
    sum_squares_kernel<<<detail::grid_1d(lists[kSumSquares].items, kWarpsPerBlock), threads, 0,
                         stream>>>(lists[kSumSquares].table(scratch));
    detail::check_launch("sum_squares_kernel");
  }
  const int channels_per_block = kWarpsPerBlock * kGroupsPerWarp;
  if (lists[kGram9F32].items > 0) {
    gram9_kernel<float><<<detail::grid_1d(lists[kGram9F32].items, channels_per_block), threads, 0,
                          stream>>>(lists[kGram9F32].table(scratch));
    detail::check_launch("gram9_kernel<float>");
  }
  if (lists[kGram9F64].items > 0) {
    gram9_kernel<double><<<detail::grid_1d(lists[kGram9F64].items, channels_per_block), threads, 0,
                           stream>>>(lists[kGram9F64].table(scratch));
    detail::check_launch("gram9_kernel<double>");
  }
  if (lists[kGeneric].items > 0) {
    gram_generic_kernel<<<detail::grid_1d(lists[kGeneric].items, kWarpsPerBlock), threads, 0,
                          stream>>>(lists[kGeneric].table(scratch));
    detail::check_launch("gram_generic_kernel");
  }
  const HostList& eig = lists[kEigen];
  if (eig.items > 0) {
    int optin = 0;
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
          "cudaDeviceGetAttribute");
    const int slot = (eig.max_n * eig.max_n + symeig::tridiagonal_workspace(eig.max_n)) | 1;
    int block = 0;
    for (int candidate : {64, 32}) {
      if (static_cast<long long>(candidate) * slot * static_cast<long long>(sizeof(double)) <= optin) {
        block = candidate;
        break;
      }
    }
    if (block > 0) {
      const int smem = block * slot * static_cast<int>(sizeof(double));
      check(cudaFuncSetAttribute(eigen_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 smem),
            "cudaFuncSetAttribute");
      eigen_shared_kernel<<<detail::grid_1d(eig.items, block), block, smem, stream>>>(
          eig.table(scratch), slot);
      detail::check_launch("eigen_shared_kernel");
    } else {
      eigen_global_kernel<<<detail::grid_1d(eig.items, 64), 64, 0, stream>>>(eig.table(scratch));
      detail::check_launch("eigen_global_kernel");
    }
  }
}

}  // namespace cuda
}  // namespace mars
