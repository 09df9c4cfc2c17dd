// Runtime queries of the CUDA backend: device count (0 without a driver), versions, pointer
// ownership. None of these initialises a context unless a device exists.
#include <cstdio>
#include <mutex>
#include <vector>

#include "cuda/common.cuh"

#ifndef MARS_CUDA_ARCHITECTURES
#define MARS_CUDA_ARCHITECTURES ""
#endif

namespace mars {
namespace cuda {

namespace {

std::mutex pool_mutex;
std::vector<cudaMemPool_t> pools;       // per device ordinal; nullptr: not created yet
std::vector<bool> pools_checked;        // pool support looked up for this device

}  // namespace

namespace detail {

cudaMemPool_t scratch_pool() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (static_cast<std::size_t>(device) >= pools.size()) {
    pools.resize(device + 1, nullptr);
    pools_checked.resize(device + 1, false);
  }
  if (!pools_checked[device]) {
    pools_checked[device] = true;
    int supported = 0;
    check(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device),
          "cudaDeviceGetAttribute");
    if (supported) {
      cudaMemPoolProps props{};
      props.allocType = cudaMemAllocationTypePinned;
      props.handleTypes = cudaMemHandleTypeNone;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      cudaMemPool_t pool = nullptr;
      check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
      std::uint64_t keep = UINT64_MAX;  // never release reserved memory at synchronisations
      check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
            "cudaMemPoolSetAttribute");
      pools[device] = pool;
    }
  }
  return pools[device];
}

}  // namespace detail

void trim_memory() noexcept {
  std::lock_guard<std::mutex> lock(pool_mutex);
  for (cudaMemPool_t pool : pools) {
    if (pool != nullptr) cudaMemPoolTrimTo(pool, 0);
  }
}

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    return 0;
  }
  return n;
}

std::string device_count_error() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    const std::string what = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    // cudaDriverGetVersion reports 0 when no driver is installed at all.
    return driver_version() == 0 ? "no NVIDIA driver is installed (" + what + ")" : what;
  }
  return n > 0 ? std::string() : std::string("the CUDA runtime reports 0 devices");
}

int runtime_version() noexcept { return CUDART_VERSION; }

int driver_version() noexcept {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

const char* compiled_architectures() noexcept { return MARS_CUDA_ARCHITECTURES; }

void require_device(int device) {
  const int n = device_count();
  if (n == 0) {
    throw std::runtime_error(
        "mars_native CUDA: no CUDA device is available (" + device_count_error() +
        "); the CUDA backend is compiled in but cannot run here. Pass CPU arrays (or "
        "MARS(device='cpu')) to use the CPU kernels.");
  }
  if (device < 0 || device >= n) {
    throw std::runtime_error("mars_native CUDA: device ordinal " + std::to_string(device) +
                             " is out of range (this machine has " + std::to_string(n) +
                             " CUDA device(s))");
  }
}

std::string device_description(int device) {
  require_device(device);
  cudaDeviceProp prop{};
  detail::check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  char mem[64];
  std::snprintf(mem, sizeof(mem), "%.1f GiB",
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ", " + mem + ")";
}

int pointer_device(std::uintptr_t ptr) {
  require_device(0);
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument("pointer 0x" + [&] {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%llx", static_cast<unsigned long long>(ptr));
      return std::string(buf);
    }() + " is not CUDA memory (" + cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(
        "expected CUDA device memory, got a pointer to host memory (cudaPointerGetAttributes "
        "type " + std::to_string(static_cast<int>(attr.type)) + ")");
  }
  return attr.device;
}

}  // namespace cuda
}  // namespace mars
