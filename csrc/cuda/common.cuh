// Shared helpers of the CUDA translation units: error handling, the current-device guard,
// stream-ordered scratch memory, and small device utilities (ordered keys of doubles, a block
// bitonic sort, task lookup). Internal: not part of api.hpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/api.hpp"

namespace mars {
namespace cuda {
namespace detail {

// std::runtime_error "<what>: <cuda error name>: <cuda error string>" for a failed runtime call.
[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("mars_native CUDA: ") + what + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda(err, what);
}

// Checks a kernel launch (configuration errors are reported immediately; faults surface later).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

// Makes `device` current for the lifetime of the guard; restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    require_device(device);
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// The backend's own stream-ordered memory pool of the current device (created on first use,
// keeps what it has reserved: no re-mapping on every call, and no change to the device's default
// pool that other libraries use), or nullptr when the device has no memory-pool support.
// Defined in runtime.cu; trim_memory() in api.hpp releases the unused reserve.
cudaMemPool_t scratch_pool();

// Stream-ordered device scratch memory: allocated from scratch_pool() on `stream`, freed with
// cudaFreeAsync on the same stream when the object goes out of scope (after the kernels that
// use it were enqueued, so the memory is reused only once they are done).
// Devices without memory pools fall back to cudaMalloc / (synchronise, cudaFree).
class Scratch {
 public:
  Scratch(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    cudaMemPool_t pool = scratch_pool();
    if (pool != nullptr) {
      check(cudaMallocFromPoolAsync(&ptr_, bytes, pool, stream), "allocation of scratch device memory");
    } else {
      pooled_ = false;
      check(cudaMalloc(&ptr_, bytes), "allocation of scratch device memory");
    }
  }
  ~Scratch() {
    if (ptr_ == nullptr) return;
    if (pooled_) {
      cudaFreeAsync(ptr_, stream_);
    } else {
      cudaStreamSynchronize(stream_);
      cudaFree(ptr_);
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as(std::size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool pooled_ = true;
};

// Bytes rounded up to a multiple of 256 (keeps every sub-buffer of a scratch block aligned).
inline std::size_t align_up(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

// Copies a host vector into scratch memory at byte_offset (stream-ordered; pageable source
// memory is staged by the runtime before this call returns, so `host` may be freed afterwards).
template <typename T>
void upload(const std::vector<T>& host, const Scratch& scratch, std::size_t byte_offset,
            cudaStream_t stream, const char* what) {
  if (host.empty()) return;
  check(cudaMemcpyAsync(scratch.as<char>(byte_offset), host.data(), host.size() * sizeof(T),
                        cudaMemcpyHostToDevice, stream),
        what);
}

// std::invalid_argument unless the pointer is non-null (for a non-empty buffer).
inline void require_pointer(const void* p, std::int64_t elements, const std::string& name) {
  if (elements > 0 && p == nullptr) {
    throw std::invalid_argument(name + " is a null device pointer for " +
                                std::to_string(elements) + " elements");
  }
}

inline std::string dims(std::int64_t a, std::int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

inline unsigned grid_1d(std::int64_t items, int per_block) {
  const std::int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// ---------------------------------------------------------------- device utilities

// Order-preserving map of a double onto uint64: a < b (IEEE total order: -NaN < -Inf < ... <
// -0 < +0 < ... < +Inf < +NaN) iff key(a) < key(b). Inverse: double_of_key.
__device__ __forceinline__ std::uint64_t key_of_double(double v) {
  const auto bits = static_cast<std::uint64_t>(__double_as_longlong(v));
  return (bits >> 63) ? ~bits : (bits | 0x8000000000000000ULL);
}
__device__ __forceinline__ double double_of_key(std::uint64_t key) {
  const std::uint64_t bits = (key >> 63) ? (key & 0x7FFFFFFFFFFFFFFFULL) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}
// Padding key: sorts after every value.
constexpr std::uint64_t kPadKey = ~0ULL;

// Smallest power of two >= n (n >= 1).
__host__ __device__ inline std::int64_t next_pow2(std::int64_t n) {
  std::int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Ascending bitonic sort of keys[0..size) (size a power of two) by the threads of one block;
// keys may live in shared or global memory (the block's __syncthreads orders both).
// Deterministic: the compare-exchange network does not depend on the data.
__device__ inline void block_bitonic_sort(std::uint64_t* keys, std::int64_t size) {
  for (std::int64_t k = 2; k <= size; k <<= 1) {
    for (std::int64_t j = k >> 1; j > 0; j >>= 1) {
      for (std::int64_t i = threadIdx.x; i < size; i += blockDim.x) {
        const std::int64_t partner = i ^ j;
        if (partner > i) {
          const std::uint64_t a = keys[i];
          const std::uint64_t b = keys[partner];
          const bool ascending = (i & k) == 0;
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Index t of the task whose half-open item range [begin[t], begin[t + 1]) contains `item`
// (begin ascending, begin[0] == 0, n_tasks >= 1): binary search over a device array.
__device__ inline int find_task(const std::int64_t* begin, int n_tasks, std::int64_t item) {
  int lo = 0, hi = n_tasks - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin[mid] <= item) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ double load_as_double(const void* base, std::int64_t i) {
  return static_cast<double>(__ldg(static_cast<const T*>(base) + i));
}

// |d|^p for p >= 1 and x^(1/p), exactly as the CPU core computes them for p = 1 and p = 2 (the
// explicit _rn intrinsics keep nvcc from contracting products into FMAs).
__device__ __forceinline__ double abs_pow(double d, double p) {
  if (p == 1.0) return fabs(d);
  if (p == 2.0) return __dmul_rn(d, d);
  return pow(fabs(d), p);
}
__device__ __forceinline__ double root_p(double x, double p) {
  if (p == 1.0) return x;
  if (p == 2.0) return sqrt(x);
  return pow(x, 1.0 / p);
}

}  // namespace detail
}  // namespace cuda
}  // namespace mars
