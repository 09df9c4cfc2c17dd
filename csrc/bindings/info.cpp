// build_info(): what was compiled into this extension.
#include "common.hpp"
#include "mars/parallel.hpp"

#if defined(MARS_WITH_CUDA)
#include "cuda/api.hpp"
#endif

#ifndef MARS_SIMD_FLAGS
#define MARS_SIMD_FLAGS ""
#endif

namespace mars_bindings {

namespace {

const char* simd_level() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__SSE2__)
  return "sse2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

}  // namespace

void register_info(py::module_& m) {
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["version"] = MARS_VERSION;
        d["simd"] = simd_level();
        d["march"] = MARS_SIMD_FLAGS;
        d["openmp"] = mars::parallel::has_openmp();
        d["threads"] = mars::parallel::default_threads();
        d["max_threads"] = mars::parallel::hardware_threads();
#if defined(MARS_WITH_CUDA)
        d["cuda_compiled"] = true;
        d["cuda_devices"] = mars::cuda::device_count();  // 0 without a driver or device
#else
        d["cuda_compiled"] = false;
        d["cuda_devices"] = 0;
#endif
        return d;
      },
      "What was compiled in: version, SIMD level, OpenMP, default thread count, CUDA.");
  m.def("set_num_threads", &mars::parallel::set_default_threads, py::arg("n"),
        "Set the default number of threads used by every kernel (0 = all hardware threads).");
  m.def("get_num_threads", &mars::parallel::default_threads,
        "The default number of threads used by every kernel.");
}

}  // namespace mars_bindings
