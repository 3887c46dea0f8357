// CUDA greedy union step of agglomerative merging (launcher:
// fastassoc/kernels/cuda/cluster.py::greedy_union_cuda). Exposed for the GPU
// agglomerative_merge path; it does not implement the op by itself.
//
// Algorithm. The caller selects candidate cluster pairs on the GPU and sorts them by
// (linkage, i, j). `greedy_union_kernel` (one thread: the walk is inherently serial)
// visits them in that order over a union-find forest `parent` [N] and merges every
// pair whose ends are still in different sets, until `num_merges` merges are done or
// the pairs run out. Union by index: the larger root is attached under the smaller
// one, so each set's root is its smallest member and the result does not depend on
// the order of unions, only on which pairs merged. Path halving keeps finds short.
// `parent` is updated in place, so a caller that runs out of pairs can select the
// next batch and call again with the same forest (streaming selection).
// `flatten_roots_kernel` (one thread per node, read-only finds, so race-free) then
// writes root[i] = smallest member of i's set.
//
// Running the walk on the device avoids copying the selected pairs to the host; one
// GPU thread is slow per step (~100 ns per find), so for many pairs a host walk over
// copied pairs may win: measure on the target GPU.
//
// Limits: pair entries must lie in [0, N) (the caller validates); int64 throughout.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace fastassoc {
namespace {

__device__ __forceinline__ int64_t find_root_halving(int64_t* parent, int64_t node) {
  while (parent[node] != node) {
    parent[node] = parent[parent[node]];
    node = parent[node];
  }
  return node;
}

__device__ __forceinline__ int64_t find_root_readonly(const int64_t* parent, int64_t node) {
  while (parent[node] != node) node = parent[node];
  return node;
}

__global__ void greedy_union_kernel(const int64_t* __restrict__ first, const int64_t* __restrict__ second,
                                    int64_t num_pairs, int64_t* __restrict__ parent, int64_t num_merges,
                                    int64_t* __restrict__ result) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t merges = 0;
  int64_t pair = 0;
  for (; pair < num_pairs && merges < num_merges; ++pair) {
    const int64_t a = find_root_halving(parent, first[pair]);
    const int64_t b = find_root_halving(parent, second[pair]);
    if (a == b) continue;
    if (a < b) parent[b] = a; else parent[a] = b;
    ++merges;
  }
  result[0] = merges;
  result[1] = pair;  // pairs consumed: the walk resumes here with the next batch
}

__global__ void flatten_roots_kernel(const int64_t* __restrict__ parent, int64_t num_nodes,
                                     int64_t* __restrict__ roots) {
  const int64_t node = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (node < num_nodes) roots[node] = find_root_readonly(parent, node);
}

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": kernel launch failed: " + cudaGetErrorString(status));
  }
}

void cuda_greedy_union(std::uintptr_t first, std::uintptr_t second, int64_t num_pairs, std::uintptr_t parent,
                       int64_t num_nodes, int64_t num_merges, std::uintptr_t roots, std::uintptr_t result,
                       std::uintptr_t stream_handle) {
  require(num_pairs >= 0 && num_nodes >= 0 && num_merges >= 0, "cuda_greedy_union: sizes must be non-negative");
  require(result != 0, "cuda_greedy_union: result must point to 2 int64 on the device");
  require(num_nodes == 0 || parent != 0, "cuda_greedy_union: parent must not be null");
  require(num_pairs == 0 || (first != 0 && second != 0), "cuda_greedy_union: pair pointers must not be null");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  greedy_union_kernel<<<1, 1, 0, stream>>>(as_ptr<const int64_t>(first), as_ptr<const int64_t>(second), num_pairs,
                                           as_ptr<int64_t>(parent), num_merges, as_ptr<int64_t>(result));
  check_launch("cuda_greedy_union");
  if (roots != 0 && num_nodes > 0) {
    constexpr int kThreads = 256;
    const int64_t blocks = (num_nodes + kThreads - 1) / kThreads;
    flatten_roots_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        as_ptr<const int64_t>(parent), num_nodes, as_ptr<int64_t>(roots));
    check_launch("cuda_greedy_union (flatten)");
  }
}

}  // namespace

void register_cuda_cluster(py::module_& m) {
  m.def("cuda_greedy_union", &cuda_greedy_union, py::arg("first"), py::arg("second"), py::arg("num_pairs"),
        py::arg("parent"), py::arg("num_nodes"), py::arg("num_merges"), py::arg("roots"), py::arg("result"),
        py::arg("stream"),
        "Greedy union-find walk over sorted candidate pairs, on the GPU (see csrc/cuda/cluster.cu).\n\n"
        "first, second: int64 [num_pairs] device pointers, pairs in walk order; parent: int64 [num_nodes]\n"
        "union-find forest, updated in place (initialise to 0..N-1); num_merges: stop after this many\n"
        "merges; roots: int64 [num_nodes] output (smallest member of each node's set) or 0 to skip;\n"
        "result: int64 [2] output (merges done, pairs consumed); stream: cudaStream_t as an int.\n"
        "Asynchronous: returns after the launches.");
}

}  // namespace fastassoc
