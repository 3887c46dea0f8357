// Segmented soft cross-entropy (UTAL Eq. 7, UGA Eq. 8, EEA Eq. 10, TSSL Eq. 7).
//
// Must equal fastassoc/kernels/reference/loss.py::segmented_cross_entropy_reference
// within float32 rounding:
//   z_bj = scale * f_b . w_j,   L = (1/B) sum_b sum_j t_bj (lse_{seg(j)}(z_b) - z_bj).
//
// The launcher walks [rows x classes] tiles (at most tile_elements logits) and fills
// each with the inner products f_b . w_j from torch's GEMM; these passes do the rest
// in place, OpenMP over rows shared dynamically (each row is one thread's, and the rows'
// losses are summed in row order after the pass, so results do not depend on the thread
// count or the partition):
//
// forward   per (row, segment) an online logsumexp: the tile's maximum m_t and
//           sum exp(z - m_t) merge into the running (max, sum) of earlier column tiles;
//           the row's target logits sum_j t_bj z_bj are read from the same tile through
//           the CSR targets. Only O(B S) state survives a tile.
// finish    lse = max + log(sum); per row sum_j t_bj lse_{seg(j)} - sum_j t_bj z_bj,
//           and the target mass per (row, segment) tsum_bs.
// backward  the tile (recomputed by the launcher, or kept from the forward pass when one
//           tile covers the whole batch) becomes scale * dL/dz =
//           scale * g / B * (tsum_{b,seg(j)} softmax_seg(z_b)_j - t_bj), ready for the two
//           GEMMs grad_f += G W, grad_w += G^T F.
//
// Sums (exp sums, target terms, the loss) accumulate in double; z and exp in the
// compute type (float32, or float64 for float64 inputs). Segments without targets
// contribute nothing (their lse is never needed, so empty segments are harmless).
// Target columns are located by binary search in the segment offsets (int64).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace fastassoc {
namespace {

// Below this many tile entries a parallel region costs more than it saves (and on a
// loaded machine a descheduled worker can stall it for a time slice).
constexpr int64_t kMinParallelWork = int64_t{1} << 15;

struct Targets {
  const int64_t* crow;     // [B+1]
  const int64_t* columns;  // [nnz]
};

inline int64_t segment_of(const int64_t* offsets, int64_t num_segments, int64_t column) {
  // Last segment whose start is <= column: the non-empty segment that holds it.
  return static_cast<int64_t>(std::upper_bound(offsets, offsets + num_segments + 1, column) - offsets) - 1;
}

template <typename T>
void forward_tile(T* tile, int64_t num_rows, int64_t num_cols, int64_t row0, int64_t col0, T scale,
                  Targets targets, const T* values, const int64_t* offsets, int64_t num_segments, T* segment_max,
                  double* segment_sum, double* target_logits) {
  const int64_t col1 = col0 + num_cols;
  const int64_t first_segment = segment_of(offsets, num_segments, col0);
  // Each row is one thread's (its sums run in a fixed order), so the rows are shared
  // dynamically: a thread that keeps its core takes over the rows of one that lost it.
  const int team = region_threads(num_rows * num_cols >= kMinParallelWork);
#pragma omp parallel for num_threads(team) schedule(dynamic, dynamic_chunk(num_rows, team))
  for (int64_t r = 0; r < num_rows; ++r) {
    T* z = tile + r * num_cols;
    for (int64_t c = 0; c < num_cols; ++c) z[c] = z[c] * scale;
    const int64_t b = row0 + r;
    for (int64_t s = first_segment; s < num_segments && offsets[s] < col1; ++s) {
      const int64_t lo = std::max(offsets[s], col0) - col0, hi = std::min(offsets[s + 1], col1) - col0;
      if (lo >= hi) continue;
      T tile_max = z[lo];
      for (int64_t c = lo + 1; c < hi; ++c) tile_max = z[c] > tile_max ? z[c] : tile_max;
      double tile_sum = 0.0;
      for (int64_t c = lo; c < hi; ++c) tile_sum += double(std::exp(z[c] - tile_max));
      T& running_max = segment_max[b * num_segments + s];
      double& running_sum = segment_sum[b * num_segments + s];
      if (tile_max > running_max) {
        running_sum = running_sum * double(std::exp(running_max - tile_max)) + tile_sum;
        running_max = tile_max;
      } else {
        running_sum += tile_sum * double(std::exp(tile_max - running_max));
      }
    }
    double dot = 0.0;
    for (int64_t e = targets.crow[b]; e < targets.crow[b + 1]; ++e) {
      const int64_t column = targets.columns[e];
      if (column >= col0 && column < col1) dot += double(values[e]) * double(z[column - col0]);
    }
    target_logits[b] += dot;
  }
}

// Returns sum_b loss_b (before the 1/B); writes lse [B, S] and tsum [B, S]. The rows' losses
// are summed afterwards in row order (not by an OpenMP reduction, whose order follows the
// team), so the total does not depend on the thread count and the rows can be shared
// dynamically.
template <typename T>
double finish(int64_t num_rows, Targets targets, const T* values, const int64_t* offsets, int64_t num_segments,
              const T* segment_max, const double* segment_sum, const double* target_logits, T* lse, T* tsum) {
  std::vector<double> row_losses(num_rows);
  const int team = region_threads(num_rows * num_segments + (targets.crow[num_rows] - targets.crow[0]) >= kMinParallelWork);
#pragma omp parallel for num_threads(team) schedule(dynamic, dynamic_chunk(num_rows, team))
  for (int64_t b = 0; b < num_rows; ++b) {
    for (int64_t s = 0; s < num_segments; ++s) {
      const int64_t at = b * num_segments + s;
      lse[at] = segment_sum[at] > 0.0 ? T(double(segment_max[at]) + std::log(segment_sum[at]))
                                      : -std::numeric_limits<T>::infinity();
      tsum[at] = T(0);
    }
    double row_loss = -target_logits[b];
    for (int64_t e = targets.crow[b]; e < targets.crow[b + 1]; ++e) {
      const int64_t s = segment_of(offsets, num_segments, targets.columns[e]);
      tsum[b * num_segments + s] += values[e];
      row_loss += double(values[e]) * double(lse[b * num_segments + s]);
    }
    row_losses[b] = row_loss;
  }
  double total = 0.0;
  for (int64_t b = 0; b < num_rows; ++b) total += row_losses[b];
  return total;
}

// `holds_logits`: the tile already holds z (kept from the forward pass) instead of f.w.
template <typename T>
void backward_tile(T* tile, int64_t num_rows, int64_t num_cols, int64_t row0, int64_t col0, T scale,
                   Targets targets, const T* values, const int64_t* offsets, int64_t num_segments, const T* lse,
                   const T* tsum, double factor, bool holds_logits) {
  const int64_t col1 = col0 + num_cols;
  const int64_t first_segment = segment_of(offsets, num_segments, col0);
  // dL/d(dot) = scale * dL/dz, folded into one multiplier.
  const T gain = T(factor * double(scale));
  const T logit_scale = holds_logits ? T(1) : scale;
  const int team = region_threads(num_rows * num_cols >= kMinParallelWork);
#pragma omp parallel for num_threads(team) schedule(dynamic, dynamic_chunk(num_rows, team))
  for (int64_t r = 0; r < num_rows; ++r) {
    T* g = tile + r * num_cols;
    const int64_t b = row0 + r;
    for (int64_t s = first_segment; s < num_segments && offsets[s] < col1; ++s) {
      const int64_t lo = std::max(offsets[s], col0) - col0, hi = std::min(offsets[s + 1], col1) - col0;
      if (lo >= hi) continue;
      const T mass = tsum[b * num_segments + s];
      if (mass == T(0)) {
        std::fill(g + lo, g + hi, T(0));
        continue;
      }
      const T log_partition = lse[b * num_segments + s], weight = gain * mass;
      for (int64_t c = lo; c < hi; ++c) g[c] = weight * std::exp(g[c] * logit_scale - log_partition);
    }
    for (int64_t e = targets.crow[b]; e < targets.crow[b + 1]; ++e) {
      const int64_t column = targets.columns[e];
      if (column >= col0 && column < col1) g[column - col0] -= gain * values[e];
    }
  }
}

template <typename T>
void bind(py::module_& m, const std::string& suffix) {
  m.def(("sce_forward_tile_" + suffix).c_str(),
        [](std::uintptr_t tile, int64_t num_rows, int64_t num_cols, int64_t row0, int64_t col0, double scale,
           std::uintptr_t crow, std::uintptr_t columns, std::uintptr_t values, std::uintptr_t offsets,
           int64_t num_segments, std::uintptr_t segment_max, std::uintptr_t segment_sum,
           std::uintptr_t target_logits) {
          require(num_rows >= 0 && num_cols >= 0 && num_segments >= 1, "segmented_cross_entropy: bad tile size");
          py::gil_scoped_release release;
          forward_tile<T>(as_ptr<T>(tile), num_rows, num_cols, row0, col0, T(scale),
                          Targets{as_ptr<const int64_t>(crow), as_ptr<const int64_t>(columns)},
                          as_ptr<const T>(values), as_ptr<const int64_t>(offsets), num_segments,
                          as_ptr<T>(segment_max), as_ptr<double>(segment_sum), as_ptr<double>(target_logits));
        },
        "Forward pass over one tile of inner products [num_rows, num_cols] (rows row0.., classes col0..; "
        "scaled in place to logits): online per-(row, segment) max/sum-exp and target logits.");
  m.def(("sce_finish_" + suffix).c_str(),
        [](int64_t num_rows, std::uintptr_t crow, std::uintptr_t columns, std::uintptr_t values,
           std::uintptr_t offsets, int64_t num_segments, std::uintptr_t segment_max, std::uintptr_t segment_sum,
           std::uintptr_t target_logits, std::uintptr_t lse, std::uintptr_t tsum) {
          require(num_rows >= 0 && num_segments >= 1, "segmented_cross_entropy: bad size");
          py::gil_scoped_release release;
          return finish<T>(num_rows, Targets{as_ptr<const int64_t>(crow), as_ptr<const int64_t>(columns)},
                           as_ptr<const T>(values), as_ptr<const int64_t>(offsets), num_segments,
                           as_ptr<const T>(segment_max), as_ptr<const double>(segment_sum),
                           as_ptr<const double>(target_logits), as_ptr<T>(lse), as_ptr<T>(tsum));
        },
        "Per-(row, segment) logsumexp and target mass; returns the summed row losses (float).");
  m.def(("sce_backward_tile_" + suffix).c_str(),
        [](std::uintptr_t tile, int64_t num_rows, int64_t num_cols, int64_t row0, int64_t col0, double scale,
           std::uintptr_t crow, std::uintptr_t columns, std::uintptr_t values, std::uintptr_t offsets,
           int64_t num_segments, std::uintptr_t lse, std::uintptr_t tsum, double factor, bool holds_logits) {
          require(num_rows >= 0 && num_cols >= 0 && num_segments >= 1, "segmented_cross_entropy: bad tile size");
          py::gil_scoped_release release;
          backward_tile<T>(as_ptr<T>(tile), num_rows, num_cols, row0, col0, T(scale),
                           Targets{as_ptr<const int64_t>(crow), as_ptr<const int64_t>(columns)},
                           as_ptr<const T>(values), as_ptr<const int64_t>(offsets), num_segments,
                           as_ptr<const T>(lse), as_ptr<const T>(tsum), factor, holds_logits);
        },
        "Backward pass over one tile of inner products (recomputed; or the forward's logits when "
        "holds_logits): overwritten with scale * factor * (tsum * softmax - targets), the gradient "
        "w.r.t. the inner products.");
}

}  // namespace

void register_cpu_loss(py::module_& m) {
  bind<float>(m, "f32");
  bind<double>(m, "f64");
}

}  // namespace fastassoc
