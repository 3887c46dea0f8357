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
//
// Waiting (issue 11). libgomp's idle workers spin GOMP_SPINCOUNT times (300,000 by default,
// about 5 ms on the dev box) after every region and in every barrier before they sleep, so on
// a CPU that other processes share (a training loop's data-loader workers, other jobs) each of
// torch's and the core's regions leaves a worker burning a CPU the other work needs: measured,
// knn_soft_labels' throughput fell 4.7-6.8x with one busy competitor on two cores, torch.mm's
// 2.2-2.6x. libgomp's documented exception (its manual, GOMP_SPINCOUNT): while the process has
// more OpenMP threads than available CPUs, the spin count is the throttled one (1,000 with
// OMP_WAIT_POLICY unset), i.e. workers go to sleep almost at once, as with a passive policy.
// The runtime was configured when torch loaded it, but that thread count is live: a "holder"
// thread that opens one region of its own keeps an extra, docked (sleeping) pool, and while it
// lives every wait in the process is throttled. Policy (set_wait_policy, FASTASSOC_WAIT_POLICY):
//   auto    (default) hold the throttle while other processes compete for the CPUs: probed when
//           the kernels are entered (at most every kProbeInterval; two contended probes in a row
//           engage it) and by the holder every kHoldInterval (released after kQuietProbes quiet
//           probes in a row), so a quiet CPU keeps torch's spinning, which is faster there;
//   passive hold it from the first kernel call on (until the policy changes);
//   active  never hold it (torch's own behaviour).
// A probe reads /proc/loadavg (running tasks) and, only when that exceeds what this process can
// explain alone, the state of this process's threads (/proc/self/task/*/stat); contention means
// other running tasks + the kernels' team > the CPUs this process may use. (Linux only: without
// /proc, "auto" never engages; "passive" works wherever the runtime is libgomp.)
#include <dirent.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#include "common.h"

namespace fastassoc {

namespace {
std::atomic<int> g_thread_override{0};   // 0: follow torch
std::atomic<long long> g_parallel_regions{0};  // regions that forked a team (region_threads)
thread_local int t_torch_threads = 0;    // torch.get_num_threads() of this thread, 0: not reported

// ---- waiting policy (see the file comment) ----
enum class WaitPolicy : int { kAuto = 0, kActive = 1, kPassive = 2 };
constexpr const char* kPolicyNames[] = {"auto", "active", "passive"};
constexpr auto kProbeInterval = std::chrono::milliseconds(20);
constexpr auto kHoldInterval = std::chrono::milliseconds(25);
constexpr int kQuietProbes = 4;            // 0.1 s without contention releases the throttle
constexpr int kContendedProbesToEngage = 2;

std::atomic<int> g_wait_policy{static_cast<int>(WaitPolicy::kAuto)};
std::atomic<int64_t> g_next_probe_ns{0};
std::atomic<int> g_contended_streak{0};
std::atomic<long long> g_engagements{0};
std::atomic<int> g_holder_team{0};       // threads of the last holder's region (tests)

struct Throttle {
  std::mutex mutex;
  std::condition_variable wake;
  bool held = false;       // a holder thread runs (or is starting)
  bool release = false;    // asks the holder to end
};

// Leaked on purpose: a detached holder may still wait on it while static objects are destroyed.
Throttle* g_throttle = new Throttle();

void reset_after_fork() { g_throttle = new Throttle(); }   // the holder did not survive fork()

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

int usable_cpus() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Running tasks of the whole system (/proc/loadavg's fourth field, "running/total"); -1 if unknown.
[[maybe_unused]] int system_running_tasks() {
  std::FILE* file = std::fopen("/proc/loadavg", "r");
  if (file == nullptr) return -1;
  double one, five, fifteen;
  int running = -1, total = 0;
  if (std::fscanf(file, "%lf %lf %lf %d/%d", &one, &five, &fifteen, &running, &total) != 5) running = -1;
  std::fclose(file);
  return running;
}

// This process's threads in state R (running or runnable).
[[maybe_unused]] int own_running_threads() {
  DIR* tasks = opendir("/proc/self/task");
  if (tasks == nullptr) return 1;
  int running = 0;
  char path[96], buffer[512];
  while (dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
    std::snprintf(path, sizeof(path), "/proc/self/task/%s/stat", entry->d_name);
    std::FILE* file = std::fopen(path, "r");
    if (file == nullptr) continue;
    const size_t size = std::fread(buffer, 1, sizeof(buffer) - 1, file);
    std::fclose(file);
    buffer[size] = '\0';
    const char* close = std::strrchr(buffer, ')');   // the name may hold spaces and parentheses
    if (close != nullptr && close[1] == ' ' && close[2] == 'R') ++running;
  }
  closedir(tasks);
  return std::max(running, 1);
}

// Whether other running tasks and a team of `team` threads need more CPUs than this process has.
[[maybe_unused]] bool cpus_contended(int team) {
#ifdef __linux__
  const int cpus = usable_cpus();
  const int running = system_running_tasks();
  if (running < 0) return false;
  // This process accounts for at least one running task (the caller); up to `team` of them
  // may be its own workers. Only when more run than that could explain are its threads read.
  if (running - 1 + team <= cpus) return false;
  const int others = std::max(0, running - own_running_threads());
  return others > 0 && others + team > cpus;
#else
  (void)team;
  return false;   // no /proc to read: "auto" keeps torch's spinning
#endif
}

void hold_throttle(Throttle* throttle, int pool_threads, int team) {
#ifdef _OPENMP
  // One region from this thread gives it a pool of pool_threads - 1 workers, docked (asleep)
  // until this thread exits and libgomp frees the pool; meanwhile they count as the process's
  // OpenMP threads.
  // (A region with an empty body is compiled away: it records its team instead.)
#pragma omp parallel num_threads(pool_threads)
  {
#pragma omp single
    g_holder_team.store(omp_get_num_threads(), std::memory_order_relaxed);
  }
#else
  (void)pool_threads;
#endif
  std::unique_lock<std::mutex> lock(throttle->mutex);
  int quiet = 0;
  while (!throttle->release) {
    throttle->wake.wait_for(lock, kHoldInterval);
    if (throttle->release) break;
    if (static_cast<WaitPolicy>(g_wait_policy.load()) != WaitPolicy::kAuto) continue;
    lock.unlock();
    const bool busy = cpus_contended(team);   // the team of the kernel entry that engaged it
    lock.lock();
    quiet = busy ? 0 : quiet + 1;
    if (quiet >= kQuietProbes) break;
  }
  throttle->held = false;
  throttle->release = false;
}

[[maybe_unused]] void engage_throttle(int team) {
  Throttle* throttle = g_throttle;
  std::lock_guard<std::mutex> lock(throttle->mutex);
  if (throttle->held) return;
  // libgomp throttles while its managed threads exceed the available CPUs: torch's pool
  // (team threads, counting the caller) plus this pool's pool_threads - 1 workers.
  const int pool_threads = std::max(2, usable_cpus() - team + 2);
  throttle->held = true;
  throttle->release = false;
  try {
    std::thread(hold_throttle, throttle, pool_threads, team).detach();
    g_engagements.fetch_add(1, std::memory_order_relaxed);
  } catch (const std::system_error&) {
    throttle->held = false;     // no thread to be had: keep spinning rather than fail a kernel
  }
}

void release_throttle() {
  Throttle* throttle = g_throttle;
  std::lock_guard<std::mutex> lock(throttle->mutex);
  if (!throttle->held) return;
  throttle->release = true;
  throttle->wake.notify_all();
}

bool throttle_held() {
  Throttle* throttle = g_throttle;
  std::lock_guard<std::mutex> lock(throttle->mutex);
  return throttle->held;
}

// Called on every kernel entry (follow_torch_threads): cheap unless a probe is due.
void on_kernel_entry(int team) {
#ifdef _OPENMP
  const auto policy = static_cast<WaitPolicy>(g_wait_policy.load(std::memory_order_relaxed));
  if (policy == WaitPolicy::kActive || team <= 1) return;
  const int64_t now = now_ns();
  int64_t due = g_next_probe_ns.load(std::memory_order_relaxed);
  if (now < due) return;
  if (!g_next_probe_ns.compare_exchange_strong(
          due, now + std::chrono::duration_cast<std::chrono::nanoseconds>(kProbeInterval).count()))
    return;   // another thread probes
  if (policy == WaitPolicy::kPassive) {
    engage_throttle(team);
    return;
  }
  if (throttle_held()) return;   // the holder probes while it holds
  if (!cpus_contended(team)) {
    g_contended_streak.store(0, std::memory_order_relaxed);
    return;
  }
  if (g_contended_streak.fetch_add(1, std::memory_order_relaxed) + 1 >= kContendedProbesToEngage) {
    g_contended_streak.store(0, std::memory_order_relaxed);
    engage_throttle(team);
  }
#else
  (void)team;
#endif
}

void set_wait_policy(const std::string& name) {
  int chosen = -1;
  for (int i = 0; i < 3; ++i)
    if (name == kPolicyNames[i]) chosen = i;
  require(chosen >= 0, "policy must be 'auto', 'active' or 'passive', got '" + name + "'");
  g_wait_policy.store(chosen);
  g_contended_streak.store(0);
  g_next_probe_ns.store(0);
  if (static_cast<WaitPolicy>(chosen) == WaitPolicy::kActive) release_throttle();
}

[[maybe_unused]] const int g_fork_handler = pthread_atfork(nullptr, nullptr, reset_after_fork);
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
      [](int count) {
        t_torch_threads = count > 0 ? count : 0;
        on_kernel_entry(kernel_threads());
      },
      py::arg("count"),
      "Record torch.get_num_threads() for the calling thread (the launchers call this before "
      "every kernel; torch's count is per thread, so is this one). 0 forgets it. Also where "
      "the wait policy probes the CPU (see set_wait_policy).");
  m.def("set_wait_policy", &set_wait_policy, py::arg("policy"),
        "How the OpenMP workers (torch's and the kernels', one runtime) wait on a shared CPU: "
        "'auto' (default; FASTASSOC_WAIT_POLICY sets it at import) throttles their spinning while "
        "other processes compete for the CPUs, 'passive' from the first kernel call on, 'active' "
        "never (torch's default spinning). See csrc/cpu/core.cpp and bench/README.md, Shared CPU.");
  m.def("wait_policy", []() { return std::string(kPolicyNames[g_wait_policy.load()]); },
        "The policy set by set_wait_policy.");
  m.def("spin_throttled", &throttle_held,
        "True while the throttle is held (the process's OpenMP workers sleep almost at once "
        "instead of spinning for about GOMP_SPINCOUNT iterations).");
  m.def("throttle_engagements", []() { return g_engagements.load(std::memory_order_relaxed); },
        "How many times the throttle was engaged in this process (a counter for tests).");
  m.def("cpus_contended", []() { return cpus_contended(kernel_threads()); },
        "The policy's probe: whether other running tasks and a team of get_num_threads() threads "
        "need more CPUs than this process may use (always False where /proc is missing).");
  m.def("throttle_pool_threads", []() { return g_holder_team.load(std::memory_order_relaxed); },
        "Threads of the last holder's region (its pool plus itself; 0 before the first).");
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
