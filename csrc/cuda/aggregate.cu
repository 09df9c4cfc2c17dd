// Weighted mean of N device buffers with fp64 accumulation (mars/aggregate.hpp semantics).
//
// One thread per element (grid-stride): acc = sum over the buffers, in their given order, of
// w_i * x_i[j] (fused multiply-add in fp64), then acc / total_weight (or the server-learning-rate
// form with a base). Each element is summed by one thread in a fixed order: bit-identical from
// run to run, independent of the launch configuration. Zero weights skip their buffer (it is not
// read). Reads every buffer exactly once, coalesced.
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"

namespace mars {
namespace cuda {

namespace {

constexpr int kThreads = 256;

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    weighted_mean_kernel(const T* const* buffers, const double* weights, int n_buffers,
                         std::int64_t n_elems, double total_weight, const T* base,
                         double server_lr, O* out) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       j < n_elems; j += stride) {
    double acc = 0.0;
    for (int i = 0; i < n_buffers; ++i) {
      const double w = weights[i];
      if (w == 0.0) continue;
      acc = fma(w, static_cast<double>(__ldg(buffers[i] + j)), acc);
    }
    const double mean = acc / total_weight;
    if (base == nullptr) {
      out[j] = static_cast<O>(mean);
    } else {
      const double g = static_cast<double>(base[j]);
      out[j] = static_cast<O>(fma(server_lr, mean - g, g));
    }
  }
}

template <typename T, typename O>
void launch(const void* const* buffers, const double* weights, int n_buffers, std::int64_t n,
            double total, const void* base, double server_lr, void* out, cudaStream_t stream) {
  int device = 0, sms = 1;
  detail::check(cudaGetDevice(&device), "cudaGetDevice");
  detail::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                "cudaDeviceGetAttribute");
  const std::int64_t wanted = (n + kThreads - 1) / kThreads;
  const std::int64_t cap = static_cast<std::int64_t>(sms) * 16;  // enough blocks to fill the GPU
  const unsigned blocks = static_cast<unsigned>(wanted < cap ? (wanted < 1 ? 1 : wanted) : cap);
  weighted_mean_kernel<T, O><<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const T* const*>(buffers), weights, n_buffers, n, total,
      static_cast<const T*>(base), server_lr, static_cast<O*>(out));
  detail::check_launch("weighted_mean_kernel");
}

}  // namespace

void weighted_mean(const std::vector<const void*>& buffers, DType dtype, std::int64_t n_elems,
                   const std::vector<double>& weights, const void* base, double server_lr,
                   void* out, DType out_dtype, int device, Stream stream_id) {
  if (buffers.empty()) throw std::invalid_argument("buffers must not be empty");
  if (buffers.size() > 0x7FFFFFFF) throw std::invalid_argument("too many buffers");
  if (weights.size() != buffers.size()) {
    throw std::invalid_argument("weights must have one entry per buffer: got " +
                                std::to_string(weights.size()) + " weights for " +
                                std::to_string(buffers.size()) + " buffers");
  }
  if ((dtype != DType::f32 && dtype != DType::f64) ||
      (out_dtype != DType::f32 && out_dtype != DType::f64)) {
    throw std::invalid_argument("buffers and out must be float32 or float64");
  }
  if (n_elems < 0) throw std::invalid_argument("n_elems must be >= 0");
  if (!std::isfinite(server_lr)) {
    throw std::invalid_argument("server_lr must be finite, got " + std::to_string(server_lr));
  }
  double total = 0.0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    if (!std::isfinite(weights[i]) || weights[i] < 0.0) {
      throw std::invalid_argument("weights must be finite and >= 0, got " +
                                  std::to_string(weights[i]) + " at index " + std::to_string(i));
    }
    total += weights[i];
  }
  if (!(total > 0.0) || !std::isfinite(total)) {
    throw std::invalid_argument("weights must have a positive, finite sum, got " +
                                std::to_string(total));
  }
  for (std::size_t i = 0; i < buffers.size(); ++i) {
    if (weights[i] != 0.0) detail::require_pointer(buffers[i], n_elems, "buffers[" + std::to_string(i) + "]");
  }
  detail::require_pointer(out, n_elems, "out");
  if (n_elems == 0) return;
  detail::DeviceGuard guard(device);
  const cudaStream_t stream = detail::as_stream(stream_id);
  // Device copies of the pointer and weight tables.
  const std::size_t ptr_bytes = detail::align_up(buffers.size() * sizeof(void*));
  detail::Scratch scratch(ptr_bytes + weights.size() * sizeof(double), stream);
  detail::upload(buffers, scratch, 0, stream, "upload of buffer pointers");
  detail::upload(weights, scratch, ptr_bytes, stream, "upload of weights");
  const auto* ptrs = scratch.as<const void*>();
  const double* w = scratch.as<double>(ptr_bytes);
  const int nb = static_cast<int>(buffers.size());
  if (dtype == DType::f32) {
    if (out_dtype == DType::f32) {
      launch<float, float>(ptrs, w, nb, n_elems, total, base, server_lr, out, stream);
    } else {
      launch<float, double>(ptrs, w, nb, n_elems, total, base, server_lr, out, stream);
    }
  } else {
    if (out_dtype == DType::f32) {
      launch<double, float>(ptrs, w, nb, n_elems, total, base, server_lr, out, stream);
    } else {
      launch<double, double>(ptrs, w, nb, n_elems, total, base, server_lr, out, stream);
    }
  }
}

}  // namespace cuda
}  // namespace mars
