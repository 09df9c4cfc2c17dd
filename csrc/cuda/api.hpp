// Host-callable launchers of the CUDA backend, on raw device pointers and a CUDA stream.
//
// This header is plain C++17 (no CUDA headers): the pybind11 bindings include it and are compiled
// by the host compiler. Every launcher
//   * validates its arguments and throws std::invalid_argument (ValueError in Python) naming the
//     argument and the sizes involved;
//   * throws std::runtime_error with the CUDA error string when the runtime fails (no driver, no
//     device, out of memory, a pointer that is not device memory of `device`...);
//   * makes `device` current for the duration of the call and restores the previous device;
//   * enqueues its work on `stream` (a cudaStream_t value; 0 = the legacy default stream) and
//     returns without synchronising; temporary device memory is stream-ordered (allocated from
//     the backend's memory pool and freed on the same stream). Kernel faults surface at the next
//     synchronisation, as for any CUDA library.
// Results are deterministic: no floating-point atomics, fixed summation orders, so repeated runs
// on the same GPU model give bit-identical results.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mars {
namespace cuda {

enum class DType : int { f32 = 0, f64 = 1 };

// cudaStream_t as an integer (0: legacy default stream, 1: cudaStreamLegacy, 2: per-thread).
using Stream = std::uintptr_t;

// ---------------------------------------------------------------- runtime queries (never throw)

// Number of CUDA devices; 0 when there is no driver or no device.
int device_count() noexcept;
// Why device_count() is 0 ("" when it is not): the CUDA error string.
std::string device_count_error();
// CUDA runtime version this library was built against (e.g. 13000).
int runtime_version() noexcept;
// Installed driver's CUDA version (0 without a driver).
int driver_version() noexcept;
// The CMAKE_CUDA_ARCHITECTURES this library was compiled for, e.g. "75-virtual;80-real;90-real".
const char* compiled_architectures() noexcept;
// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"; throws std::runtime_error for a bad ordinal.
std::string device_description(int device);

// Device ordinal owning `ptr` (device or managed memory). Throws std::invalid_argument for host
// memory / unknown pointers and std::runtime_error when no device is usable.
int pointer_device(std::uintptr_t ptr);

// Throws std::runtime_error("...no CUDA device...") unless 0 <= device < device_count().
void require_device(int device);

// Scratch memory comes from the backend's own memory pool per device, which keeps what it has
// reserved between calls (the largest scratch of a call so far: e.g. the Gram matrices of a CBE
// batch, 8 * n * n bytes per channel with an n x n Gram). trim_memory() releases the unused part
// to the driver. Never throws.
void trim_memory() noexcept;

// ---------------------------------------------------------------- kernels

// Per-channel largest singular value (see mars/spectral.hpp for the math and conventions):
// result[k] = sigma_max(W_k) * scale[k] where W_k is the (rows x cols) row-major block at
// weight + k * rows * cols. One task per weight tensor; every task of a call runs in the same
// launches (tasks may mix float32 and float64 weights). The smaller side of every channel matrix
// must be <= kMaxGramSide.
constexpr std::int64_t kMaxGramSide = 256;
struct SpectralTask {
  const void* weight = nullptr;  // (out, rows, cols), C-contiguous, `dtype`
  DType dtype = DType::f32;
  std::int64_t out = 0, rows = 0, cols = 0;
  const double* scale = nullptr;  // (out,) or null (scale 1)
  double* result = nullptr;       // (out,)
};
void channel_spectral_norms(const std::vector<SpectralTask>& tasks, int device, Stream stream);

// Top-k per layer, rule "ceil": out = the k largest of values[0..n), sorted descending.
struct TopKTask {
  const double* values = nullptr;  // (n,)
  std::int64_t n = 0;
  std::int64_t k = 0;   // 1 <= k <= n (mars::topk::ceil_count)
  double* out = nullptr;  // (k,)
};
void top_k_ceil(const std::vector<TopKTask>& tasks, int device, Stream stream);

// Top-k per layer, rule "quantile": every value >= numpy's linear quantile at q, in input order,
// written to out[0..count) (out has room for n values); *count (a device int64) receives count.
// The threshold is computed operation for operation like numpy (bit-identical).
struct TopKQuantileTask {
  const double* values = nullptr;  // (n,)
  std::int64_t n = 0;
  double q = 0.95;  // 1 - kappa
  double* out = nullptr;          // (n,) capacity
  std::int64_t* count = nullptr;  // device scalar
};
void top_k_quantile(const std::vector<TopKQuantileTask>& tasks, int device, Stream stream);

// Sorts every row of the (n x d) row-major matrix x into out (float64, n x d), ascending.
void sort_rows(const void* x, DType dtype, std::int64_t n, std::int64_t d, double* out,
               int device, Stream stream);

// out (n x n, float64) = W_p between the rows of x (n x d), seen as empirical distributions:
// W_p(a, b) = mean(|sort(a) - sort(b)|^p)^(1/p), summed left to right in float64 (the CPU
// kernel's order). rows_sorted: x's rows are already ascending (skips the sort).
void pairwise_wasserstein(const void* x, DType dtype, std::int64_t n, std::int64_t d, double p,
                          bool rows_sorted, double* out, int device, Stream stream);

// K-WMeans assignment step (mars/kwmeans.hpp, paper mode): labels[i] = the center c of smallest
// cost W_p^p(x_i, centers_c) = mean(|x_i - c|^p) over sorted rows (the first center on ties),
// costs[i] = that W_p^p. Rows of x (n x d) and of centers (k x d) are sorted first unless
// sorted == true (then both must already be ascending: quantile functions).
void kwmeans_assign(const void* x, DType x_dtype, std::int64_t n, std::int64_t d,
                    const void* centers, DType c_dtype, std::int64_t k, double p, bool sorted,
                    std::int64_t* labels, double* costs, int device, Stream stream);

// Weighted mean of n_buffers equally long buffers, fp64 accumulation over the buffers in their
// given order, per element (mars/aggregate.hpp semantics; zero weights skip their buffer):
//   out[j] = sum_i w_i x_i[j] / sum_i w_i, or base[j] + server_lr * (mean[j] - base[j]).
// weights are host values (finite, >= 0, positive sum); buffers/base/out are device pointers.
void weighted_mean(const std::vector<const void*>& buffers, DType dtype, std::int64_t n_elems,
                   const std::vector<double>& weights, const void* base, double server_lr,
                   void* out, DType out_dtype, int device, Stream stream);

}  // namespace cuda
}  // namespace mars
