// In-place EMA update of a memory bank (DAL Eq. 1, UTAL Eq. 3, TSSL Eq. 6).
//
// Must equal fastassoc/kernels/reference/memory.py::ema_update_reference:
//   mean / sum:  bank[i] <- m bank[i] + (1 - m) reduce(values b with index[b] = i)
//   sequential:  one such update per b, in index order
// with, when `normalize`, values L2-normalised first and the row after every update
// (x / max(|x|, 1e-12), as torch.nn.functional.normalize).
//
// Algorithm: the positions of `index` are grouped by row with a stable counting sort
// (or a stable comparison sort when the bank is much larger than the batch, so the
// work stays O(B log B) rather than O(M)); the groups, one per distinct row, are then
// updated in parallel. Each row is written by exactly one thread and its values are
// visited in index order, so duplicates are deterministic and the result does not
// depend on the thread count. Arithmetic is in double for the float32 and float64
// instantiations (squared norms and sums), rounded to the bank type on store;
// float16/bfloat16 banks are handled by the Python launcher on a float32 copy of the
// touched rows.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.h"

namespace fastassoc {
namespace {

enum Reduce : int { kMean = 0, kSum = 1, kSequential = 2 };

constexpr double kNormEps = 1e-12;

// Below this many value entries a parallel region costs more than it saves (a few flops
// per entry; on a loaded machine a descheduled worker can stall a region for a time slice).
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

// Positions 0..B-1 grouped by index value, stable; group g covers
// order[starts[g] : starts[g + 1]].
void group_by_row(const int64_t* index, int64_t num_values, int64_t num_rows, std::vector<int64_t>& order,
                  std::vector<int64_t>& starts) {
  order.resize(num_values);
  starts.clear();
  if (num_values == 0) {
    starts.push_back(0);
    return;
  }
  if (num_rows <= 8 * num_values + 4096) {
    std::vector<int64_t> count(num_rows + 1, 0);
    for (int64_t b = 0; b < num_values; ++b) ++count[index[b] + 1];
    for (int64_t r = 0; r < num_rows; ++r) count[r + 1] += count[r];
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    for (int64_t b = 0; b < num_values; ++b) order[next[index[b]]++] = b;
  } else {
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [index](int64_t a, int64_t b) { return index[a] < index[b]; });
  }
  starts.push_back(0);
  for (int64_t p = 1; p < num_values; ++p) {
    if (index[order[p]] != index[order[p - 1]]) starts.push_back(p);
  }
  starts.push_back(num_values);
}

// Normalisation divides by max(|x|, eps), as torch's normalize: multiplying by the
// reciprocal is not exact (49 * (1 / 49) != 1), so values of opposite directions would not
// cancel to the exact zero they give in the reference.
inline double row_norm(const double* x, int64_t dim) {
  double squared = 0.0;
  for (int64_t d = 0; d < dim; ++d) squared += x[d] * x[d];
  return std::max(std::sqrt(squared), kNormEps);
}

template <typename T>
inline double value_norm(const T* v, int64_t dim, bool normalize) {
  if (!normalize) return 1.0;
  double squared = 0.0;
  for (int64_t d = 0; d < dim; ++d) squared += double(v[d]) * double(v[d]);
  return std::max(std::sqrt(squared), kNormEps);
}

template <typename T>
void ema_update(T* bank, int64_t num_rows, int64_t dim, const int64_t* index, int64_t num_values, const T* values,
                double momentum, bool normalize, int reduce) {
  std::vector<int64_t> order, starts;
  group_by_row(index, num_values, num_rows, order, starts);
  const int64_t num_groups = static_cast<int64_t>(starts.size()) - 1;
  const double keep = momentum, blend = 1.0 - momentum;

  const int team = region_threads(num_values * dim >= kMinParallelWork);
#pragma omp parallel num_threads(team)
  {
    std::vector<double> row(dim), total(dim);
#pragma omp for schedule(dynamic, dynamic_chunk(num_groups, team))
    for (int64_t g = 0; g < num_groups; ++g) {
      T* bank_row = bank + index[order[starts[g]]] * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = double(bank_row[d]);
      if (reduce == kSequential) {
        for (int64_t p = starts[g]; p < starts[g + 1]; ++p) {
          const T* v = values + order[p] * dim;
          const double n = value_norm(v, dim, normalize);
          for (int64_t d = 0; d < dim; ++d) row[d] = keep * row[d] + blend * (double(v[d]) / n);
          if (normalize) {
            const double norm = row_norm(row.data(), dim);
            for (int64_t d = 0; d < dim; ++d) row[d] /= norm;
          }
        }
      } else {
        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t p = starts[g]; p < starts[g + 1]; ++p) {
          const T* v = values + order[p] * dim;
          const double n = value_norm(v, dim, normalize);
          for (int64_t d = 0; d < dim; ++d) total[d] += double(v[d]) / n;
        }
        const double divisor = reduce == kMean ? double(starts[g + 1] - starts[g]) : 1.0;
        for (int64_t d = 0; d < dim; ++d) row[d] = keep * row[d] + blend * (total[d] / divisor);
        if (normalize) {
          const double norm = row_norm(row.data(), dim);
          for (int64_t d = 0; d < dim; ++d) row[d] /= norm;
        }
      }
      for (int64_t d = 0; d < dim; ++d) bank_row[d] = static_cast<T>(row[d]);
    }
  }
}

template <typename T>
void bind_ema(py::module_& m, const char* name) {
  m.def(
      name,
      [](std::uintptr_t bank, int64_t num_rows, int64_t dim, std::uintptr_t index, int64_t num_values,
         std::uintptr_t values, double momentum, bool normalize, int reduce) {
        require(num_rows >= 0 && dim >= 0 && num_values >= 0, "ema_update: negative size");
        require(reduce >= kMean && reduce <= kSequential, "ema_update: reduce code must be 0, 1 or 2");
        const int64_t* index_ptr = as_ptr<const int64_t>(index);
        for (int64_t b = 0; b < num_values; ++b) {
          require(index_ptr[b] >= 0 && index_ptr[b] < num_rows, "ema_update: index out of range");
        }
        py::gil_scoped_release release;
        ema_update<T>(as_ptr<T>(bank), num_rows, dim, index_ptr, num_values, as_ptr<const T>(values), momentum,
                      normalize, reduce);
      },
      py::arg("bank"), py::arg("num_rows"), py::arg("dim"), py::arg("index"), py::arg("num_values"),
      py::arg("values"), py::arg("momentum"), py::arg("normalize"), py::arg("reduce"),
      "In-place EMA of bank rows [num_rows, dim] (contiguous) from values [num_values, dim] at int64 index; "
      "reduce: 0 mean, 1 sum, 2 sequential. Deterministic with duplicate indices.");
}

}  // namespace

void register_cpu_memory(py::module_& m) {
  bind_ema<float>(m, "ema_update_f32");
  bind_ema<double>(m, "ema_update_f64");
}

}  // namespace fastassoc
