// Shared helpers for the fastassoc core. Python validates every argument
// (shapes, dtypes, ranges); C++ receives raw pointers and sizes the faiss way
// and only re-checks what would make it write out of bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

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

// Cache-blocked passes over pairs (i, j) whose j are random rows of a large matrix
// (screen_rescore's candidates, rerank_encode's weight members): in pair order each pair
// reads row j from memory, so such a pass is bound by memory traffic. Ordered by blocks of
// rows j that fit the cache, each block is read once and each row i once per block it has
// pairs in. Every pair is still computed on its own, so the results keep their bits.
// Block size measured for screen_rescore on the 2-core EPYC dev box (2 MiB L2, 32 MiB L3;
// W-jaccard lists, 34 candidates per row): 1 MiB took 0.70 s, 2-4 MiB 0.22-0.23 s, 8 MiB
// 0.27 s, 32 MiB 0.40 s, unblocked 0.49 s.
constexpr int64_t kCacheBlockBytes = int64_t(4) << 20;

// Rows of `row_bytes` bytes per cache block (at least 1).
inline int64_t cache_block_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, kCacheBlockBytes / std::max<int64_t>(1, row_bytes));
}

// Entries [0, count) ordered by the block of their row, row_of(e) in [0, num_rows), of
// rows_per_block rows each: a stable counting sort, so ascending e within a block. The
// entries of block b are order[starts[b] .. starts[b + 1]).
struct BlockOrder {
  std::vector<int64_t> starts, order;
};

template <typename RowOf>
BlockOrder order_by_block(int64_t count, int64_t num_rows, int64_t rows_per_block, RowOf row_of) {
  BlockOrder result;
  const int64_t num_blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  result.starts.assign(num_blocks + 1, 0);
  for (int64_t e = 0; e < count; ++e) ++result.starts[row_of(e) / rows_per_block + 1];
  for (int64_t b = 0; b < num_blocks; ++b) result.starts[b + 1] += result.starts[b];
  result.order.resize(count);
  std::vector<int64_t> fill(result.starts.begin(), result.starts.end() - 1);
  for (int64_t e = 0; e < count; ++e) result.order[fill[row_of(e) / rows_per_block]++] = e;
  return result;
}

// body(e) for every entry of `blocks`, block by block, shared dynamically by the team of
// the enclosing parallel region (`threads` of them). No barrier: a thread done with its
// share of one block starts the next; the caller adds one where it reads the results.
template <typename Body>
void for_each_by_block(const BlockOrder& blocks, int threads, Body body) {
  const int64_t num_blocks = static_cast<int64_t>(blocks.starts.size()) - 1;
  if (num_blocks <= 0) return;
  const int64_t chunk = dynamic_chunk(static_cast<int64_t>(blocks.order.size()) / num_blocks + 1, threads);
  for (int64_t b = 0; b < num_blocks; ++b) {
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t at = blocks.starts[b]; at < blocks.starts[b + 1]; ++at) body(blocks.order[at]);
  }
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
