// Build facts the Python dispatcher needs (is CUDA compiled in) and the thread count of
// the CPU kernels.
//
// Threads. In a process that imported torch first (fastassoc always does), this module's
// libgomp.so.1 dependency is satisfied by the copy torch bundles in torch/lib, so torch's
// GEMMs and these kernels share one OpenMP runtime and one pool of worker threads; the
// wait policy is that runtime's, fixed when torch loaded it (OMP_WAIT_POLICY /
// GOMP_SPINCOUNT in the environment before `import torch`; nothing set later is read).
// The kernels therefore only choose how many threads each region uses: by default the
// count torch uses in the calling thread (the launcher passes torch.get_num_threads()),
// so they never oversubscribe a CPU that torch was told to share; set_num_threads(n)
// overrides it for every thread until set_num_threads(None).
#include <omp.h>

#include <algorithm>
#include <atomic>

#include "common.h"

namespace fastassoc {

namespace {
std::atomic<int> g_thread_override{0};   // 0: follow torch
std::atomic<long long> g_parallel_regions{0};  // regions that forked a team (region_threads)
thread_local int t_torch_threads = 0;    // torch.get_num_threads() of this thread, 0: not reported
}  // namespace

int kernel_threads() {
  const int override_count = g_thread_override.load(std::memory_order_relaxed);
  if (override_count > 0) return override_count;
  if (t_torch_threads > 0) return t_torch_threads;
  return std::max(1, omp_get_max_threads());
}

int region_threads(bool parallel) {
  const int team = parallel ? kernel_threads() : 1;
  if (team > 1) g_parallel_regions.fetch_add(1, std::memory_order_relaxed);
  return team;
}

void register_core(py::module_& m) {
  m.def(
      "has_cuda",
      []() {
#ifdef FASTASSOC_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels in csrc/cuda were compiled into this module.");
  m.def(
      "has_openmp",
      []() {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
      },
      "True when the CPU kernels were compiled with OpenMP; without it every parallel region runs "
      "on the calling thread and set_num_threads changes nothing.");
  m.def("get_num_threads", &kernel_threads,
        "Threads a parallel region of the CPU kernels uses when called from this thread: the "
        "set_num_threads override if any, else torch's count (torch.get_num_threads()).");
  m.def(
      "set_num_threads",
      [](py::object count) {
        if (count.is_none()) {
          g_thread_override.store(0, std::memory_order_relaxed);
          return;
        }
        require(py::isinstance<py::int_>(count) && !py::isinstance<py::bool_>(count),
                "num_threads must be an int >= 1 or None, got " + std::string(py::str(py::repr(count))));
        const long long n = count.cast<long long>();
        require(n >= 1 && n <= 1 << 16, "num_threads must be an int in [1, 65536] or None, got " + std::to_string(n));
        g_thread_override.store(static_cast<int>(n), std::memory_order_relaxed);
      },
      py::arg("num_threads"),
      "Fix the threads of every CPU kernel region (all calling threads) to num_threads; None "
      "follows torch.get_num_threads() again. Does not change torch's own thread count.");
  m.def(
      "num_threads_override",
      []() -> py::object {
        const int n = g_thread_override.load(std::memory_order_relaxed);
        if (n > 0) return py::int_(n);
        return py::none();
      },
      "The count set by set_num_threads, or None when the kernels follow torch.");
  m.def(
      "follow_torch_threads",
      [](int count) { t_torch_threads = count > 0 ? count : 0; },
      py::arg("count"),
      "Record torch.get_num_threads() for the calling thread (the launchers call this before "
      "every kernel; torch's count is per thread, so is this one). 0 forgets it.");
  m.def(
      "parallel_regions", []() { return g_parallel_regions.load(std::memory_order_relaxed); },
      "Number of parallel regions with more than one thread the CPU kernels have opened in this "
      "process, from every calling thread (a counter for tests: take differences around a call).");
  m.def(
      "parallel_region_threads",
      []() {
        int seen = 0;
#pragma omp parallel num_threads(region_threads(true))
        {
#pragma omp single
          seen = omp_get_num_threads();
        }
        return seen;
      },
      "Opens one parallel region the way the kernels do and returns the number of threads "
      "that ran it (a probe for tests; may be below get_num_threads() if the runtime limits it).");
}

}  // namespace fastassoc
