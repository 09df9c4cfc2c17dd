// Top-k concentration per layer on the GPU (mars/topk.hpp semantics), one thread block per
// layer: the layer's values are sorted as order-preserving uint64 keys by a block bitonic sort
// (in shared memory up to kSharedKeys values, in scratch global memory above), then
//  * rule "ceil": the k largest values, descending;
//  * rule "quantile": numpy's linear quantile at q of the sorted values (same operations, no FMA
//    contraction: bit-identical to np.quantile), then a stable block compaction of the values
//    >= threshold in input order.
// The sorting network and the compaction do not depend on timing: results are deterministic.
#include <cstdint>

#include "cuda/common.cuh"

namespace mars {
namespace cuda {

namespace {

using detail::check;
using detail::kPadKey;

constexpr int kThreads = 256;
constexpr std::int64_t kSharedKeys = 4096;  // 32 KiB of keys in shared memory

struct DevTopK {
  const double* values;
  double* out;
  std::int64_t* count;  // quantile rule only
  std::uint64_t* keys;  // global key buffer (n > kSharedKeys), else null (shared memory)
  std::int64_t n, k;
  double q;
};

// numpy.quantile(sorted, q, method="linear") for ascending sorted keys (mars::topk::
// linear_quantile_sorted, operation for operation).
__device__ double linear_quantile(const std::uint64_t* keys, std::int64_t n, double q) {
  const double virtual_index = __dmul_rn(static_cast<double>(n - 1), q);
  if (virtual_index >= static_cast<double>(n - 1)) return detail::double_of_key(keys[n - 1]);
  if (virtual_index < 0.0) return detail::double_of_key(keys[0]);
  const double previous = floor(virtual_index);
  const auto i = static_cast<std::int64_t>(previous);
  const double gamma = __dsub_rn(virtual_index, previous);
  const double a = detail::double_of_key(keys[i]);
  const double b = detail::double_of_key(keys[i + 1]);
  const double diff = __dsub_rn(b, a);
  if (gamma >= 0.5) return __dsub_rn(b, __dmul_rn(diff, __dsub_rn(1.0, gamma)));
  return __dadd_rn(a, __dmul_rn(diff, gamma));
}

// Loads task t's keys (padded to a power of two) and sorts them; returns the key buffer.
__device__ std::uint64_t* load_and_sort(const DevTopK& t, std::uint64_t* shared_keys) {
  std::uint64_t* keys = t.keys != nullptr ? t.keys : shared_keys;
  const std::int64_t size = detail::next_pow2(t.n);
  for (std::int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    keys[i] = i < t.n ? detail::key_of_double(t.values[i]) : kPadKey;
  }
  __syncthreads();
  detail::block_bitonic_sort(keys, size);
  return keys;
}

__global__ void __launch_bounds__(kThreads) top_k_ceil_kernel(const DevTopK* tasks) {
  extern __shared__ std::uint64_t shared_keys[];
  const DevTopK t = tasks[blockIdx.x];
  const std::uint64_t* keys = load_and_sort(t, shared_keys);
  // Ascending keys, padding at the end: the r-th largest value is keys[n - 1 - r].
  for (std::int64_t r = threadIdx.x; r < t.k; r += blockDim.x) {
    t.out[r] = detail::double_of_key(keys[t.n - 1 - r]);
  }
}

__global__ void __launch_bounds__(kThreads) top_k_quantile_kernel(const DevTopK* tasks) {
  extern __shared__ std::uint64_t shared_keys[];
  __shared__ double threshold;
  __shared__ std::int64_t offsets[kThreads + 1];
  const DevTopK t = tasks[blockIdx.x];
  const std::uint64_t* keys = load_and_sort(t, shared_keys);
  if (threadIdx.x == 0) threshold = linear_quantile(keys, t.n, t.q);
  __syncthreads();
  const double thr = threshold;
  // Thread j owns the contiguous input range [lo, hi): count, scan, then write in order.
  const std::int64_t per = (t.n + blockDim.x - 1) / blockDim.x;
  const std::int64_t lo = per * threadIdx.x < t.n ? per * threadIdx.x : t.n;
  const std::int64_t hi = lo + per < t.n ? lo + per : t.n;
  std::int64_t kept = 0;
  for (std::int64_t i = lo; i < hi; ++i) kept += t.values[i] >= thr ? 1 : 0;
  offsets[threadIdx.x + 1] = kept;
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (unsigned j = 1; j <= blockDim.x; ++j) offsets[j] += offsets[j - 1];
    *t.count = offsets[blockDim.x];
  }
  __syncthreads();
  std::int64_t pos = offsets[threadIdx.x];
  for (std::int64_t i = lo; i < hi; ++i) {
    const double v = t.values[i];
    if (v >= thr) t.out[pos++] = v;
  }
}

// Uploads the tasks (and assigns global key buffers to large layers) and launches `kernel`.
void launch(std::vector<DevTopK>& dev, void (*kernel)(const DevTopK*), const char* name,
            int device, Stream stream_id) {
  if (dev.empty()) return;
  detail::DeviceGuard guard(device);
  const cudaStream_t stream = detail::as_stream(stream_id);
  std::size_t key_count = 0;
  std::int64_t shared_size = 1;
  std::vector<std::size_t> key_offset(dev.size(), SIZE_MAX);  // SIZE_MAX: shared memory
  for (std::size_t i = 0; i < dev.size(); ++i) {
    const std::int64_t size = detail::next_pow2(dev[i].n);
    if (size > kSharedKeys) {
      key_offset[i] = key_count;
      key_count += static_cast<std::size_t>(size);
    } else {
      shared_size = size > shared_size ? size : shared_size;
    }
  }
  const std::size_t keys_bytes = detail::align_up(key_count * sizeof(std::uint64_t));
  detail::Scratch scratch(keys_bytes + dev.size() * sizeof(DevTopK), stream);
  for (std::size_t i = 0; i < dev.size(); ++i) {
    dev[i].keys = key_offset[i] == SIZE_MAX ? nullptr : scratch.as<std::uint64_t>() + key_offset[i];
  }
  detail::upload(dev, scratch, keys_bytes, stream, "upload of top-k tasks");
  const std::size_t smem = static_cast<std::size_t>(shared_size) * sizeof(std::uint64_t);
  kernel<<<static_cast<unsigned>(dev.size()), kThreads, smem, stream>>>(
      scratch.as<DevTopK>(keys_bytes));
  detail::check_launch(name);
}

void validate_layer(const double* values, std::int64_t n, const void* out, std::size_t i) {
  const std::string name = "values[" + std::to_string(i) + "]";
  if (n < 1) throw std::invalid_argument(name + " must not be empty (n = " + std::to_string(n) + ")");
  detail::require_pointer(values, n, name);
  detail::require_pointer(out, n, "out of " + name);
}

}  // namespace

void top_k_ceil(const std::vector<TopKTask>& tasks, int device, Stream stream) {
  std::vector<DevTopK> dev;
  dev.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const TopKTask& t = tasks[i];
    validate_layer(t.values, t.n, t.out, i);
    if (t.k < 1 || t.k > t.n) {
      throw std::invalid_argument("k must be in [1, n] for values[" + std::to_string(i) +
                                  "], got k = " + std::to_string(t.k) + ", n = " + std::to_string(t.n));
    }
    dev.push_back(DevTopK{t.values, t.out, nullptr, nullptr, t.n, t.k, 0.0});
  }
  if (dev.size() > 0x7FFFFFFF) throw std::invalid_argument("too many top-k tasks");
  launch(dev, top_k_ceil_kernel, "top_k_ceil_kernel", device, stream);
}

void top_k_quantile(const std::vector<TopKQuantileTask>& tasks, int device, Stream stream) {
  std::vector<DevTopK> dev;
  dev.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const TopKQuantileTask& t = tasks[i];
    validate_layer(t.values, t.n, t.out, i);
    if (!(t.q >= 0.0 && t.q <= 1.0)) {
      throw std::invalid_argument("q must be in [0, 1], got " + std::to_string(t.q));
    }
    detail::require_pointer(t.count, 1, "count of values[" + std::to_string(i) + "]");
    dev.push_back(DevTopK{t.values, t.out, t.count, nullptr, t.n, 0, t.q});
  }
  if (dev.size() > 0x7FFFFFFF) throw std::invalid_argument("too many top-k tasks");
  launch(dev, top_k_quantile_kernel, "top_k_quantile_kernel", device, stream);
}

}  // namespace cuda
}  // namespace mars
