#include "mars/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(MARS_WITH_OPENMP)
#include <omp.h>
#endif

namespace mars {
namespace parallel {

namespace {
std::atomic<int> g_default_threads{0};
}

int hardware_threads() {
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

int default_threads() {
  int n = g_default_threads.load();
  return n > 0 ? n : hardware_threads();
}

void set_default_threads(int n) { g_default_threads.store(n > 0 ? n : 0); }

int resolve_threads(int n_threads) { return n_threads > 0 ? n_threads : default_threads(); }

bool has_openmp() {
#if defined(MARS_WITH_OPENMP)
  return true;
#else
  return false;
#endif
}

namespace {

// Runs worker(t) for t in [0, nt) on nt threads (the caller is thread 0) and rethrows the first
// exception a worker threw, after all have finished.
void run_workers(int nt, const std::function<void(int)>& worker) {
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int t) {
    try {
      worker(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
#if defined(MARS_WITH_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int t = 0; t < nt; ++t) guarded(t);
#else
  std::vector<std::thread> workers;
  workers.reserve(static_cast<std::size_t>(nt - 1));
  for (int t = 1; t < nt; ++t) workers.emplace_back(guarded, t);
  guarded(0);
  for (auto& w : workers) w.join();
#endif
  if (error) std::rethrow_exception(error);
}

}  // namespace

void parallel_for(std::int64_t n, int n_threads, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  std::int64_t max_chunks = (n + grain - 1) / grain;
  int nt = static_cast<int>(std::min<std::int64_t>(resolve_threads(n_threads), max_chunks));
  if (nt <= 1) {
    body(0, n);
    return;
  }
  // Contiguous static partition: chunk t covers [t*n/nt, (t+1)*n/nt).
  run_workers(nt, [&](int t) {
    const std::int64_t begin = n * t / nt;
    const std::int64_t end = n * (t + 1) / nt;
    if (begin < end) body(begin, end);
  });
}

void parallel_tasks(std::int64_t n_tasks, int n_threads,
                    const std::function<void(int, std::int64_t)>& body) {
  if (n_tasks <= 0) return;
  const int nt = static_cast<int>(std::min<std::int64_t>(resolve_threads(n_threads), n_tasks));
  if (nt <= 1) {
    for (std::int64_t t = 0; t < n_tasks; ++t) body(0, t);
    return;
  }
  std::atomic<std::int64_t> next{0};
  std::atomic<bool> failed{false};  // after an exception the other threads stop taking tasks
  run_workers(nt, [&](int thread) {
    try {
      for (std::int64_t t = next.fetch_add(1); t < n_tasks && !failed.load(); t = next.fetch_add(1)) {
        body(thread, t);
      }
    } catch (...) {
      failed.store(true);
      throw;
    }
  });
}

}  // namespace parallel
}  // namespace mars
