// CPU kernels for the knn op family: bounded top-k selection over dot-product tiles.
//
// Algorithm. Python computes one tile of inner products at a time with torch's GEMM
// (dots[r, c] = row_r . col_c, a [rows x cols] block with leading dimension ld, so a
// sub-block of a larger tile can be passed without a copy) and hands it here.
// knn_tile_update turns each dot into the metric value
//   sqeuclidean  max(|row|^2 + |col|^2 - 2 dot, 0)   (the reference's formula and order)
//   cosine       1 - dot                              (rows pre-normalised)
// and merges it into bounded per-row lists (the k smallest columns of each row) and,
// when asked, per-column lists (the k smallest rows of each column) in the same pass.
// Euclidean is ranked here as sqeuclidean; the launcher takes torch's square root of
// the selected values and re-sorts, so values and ties match the reference's sqrt.
// Row lists are updated with rows split across OpenMP threads, then column lists with
// columns split across threads in slabs (each list owned by one thread, rows visited in
// order), so no atomics, private copies or merges are needed. Gates are tested 16
// columns at a time with a branch-free reduction; both kernels are compiled for
// AVX-512, AVX2 and baseline x86-64 and picked at load time.
//
// Tie-breaking. Every list is ordered by (value, id) lexicographically and every
// insertion compares lexicographically, so a list holds the k smallest (value, id)
// pairs whatever the tile shape, thread count or arrival order. Lists start as
// (inf, -1) padding; an excluded pair gets the value inf and can never enter.
// k <= 32: sorted insertion lists; larger k: binary max-heaps, put in order by
// knn_sort_lists.
//
// Limits. Values are compared in the compute dtype (float32, or float64 for float64
// inputs); all offsets are int64 (flat_index), so B*N and N*k beyond 2^31 are safe.
// Must equal fastassoc/kernels/reference/knn.py (topk_anchors_reference,
// mutual_knn_reference) given the same dot products.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>

#include "common.h"

namespace fastassoc {

namespace {

enum Metric : int { kSqEuclidean = 0, kCosine = 1 };
enum Filter : int { kNoFilter = 0, kAtMost = 1 };

// Lists up to this length use sorted insertion (cheap shifts); longer ones a heap.
constexpr int64_t kSortedListMax = 32;
// Tiles smaller than this run on one thread: the fork/join would cost more.
constexpr int64_t kParallelMinElements = 1 << 15;

// All flat offsets go through here so that row * stride is formed in int64.
inline int64_t flat_index(int64_t row, int64_t stride, int64_t col) { return row * stride + col; }

template <typename T>
inline bool lex_less(T value_a, int64_t index_a, T value_b, int64_t index_b) {
  return value_a < value_b || (value_a == value_b && index_a < index_b);
}

// The entry a candidate must beat: the last of a sorted list, the root of a heap.
template <typename T>
inline T list_gate(const T* values, int64_t k) {
  return k <= kSortedListMax ? values[k - 1] : values[0];
}

// Offer (value, index) to a bounded list of k entries.
template <typename T>
inline void list_push(T* values, int64_t* indices, int64_t k, T value, int64_t index) {
  if (k <= kSortedListMax) {
    if (!lex_less(value, index, values[k - 1], indices[k - 1])) return;
    int64_t pos = k - 1;
    while (pos > 0 && lex_less(value, index, values[pos - 1], indices[pos - 1])) {
      values[pos] = values[pos - 1];
      indices[pos] = indices[pos - 1];
      --pos;
    }
    values[pos] = value;
    indices[pos] = index;
    return;
  }
  if (!lex_less(value, index, values[0], indices[0])) return;
  int64_t pos = 0;
  for (;;) {
    int64_t child = 2 * pos + 1;
    if (child >= k) break;
    if (child + 1 < k && lex_less(values[child], indices[child], values[child + 1], indices[child + 1])) ++child;
    if (!lex_less(value, index, values[child], indices[child])) break;
    values[pos] = values[child];
    indices[pos] = indices[child];
    pos = child;
  }
  values[pos] = value;
  indices[pos] = index;
}

template <typename T>
void sort_list(T* values, int64_t* indices, int64_t k, std::vector<std::pair<T, int64_t>>& scratch) {
  scratch.resize(k);
  for (int64_t s = 0; s < k; ++s) scratch[s] = {values[s], indices[s]};
  std::sort(scratch.begin(), scratch.end(),
            [](const auto& a, const auto& b) { return lex_less(a.first, a.second, b.first, b.second); });
  for (int64_t s = 0; s < k; ++s) {
    values[s] = scratch[s].first;
    indices[s] = scratch[s].second;
  }
}

template <typename T>
struct TileArgs {
  const T* dots;
  int64_t rows, cols, ld;
  int metric;
  const T* row_norms;       // [rows] squared norms (sqeuclidean) or null
  const T* col_norms;       // [cols]
  int64_t row_base;         // global index of tile row 0 (what column lists store)
  int64_t col_base;         // global index of tile column 0 (what row lists store)
  const int64_t* row_ids;   // [rows] or null: ids column lists store instead of row_base + r
  const int64_t* col_ids;   // [cols] or null: ids row lists store instead of col_base + j
  const int64_t* exclude;   // [rows] column each row skips, compared with col_base + j (-1 none) or null
  int64_t k;
  T* row_values;            // [rows, k] or null
  int64_t* row_indices;
  T* col_values;            // [cols - col_first, k] or null: lists of columns col_first onwards
  int64_t* col_indices;
  int64_t col_first = 0;    // columns before it update no column list (a self-join's diagonal block)
};

// Candidates are rare once the lists have filled, so gates are tested a block at a time
// with a branch-free (vectorised) reduction and only blocks holding a candidate are
// walked element by element.
constexpr int64_t kScanBlock = 16;
// Column pass: each thread owns slabs of this many columns (at most) of the tile.
constexpr int64_t kColumnSlab = 256;

// values[0, width) = metric values of tile row r, columns [j0, j0 + width); the excluded
// pair (if in range) gets inf so that it enters neither its row's nor its column's list.
template <typename T>
[[gnu::always_inline]] inline void metric_values(const TileArgs<T>& a, int64_t r, int64_t j0, int64_t width,
                                                  T* values) {
  const T* dot_row = a.dots + flat_index(r, a.ld, j0);
  if (a.metric == kSqEuclidean) {
    const T row_norm = a.row_norms[r];
    const T* col_norms = a.col_norms + j0;
    for (int64_t j = 0; j < width; ++j) {
      const T v = (row_norm + col_norms[j]) - T(2) * dot_row[j];
      values[j] = v > T(0) ? v : T(0);
    }
  } else {
    for (int64_t j = 0; j < width; ++j) values[j] = T(1) - dot_row[j];
  }
  if (a.exclude && a.exclude[r] >= 0) {
    const int64_t skip = a.exclude[r] - a.col_base - j0;
    if (skip >= 0 && skip < width) values[skip] = std::numeric_limits<T>::infinity();
  }
}

// Row side: tile row r into its own list.
template <typename T>
[[gnu::always_inline]] inline void process_row(const TileArgs<T>& a, int64_t r, T* values) {
  const int64_t k = a.k, cols = a.cols;
  metric_values(a, r, 0, cols, values);
  T* list_values = a.row_values + flat_index(r, k, 0);
  int64_t* list_indices = a.row_indices + flat_index(r, k, 0);
  T gate = list_gate(list_values, k);
  for (int64_t j0 = 0; j0 < cols; j0 += kScanBlock) {
    const int64_t j1 = std::min(j0 + kScanBlock, cols);
    int hit = 0;
    for (int64_t j = j0; j < j1; ++j) hit |= values[j] <= gate;
    if (!hit) continue;
    for (int64_t j = j0; j < j1; ++j) {
      if (values[j] <= gate) {
        list_push(list_values, list_indices, k, values[j], a.col_ids ? a.col_ids[j] : a.col_base + j);
        gate = list_gate(list_values, k);
      }
    }
  }
}

// Column side: every tile row into the lists of columns [j0, j1), which this thread owns
// (no private copies, no merge). values, gates: scratch of j1 - j0 entries.
template <typename T>
[[gnu::always_inline]] inline void process_column_slab(const TileArgs<T>& a, int64_t j0, int64_t j1, T* values,
                                                       T* gates) {
  const int64_t k = a.k, width = j1 - j0, list0 = j0 - a.col_first;
  for (int64_t j = 0; j < width; ++j) gates[j] = list_gate(a.col_values + flat_index(list0 + j, k, 0), k);
  for (int64_t r = 0; r < a.rows; ++r) {
    metric_values(a, r, j0, width, values);
    const int64_t row_id = a.row_ids ? a.row_ids[r] : a.row_base + r;
    for (int64_t b0 = 0; b0 < width; b0 += kScanBlock) {
      const int64_t b1 = std::min(b0 + kScanBlock, width);
      int hit = 0;
      for (int64_t j = b0; j < b1; ++j) hit |= values[j] <= gates[j];
      if (!hit) continue;
      for (int64_t j = b0; j < b1; ++j) {
        if (values[j] <= gates[j]) {
          T* list_values = a.col_values + flat_index(list0 + j, k, 0);
          list_push(list_values, a.col_indices + flat_index(list0 + j, k, 0), k, values[j], row_id);
          gates[j] = list_gate(list_values, k);
        }
      }
    }
  }
}

// One clone per ISA level, picked at load time (x86-64 only).
#ifdef FASTASSOC_TARGET_CLONES  // CMake found x86 + ifunc support (not aarch64, musl or macOS)
#define FASTASSOC_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTASSOC_ISA_CLONES
#endif
FASTASSOC_ISA_CLONES void process_row_dispatch(const TileArgs<float>& a, int64_t r, float* values) {
  process_row(a, r, values);
}
FASTASSOC_ISA_CLONES void process_row_dispatch(const TileArgs<double>& a, int64_t r, double* values) {
  process_row(a, r, values);
}
FASTASSOC_ISA_CLONES void process_column_slab_dispatch(const TileArgs<float>& a, int64_t j0, int64_t j1,
                                                       float* values, float* gates) {
  process_column_slab(a, j0, j1, values, gates);
}
FASTASSOC_ISA_CLONES void process_column_slab_dispatch(const TileArgs<double>& a, int64_t j0, int64_t j1,
                                                       double* values, double* gates) {
  process_column_slab(a, j0, j1, values, gates);
}

// Row lists: rows split across threads. Column lists: columns split across threads in
// slabs, each list owned by one thread, rows visited in order. Both passes read the same
// tile (recomputing the metric is cheaper than writing it back). One parallel region for
// both passes, both scheduled dynamically and without a barrier between them (row and
// column lists are disjoint memory): a thread that keeps its core while another process
// holds the other takes over the rest of the work instead of waiting (issue 11).
template <typename T>
void tile_update(const TileArgs<T>& a) {
  const int64_t k = a.k;
  if (a.rows <= 0 || a.cols <= 0 || k <= 0) return;
  const bool want_rows = a.row_values != nullptr;
  const int64_t list_cols = a.cols - a.col_first;   // columns with lists
  const bool want_cols = a.col_values != nullptr && list_cols > 0;
  const int num_threads = region_threads(a.rows * a.cols >= kParallelMinElements);
  const int64_t row_chunk = dynamic_chunk(a.rows, num_threads);
  // Slabs: at least two per thread where the tile is wide enough, whole scan blocks.
  const int64_t per_slab = std::min<int64_t>(
      kColumnSlab, std::max<int64_t>(kScanBlock, (list_cols + 2 * num_threads - 1) / (2 * num_threads)));
  const int64_t num_slabs = (list_cols + per_slab - 1) / per_slab;

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<T> values(std::max(a.cols, per_slab));
    std::vector<T> gates(per_slab);
    if (want_rows) {
#pragma omp for schedule(dynamic, row_chunk) nowait
      for (int64_t r = 0; r < a.rows; ++r) process_row_dispatch(a, r, values.data());
    }
    if (want_cols) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t slab = 0; slab < num_slabs; ++slab) {
        const int64_t j0 = a.col_first + slab * per_slab;
        process_column_slab_dispatch(a, j0, std::min(j0 + per_slab, a.cols), values.data(), gates.data());
      }
    }
  }
}

// Several tiles that share their rows (column blocks of one wider tile, each with its own
// lists: cross_camera_graph's camera pairs) in one parallel region: row work items are
// (block, row chunk), column work items (block, slab), both scheduled dynamically, without
// a barrier between them (every block's lists are disjoint from every other's). Each
// block's lists see the same candidates in the same order as with tile_update alone.
template <typename T>
void tile_update_blocks(const std::vector<TileArgs<T>>& blocks) {
  struct Item {
    int64_t block, begin, end;
  };
  int64_t elements = 0, widest = 0;
  for (const auto& a : blocks) {
    if (a.rows > 0 && a.cols > 0 && a.k > 0) elements += a.rows * a.cols;
    widest = std::max(widest, a.cols);
  }
  if (elements == 0) return;
  const int num_threads = region_threads(elements >= kParallelMinElements);
  std::vector<Item> row_items, col_items;
  for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b) {
    const auto& a = blocks[b];
    if (a.rows <= 0 || a.cols <= 0 || a.k <= 0) continue;
    if (a.row_values) {
      const int64_t chunk = dynamic_chunk(a.rows, num_threads);
      for (int64_t r = 0; r < a.rows; r += chunk) row_items.push_back({b, r, std::min(r + chunk, a.rows)});
    }
    if (a.col_values) {
      const int64_t list_cols = a.cols - a.col_first;
      const int64_t per_slab = std::min<int64_t>(
          kColumnSlab, std::max<int64_t>(kScanBlock, (list_cols + 2 * num_threads - 1) / (2 * num_threads)));
      for (int64_t j = a.col_first; j < a.cols; j += per_slab)
        col_items.push_back({b, j, std::min(j + per_slab, a.cols)});
    }
  }
  const int64_t num_row_items = static_cast<int64_t>(row_items.size());
  const int64_t num_col_items = static_cast<int64_t>(col_items.size());
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<T> values(std::max<int64_t>(widest, kColumnSlab));
    std::vector<T> gates(kColumnSlab);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < num_row_items; ++i) {
      const Item& item = row_items[i];
      for (int64_t r = item.begin; r < item.end; ++r) process_row_dispatch(blocks[item.block], r, values.data());
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_col_items; ++i) {
      const Item& item = col_items[i];
      process_column_slab_dispatch(blocks[item.block], item.begin, item.end, values.data(), gates.data());
    }
  }
}

template <typename T>
void sort_lists(T* values, int64_t* indices, int64_t num_lists, int64_t k) {
  const int threads = region_threads(num_lists * k >= kParallelMinElements);
  const int64_t chunk = dynamic_chunk(num_lists, threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<std::pair<T, int64_t>> scratch;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < num_lists; ++i) sort_list(values + flat_index(i, k, 0), indices + flat_index(i, k, 0), k, scratch);
  }
}

// Pairs (i, j) with j in row list i and i in column list j, sorted by (i, j).
template <typename T>
py::tuple mutual_pairs(const T* row_values, const int64_t* row_indices, int64_t num_rows, const int64_t* col_indices,
                       int64_t num_cols, int64_t k, int64_t row_base, int64_t col_base, int filter, double threshold) {
  std::vector<int64_t> offsets(num_rows + 1, 0);
  auto is_pair = [&](int64_t i, int64_t s) {
    const int64_t j = row_indices[flat_index(i, k, s)];
    if (j < 0) return false;
    const int64_t local = j - col_base;
    if (local < 0 || local >= num_cols) return false;
    // The float32 value that is returned is what must satisfy the bound, compared in float64.
    const double value = double(float(row_values[flat_index(i, k, s)]));
    if (filter == kAtMost && !(value <= threshold)) return false;
    const int64_t* back = col_indices + flat_index(local, k, 0);
    for (int64_t t = 0; t < k; ++t)
      if (back[t] == row_base + i) return true;
    return false;
  };
  const bool parallel = num_rows * k >= kParallelMinElements;
  {
    py::gil_scoped_release release;
    const int threads = region_threads(parallel);
    const int64_t chunk = dynamic_chunk(num_rows, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
    for (int64_t i = 0; i < num_rows; ++i) {
      int64_t count = 0;
      for (int64_t s = 0; s < k; ++s) count += is_pair(i, s);
      offsets[i + 1] = count;
    }
    for (int64_t i = 0; i < num_rows; ++i) offsets[i + 1] += offsets[i];
  }
  const int64_t total = offsets[num_rows];
  py::array_t<int64_t> out_rows(total), out_cols(total);
  py::array_t<T> out_values(total);
  int64_t* rows_ptr = out_rows.mutable_data();
  int64_t* cols_ptr = out_cols.mutable_data();
  T* values_ptr = out_values.mutable_data();
  {
    py::gil_scoped_release release;
    const int threads = region_threads(parallel && total > 0);
    const int64_t chunk = dynamic_chunk(num_rows, threads);
#pragma omp parallel num_threads(threads)
    {
      std::vector<std::pair<int64_t, T>> found;
#pragma omp for schedule(dynamic, chunk)
      for (int64_t i = 0; i < num_rows; ++i) {
        if (offsets[i + 1] == offsets[i]) continue;
        found.clear();
        for (int64_t s = 0; s < k; ++s)
          if (is_pair(i, s)) found.emplace_back(row_indices[flat_index(i, k, s)], row_values[flat_index(i, k, s)]);
        std::sort(found.begin(), found.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
        int64_t out = offsets[i];
        for (const auto& [j, value] : found) {
          rows_ptr[out] = row_base + i;
          cols_ptr[out] = j;
          values_ptr[out] = value;
          ++out;
        }
      }
    }
  }
  return py::make_tuple(out_rows, out_cols, out_values);
}

}  // namespace

void register_cpu_knn(py::module_& m) {
  m.def(
      "knn_tile_update",
      [](std::uintptr_t dots, bool is_double, int64_t rows, int64_t cols, int64_t ld, int metric,
         std::uintptr_t row_norms, std::uintptr_t col_norms, int64_t row_base, int64_t col_base,
         std::uintptr_t row_ids, std::uintptr_t col_ids, std::uintptr_t exclude, int64_t k, std::uintptr_t row_values, std::uintptr_t row_indices,
         std::uintptr_t col_values, std::uintptr_t col_indices, int64_t col_first) {
        require(rows >= 0 && cols >= 0 && k >= 0 && ld >= cols && col_first >= 0 && col_first <= cols,
                "knn_tile_update: bad sizes");
        require(metric == kSqEuclidean || metric == kCosine, "knn_tile_update: unknown metric code");
        require(metric != kSqEuclidean || (row_norms && col_norms), "knn_tile_update: sqeuclidean needs norms");
        require(row_values || col_values, "knn_tile_update: nothing to update");
        py::gil_scoped_release release;
        auto run = [&](auto zero) {
          using T = decltype(zero);
          TileArgs<T> a{as_ptr<const T>(dots), rows, cols, ld, metric,
                        as_ptr<const T>(row_norms), as_ptr<const T>(col_norms), row_base, col_base,
                        as_ptr<const int64_t>(row_ids), as_ptr<const int64_t>(col_ids),
                        as_ptr<const int64_t>(exclude), k,
                        as_ptr<T>(row_values), as_ptr<int64_t>(row_indices),
                        as_ptr<T>(col_values), as_ptr<int64_t>(col_indices), col_first};
          tile_update(a);
        };
        if (is_double) run(double(0)); else run(float(0));
      },
      py::arg("dots"), py::arg("is_double"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("metric"),
      py::arg("row_norms"), py::arg("col_norms"), py::arg("row_base"), py::arg("col_base"), py::arg("row_ids"),
      py::arg("col_ids"), py::arg("exclude"),
      py::arg("k"), py::arg("row_values"), py::arg("row_indices"), py::arg("col_values"), py::arg("col_indices"),
      py::arg("col_first") = 0,
      "Merge one [rows x cols] tile of dot products (leading dimension ld) into per-row lists\n"
      "[rows, k] (the k smallest (value, column) pairs of each row; column = col_base + j) and,\n"
      "when col_values != 0, per-column lists [cols, k] (row = row_base + r). Lists hold values in\n"
      "the compute dtype (float64 when is_double) and int64 indices, padded with (inf, -1).\n"
      "metric: 0 sqeuclidean (row_norms, col_norms: squared norms), 1 cosine (1 - dot).\n"
      "row_ids / col_ids (0 or int64 [rows] / [cols]): ids stored (and tie-broken on) instead of\n"
      "row_base + r / col_base + j. exclude (0 or int64 [rows]): the column col_base + j each row\n"
      "must skip (-1 none). Row and column lists must not overlap in memory. col_first: columns\n"
      "j < col_first update no column list (col_values then holds the lists of columns col_first\n"
      "onwards: a self-join tile's diagonal block, whose pairs its rows' lists already see).");
  m.def(
      "knn_tile_update_blocks",
      [](std::uintptr_t dots, bool is_double, int64_t rows, int64_t ld, int metric, int64_t row_base,
         std::uintptr_t col_offsets, std::uintptr_t col_counts, std::uintptr_t col_bases, std::uintptr_t ks,
         std::uintptr_t row_values, std::uintptr_t row_indices, std::uintptr_t col_values,
         std::uintptr_t col_indices, int64_t num_blocks) {
        require(rows >= 0 && ld >= 0 && num_blocks >= 0, "knn_tile_update_blocks: bad sizes");
        require(metric == kCosine, "knn_tile_update_blocks: only the cosine metric (no norms) is supported");
        const int64_t* offsets = as_ptr<const int64_t>(col_offsets);
        const int64_t* counts = as_ptr<const int64_t>(col_counts);
        const int64_t* bases = as_ptr<const int64_t>(col_bases);
        const int64_t* list_k = as_ptr<const int64_t>(ks);
        const int64_t* rv = as_ptr<const int64_t>(row_values);
        const int64_t* ri = as_ptr<const int64_t>(row_indices);
        const int64_t* cv = as_ptr<const int64_t>(col_values);
        const int64_t* ci = as_ptr<const int64_t>(col_indices);
        for (int64_t b = 0; b < num_blocks; ++b)
          require(offsets[b] >= 0 && counts[b] >= 0 && offsets[b] + counts[b] <= ld && list_k[b] >= 0 &&
                      (rows == 0 || list_k[b] == 0 || (rv[b] && ri[b])) &&
                      (counts[b] == 0 || list_k[b] == 0 || (cv[b] && ci[b])),
                  "knn_tile_update_blocks: block " + std::to_string(b) + " is out of the tile or has no lists");
        py::gil_scoped_release release;
        auto run = [&](auto zero) {
          using T = decltype(zero);
          std::vector<TileArgs<T>> blocks;
          blocks.reserve(num_blocks);
          for (int64_t b = 0; b < num_blocks; ++b)
            blocks.push_back(TileArgs<T>{as_ptr<const T>(dots) + offsets[b], rows, counts[b], ld, metric, nullptr,
                                         nullptr, row_base, bases[b], nullptr, nullptr, nullptr, list_k[b],
                                         as_ptr<T>(std::uintptr_t(rv[b])), as_ptr<int64_t>(std::uintptr_t(ri[b])),
                                         as_ptr<T>(std::uintptr_t(cv[b])), as_ptr<int64_t>(std::uintptr_t(ci[b]))});
          tile_update_blocks(blocks);
        };
        if (is_double) run(double(0)); else run(float(0));
      },
      py::arg("dots"), py::arg("is_double"), py::arg("rows"), py::arg("ld"), py::arg("metric"), py::arg("row_base"),
      py::arg("col_offsets"), py::arg("col_counts"), py::arg("col_bases"), py::arg("ks"), py::arg("row_values"),
      py::arg("row_indices"), py::arg("col_values"), py::arg("col_indices"), py::arg("num_blocks"),
      "knn_tile_update (cosine) for num_blocks column blocks of one [rows x ld] tile, in one parallel\n"
      "region. Per block b (int64 arrays [num_blocks]): columns [col_offsets[b], + col_counts[b]) of the\n"
      "tile, stored as col_bases[b] + j; lists ks[b] wide; row_values / row_indices / col_values /\n"
      "col_indices hold the data pointers (as int64) of the block's row lists [rows, k] and column\n"
      "lists [cols, k]. Rows are stored as row_base + r. No two blocks' lists may overlap.");
  m.def(
      "knn_sort_lists",
      [](std::uintptr_t values, std::uintptr_t indices, bool is_double, int64_t num_lists, int64_t k) {
        require(num_lists >= 0 && k >= 0, "knn_sort_lists: bad sizes");
        py::gil_scoped_release release;
        if (is_double) sort_lists(as_ptr<double>(values), as_ptr<int64_t>(indices), num_lists, k);
        else sort_lists(as_ptr<float>(values), as_ptr<int64_t>(indices), num_lists, k);
      },
      py::arg("values"), py::arg("indices"), py::arg("is_double"), py::arg("num_lists"), py::arg("k"),
      "Sort each of num_lists lists [k] into ascending (value, index) order, in place\n"
      "(lists with k > 32 are heaps until then).");
  m.def(
      "knn_mutual_pairs",
      [](std::uintptr_t row_values, std::uintptr_t row_indices, int64_t num_rows, std::uintptr_t col_indices,
         int64_t num_cols, int64_t k, bool is_double, int64_t row_base, int64_t col_base, int filter,
         double threshold) -> py::tuple {
        require(num_rows >= 0 && num_cols >= 0 && k >= 0, "knn_mutual_pairs: bad sizes");
        require(filter == kNoFilter || filter == kAtMost, "knn_mutual_pairs: unknown filter code");
        if (is_double)
          return mutual_pairs(as_ptr<const double>(row_values), as_ptr<const int64_t>(row_indices), num_rows,
                              as_ptr<const int64_t>(col_indices), num_cols, k, row_base, col_base, filter, threshold);
        return mutual_pairs(as_ptr<const float>(row_values), as_ptr<const int64_t>(row_indices), num_rows,
                            as_ptr<const int64_t>(col_indices), num_cols, k, row_base, col_base, filter, threshold);
      },
      py::arg("row_values"), py::arg("row_indices"), py::arg("num_rows"), py::arg("col_indices"),
      py::arg("num_cols"), py::arg("k"), py::arg("is_double"), py::arg("row_base"), py::arg("col_base"),
      py::arg("filter"), py::arg("threshold"),
      "Mutual pairs of sorted row lists [num_rows, k] (entries: columns col_base..) and column lists\n"
      "[num_cols, k] (entries: rows row_base..): (i, j) with j in list i and i in list j, and, for\n"
      "filter 1, the value rounded to float32 <= threshold (compared in float64).\n"
      "Returns numpy (rows int64, cols int64, values in the compute dtype) sorted by (row, col).");
  m.def("knn_flat_index", &flat_index, py::arg("row"), py::arg("stride"), py::arg("col"),
        "The int64 flat offset row * stride + col every CPU kernel uses (exposed for tests).");
}

}  // namespace fastassoc
