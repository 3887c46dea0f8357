// CPU kernels for the graph op family: CSR assembly of sparse affinity graphs.
//
// The neighbour search of cross_camera_graph and knn_soft_labels runs through the knn
// tile kernels (csrc/cpu/knn.cpp: knn_tile_update, knn_mutual_pairs); what is left is
// turning an edge list into a CSR matrix:
//   counts per row (both directions when symmetrised, plus the diagonal) -> int64
//   prefix sum -> scatter -> per-row sort by column (OpenMP across rows).
// Column indices come out sorted within each row; duplicate (row, col) edges are kept
// as given (the launchers never produce them). Must equal the CSR of
// fastassoc/kernels/reference/graph.py (cross_camera_graph_reference,
// knn_soft_labels_reference) given the same edges.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>

#include "common.h"

namespace fastassoc {

namespace {

constexpr int64_t kParallelMinRows = 4096;

py::tuple csr_from_edges(int64_t num_nodes, const int64_t* sources, const int64_t* targets, const double* weights,
                         int64_t num_edges, bool symmetrize, bool add_diagonal, double diagonal_value) {
  std::vector<int64_t> offsets(num_nodes + 1, 0);
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < num_edges; ++e) {
      ++offsets[sources[e] + 1];
      if (symmetrize) ++offsets[targets[e] + 1];
    }
    if (add_diagonal)
      for (int64_t i = 0; i < num_nodes; ++i) ++offsets[i + 1];
    for (int64_t i = 0; i < num_nodes; ++i) offsets[i + 1] += offsets[i];
  }
  const int64_t nnz = offsets[num_nodes];
  py::array_t<int64_t> out_offsets(num_nodes + 1), out_columns(nnz);
  py::array_t<float> out_values(nnz);
  int64_t* offsets_ptr = out_offsets.mutable_data();
  int64_t* columns_ptr = out_columns.mutable_data();
  float* values_ptr = out_values.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    std::vector<double> staged(nnz);
    for (int64_t e = 0; e < num_edges; ++e) {
      int64_t at = cursor[sources[e]]++;
      columns_ptr[at] = targets[e];
      staged[at] = weights[e];
      if (symmetrize) {
        at = cursor[targets[e]]++;
        columns_ptr[at] = sources[e];
        staged[at] = weights[e];
      }
    }
    if (add_diagonal) {
      for (int64_t i = 0; i < num_nodes; ++i) {
        const int64_t at = cursor[i]++;
        columns_ptr[at] = i;
        staged[at] = diagonal_value;
      }
    }
    const int threads = region_threads(num_nodes >= kParallelMinRows);
    const int64_t chunk = dynamic_chunk(num_nodes, threads);
#pragma omp parallel num_threads(threads)
    {
      std::vector<std::pair<int64_t, double>> row;
#pragma omp for schedule(dynamic, chunk)
      for (int64_t i = 0; i < num_nodes; ++i) {
        const int64_t begin = offsets[i], end = offsets[i + 1];
        row.clear();
        for (int64_t at = begin; at < end; ++at) row.emplace_back(columns_ptr[at], staged[at]);
        std::sort(row.begin(), row.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
        for (int64_t s = 0; s < end - begin; ++s) {
          columns_ptr[begin + s] = row[s].first;
          values_ptr[begin + s] = float(row[s].second);
        }
      }
    }
    std::copy(offsets.begin(), offsets.end(), offsets_ptr);
  }
  return py::make_tuple(out_offsets, out_columns, out_values);
}

}  // namespace

void register_cpu_graph(py::module_& m) {
  m.def(
      "graph_csr_from_edges",
      [](int64_t num_nodes, std::uintptr_t sources, std::uintptr_t targets, std::uintptr_t weights,
         int64_t num_edges, bool symmetrize, bool add_diagonal, double diagonal_value) {
        require(num_nodes >= 0 && num_edges >= 0, "graph_csr_from_edges: bad sizes");
        const int64_t* src = as_ptr<const int64_t>(sources);
        const int64_t* dst = as_ptr<const int64_t>(targets);
        for (int64_t e = 0; e < num_edges; ++e)
          require(src[e] >= 0 && src[e] < num_nodes && dst[e] >= 0 && dst[e] < num_nodes,
                  "graph_csr_from_edges: edge endpoint out of range");
        return csr_from_edges(num_nodes, src, dst, as_ptr<const double>(weights), num_edges, symmetrize,
                              add_diagonal, diagonal_value);
      },
      py::arg("num_nodes"), py::arg("sources"), py::arg("targets"), py::arg("weights"), py::arg("num_edges"),
      py::arg("symmetrize"), py::arg("add_diagonal"), py::arg("diagonal_value"),
      "CSR arrays (crow int64 [n+1], col int64 [nnz], values float32 [nnz]) of an n x n matrix from\n"
      "int64 edge endpoints and float64 weights: each edge (s, t, w) gives entry (s, t) = w, and\n"
      "(t, s) = w when symmetrize; add_diagonal adds (i, i) = diagonal_value for every node.\n"
      "Values are rounded to float32 once, at the end; columns are sorted within rows.");
}

}  // namespace fastassoc
