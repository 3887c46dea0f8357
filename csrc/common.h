// Shared helpers for the fastassoc core. Python validates every argument
// (shapes, dtypes, ranges); C++ receives raw pointers and sizes the faiss way
// and only re-checks what would make it write out of bounds.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

namespace fastassoc {

namespace py = pybind11;

// Pointers travel as Python ints (tensor.data_ptr()).
template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

// Team size of every OpenMP region of the CPU kernels (csrc/cpu/core.cpp): the count
// set by set_num_threads when there is one, else torch's count for the calling thread as
// the launcher last reported it (follow_torch_threads), else omp_get_max_threads().
int kernel_threads();

// Team size of one parallel region (csrc/cpu/core.cpp): kernel_threads() when the region's
// work is worth a fork/join (`parallel`), else 1. Every region of the kernels takes its
// team from here, so that parallel_regions() counts the regions that forked a team. Why it
// matters: a region ends when its slowest thread does, so on a CPU shared with other busy
// processes each one can cost a descheduled thread's time slice (issue 11); kernels open
// few regions per call and share work inside them dynamically.
int region_threads(bool parallel);

// Chunk of a schedule(dynamic, chunk) loop over n iterations for a team of `threads`:
// about 8 chunks per thread, so that a thread that keeps its core takes over the share of
// one that lost it, at one atomic increment per chunk.
inline int64_t dynamic_chunk(int64_t n, int threads) {
  const int64_t chunk = n / (int64_t{8} * (threads > 0 ? threads : 1));
  return chunk > 0 ? chunk : 1;
}

// x.y of two float32 rows accumulated in float64 in a fixed order (csrc/cpu/screen.cpp):
// deterministic, exactly symmetric in (x, y), vectorised. The exact distances of the
// screened kernels all come from it, so equal rows give equal distances.
double screen_dot(const float* x, const float* y, int64_t dim);

// Registration hooks: one per op family, defined in csrc/cpu/<family>.cpp and
// csrc/cuda/<family>.cu, called from bindings.cpp.
void register_core(py::module_& m);
void register_cpu_knn(py::module_& m);
void register_cpu_graph(py::module_& m);
void register_cpu_loss(py::module_& m);
void register_cpu_cluster(py::module_& m);
void register_cpu_memory(py::module_& m);
void register_cpu_evaluation(py::module_& m);
void register_cpu_screen(py::module_& m);
#ifdef FASTASSOC_WITH_CUDA
void register_cuda(py::module_& m);  // calls the per-family CUDA hooks below
void register_cuda_memory(py::module_& m);
void register_cuda_cluster(py::module_& m);
#endif

}  // namespace fastassoc
