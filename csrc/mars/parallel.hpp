// The one place that owns threading in mars_native.
//
// parallel_for(n, n_threads, body) calls body(begin, end) on disjoint, contiguous chunks that cover
// [0, n). Kernels only ever write results indexed by the loop variable and never reduce across
// chunks, so results are bit-identical for any thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace mars {
namespace parallel {

// Number of hardware threads (>= 1).
int hardware_threads();
// Default thread count used when a kernel is called with n_threads <= 0.
int default_threads();
// Set the default thread count; n <= 0 restores "all hardware threads".
void set_default_threads(int n);
// Resolve a per-call request: n <= 0 -> default_threads(); otherwise n.
int resolve_threads(int n_threads);
bool has_openmp();

// Run body(begin, end) over [0, n) split in contiguous chunks on up to n_threads threads.
// `grain` is the minimum number of items per chunk (small loops run on the calling thread).
void parallel_for(std::int64_t n, int n_threads, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body);

// Run body(thread, task) for every task in [0, n_tasks) on up to n_threads threads, each thread
// taking the next task when it finishes one (dynamic scheduling: a thread slowed down by the
// machine does less of the work). `thread` < n_threads identifies the caller's per-thread state.
// Which thread runs a task varies from run to run, so a task must compute its result from its
// inputs alone (as every kernel here does); its value then does not depend on the schedule.
void parallel_tasks(std::int64_t n_tasks, int n_threads,
                    const std::function<void(int, std::int64_t)>& body);

}  // namespace parallel
}  // namespace mars
