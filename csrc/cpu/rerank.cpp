// CPU kernels of the re-ranking family (fastassoc/kernels/cpu/rerank.py): k-reciprocal
// Jaccard distance, DBSCAN on a sparse distance matrix, cluster centres.
//
// Algorithm. jaccard_distance runs in two calls, after Python has the k1-nearest lists (the
// exact lists of the knn family's self-join, fastassoc/kernels/cpu/rerank.py):
// 1. rerank_encode: per row, with the lists: reciprocal sets R(i, K) and R(i, h), the 2/3
//    expansion E(i), the weights over E(i) (SpCL softmax of -(2 - 2 x_i.x_m), or Zhong's
//    exp(-d^2 / max d^2) normalised), and query expansion (mean of the V rows of the k2
//    nearest, summed in list order in a dense per-thread row buffer). Returns V as CSR.
// 2. rerank_jaccard: V's column lists (transpose), then two passes over the rows, each row
//    accumulating m_ij = sum_k min(V_ik, V_jk) of its partners j (ascending k, as the
//    reference sums) in a dense per-thread row buffer with a bitmap of touched columns,
//    whose scan yields the partners in column order; J = 1 - m / (2 - m) clamped at 0 is
//    kept when float32 J < 1 (and <= max_distance). Pass one walks the upper triangle
//    (j > i), counts every row's pairs (its own and one for each mirrored j) and keeps the
//    pairs (8 bytes each) up to kept_budget, so the returned arrays can be allocated at their
//    final size and written from the kept pairs; past the budget pass two recomputes every
//    full row (j != i) and writes it in place, the diagonal zero included. m_ij has the same
//    bits from both ends of a pair (same terms, same order), so the matrix is exactly
//    symmetric either way.
// dbscan: neighbour counts, union-find over core-core edges, clusters numbered by their
// smallest core point, border points take the smallest cluster number among their core
// neighbours (the reference's and scikit-learn's numbering). cluster_centres: rows of
// each cluster summed in row order (the reference's index_add_ order), then divided.
//
// Determinism. Results do not depend on the thread count: every sum has a fixed order and
// every parallel loop writes disjoint outputs.
//
// Threads (issue 11, a shared CPU). Every region takes its team from region_threads() and
// its loops are schedule(dynamic) over chunks of rows, so a thread that keeps its core takes
// over the share of one that lost it; each kernel opens one region per call (rerank_jaccard:
// counting pass, allocation on one thread, writing pass).
//
// Limits. Float32 (float64 inputs: float64) arithmetic, output values float32. Memory of
// rerank_jaccard beyond its output: V twice (rows and columns), the kept pairs, one dense
// row buffer of N values plus N bits and N counts per thread. Must equal
// fastassoc/kernels/reference/rerank.py given the same lists; weights use the fixed-order
// float64 dot (screen_dot, the reference's _tiles.exact_dots bits for float32), the
// softmax within rounding of the reference's torch one.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "common.h"

namespace fastassoc {

namespace {

// Pair metrics (rerank_encode, Zhong weights): kEuclidean is the square root of kSqEuclidean.
enum Metric : int { kSqEuclidean = 0, kCosine = 1, kEuclidean = 2 };
enum Weighting : int { kSpcl = 0, kZhong = 1 };

// Work below this many elementary steps runs on one thread: the fork/join costs more.
constexpr int64_t kParallelMin = 1 << 15;
// Rows per dynamically scheduled piece of the Jaccard pass (rows differ a lot in work).
constexpr int64_t kJaccardBlock = 16;

inline int64_t flat_index(int64_t row, int64_t stride, int64_t col) { return row * stride + col; }


// Hand the C heap's free pages back to the system between passes. glibc keeps freed blocks
// below its (self-raising, up to 32 MiB) mmap threshold resident, so without this the
// temporaries of one pass stay resident under the next pass's allocations and the peak is
// their sum rather than their maximum.
void release_free_memory() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

// An exception must not leave an OpenMP region (the process would terminate): the first
// one (std::bad_alloc on a huge input, say) is kept and rethrown after the region.
// Every thread still meets the region's later worksharing constructs (skipping their bodies
// once failed() is true), as OpenMP requires.
class RegionErrors {
 public:
  template <class F>
  void run(F&& body) {
    try {
      body();
    } catch (...) {
#pragma omp critical(fastassoc_rerank_errors)
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

// ------------------------------------------------------------------ 2. encoding

// Rows of a CSR structure built in chunks of consecutive rows (a schedule(dynamic) loop over
// the chunks, so the threads that keep their cores take the work of one that lost it).
template <typename Item>
struct RowsByChunk {
  int64_t rows_per_chunk;
  std::vector<std::vector<Item>> items;   // per chunk
  std::vector<int64_t> counts;            // per row

  RowsByChunk(int64_t num_rows, int64_t chunk)
      : rows_per_chunk(chunk), items((num_rows + chunk - 1) / chunk), counts(num_rows, 0) {}

  int64_t num_chunks() const { return static_cast<int64_t>(items.size()); }
  int64_t begin(int64_t chunk) const { return chunk * rows_per_chunk; }
  int64_t end(int64_t chunk) const {
    return std::min<int64_t>(static_cast<int64_t>(counts.size()), (chunk + 1) * rows_per_chunk);
  }

  // offsets [N + 1] and the items in row order (per-chunk storage is released).
  void flatten(std::vector<int64_t>& offsets, std::vector<Item>& out) {
    const int64_t n = static_cast<int64_t>(counts.size());
    offsets.assign(n + 1, 0);
    for (int64_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + counts[i];
    out.clear();
    out.reserve(offsets[n]);
    for (auto& part : items) {
      out.insert(out.end(), part.begin(), part.end());
      std::vector<Item>().swap(part);
    }
  }
};

// R(i, w): the j among the first w entries of i's list whose own first w entries hold i, ascending.
struct Reciprocal {
  std::vector<int64_t> offsets, members;
};

// Appends R(i, w) to out; returns its size.
int64_t reciprocal_row(const int64_t* ranks, int64_t stride, int64_t w, int64_t i, std::vector<int64_t>& out) {
  const size_t first = out.size();
  for (int64_t s = 0; s < w; ++s) {
    const int64_t j = ranks[flat_index(i, stride, s)];
    const int64_t* back = ranks + flat_index(j, stride, 0);
    for (int64_t u = 0; u < w; ++u) {
      if (back[u] == i) {
        out.push_back(j);
        break;
      }
    }
  }
  std::sort(out.begin() + first, out.end());
  return static_cast<int64_t>(out.size() - first);
}

template <typename T>
inline T row_dot(const T* a, const T* b, int64_t dim);
template <>
inline float row_dot<float>(const float* a, const float* b, int64_t dim) {
  return static_cast<float>(screen_dot(a, b, dim));
}
template <>
inline double row_dot<double>(const double* a, const double* b, int64_t dim) {
  double sum = 0.0;
  for (int64_t d = 0; d < dim; ++d) sum += a[d] * b[d];
  return sum;
}

// A compressed sparse matrix by rows (or, transposed, by columns): the entries of line i are
// index[offsets[i] .. offsets[i + 1]) with their values. V is one by rows, its transpose by columns.
template <typename T>
struct Compressed {
  std::vector<int64_t> offsets, index;
  std::vector<T> values;
};

// One parallel region for the whole encoding (issue 11: every region waits for its slowest
// thread, so on a shared CPU each one can cost a descheduled thread's time slice): the
// reciprocal sets, the weighted expansion and the query expansion are chunked loops in it,
// each followed by a `single` that flattens what the next loop reads. Each row is built by
// one thread in a fixed order, so the result does not depend on the partition.
template <typename T>
Compressed<T> encode(const int64_t* ranks, int64_t n, int64_t width, int64_t half, int64_t expansion_width,
                   const T* x, int64_t dim, const T* norms, const T* farthest, int weighting, int metric) {
  const int team = region_threads(n * width * width >= kParallelMin);
  const int64_t chunk = dynamic_chunk(n, team);
  RowsByChunk<int64_t> full_rows(n, chunk), half_rows(n, chunk);
  Reciprocal full, halves;
  // Expanded sets with their weights, then (expansion_width > 0) their query expansion.
  RowsByChunk<std::pair<int64_t, T>> weighted(n, chunk), expanded(n, chunk);
  // Expanded sets, flattened, with the dot products of their weights in bucketed order.
  RowsByChunk<int64_t> expanded_sets(n, chunk);
  std::vector<int64_t> set_offsets, set_members, set_rows;
  BlockOrder dot_blocks;
  std::vector<T> member_dots;
  std::vector<int64_t> offsets;
  std::vector<std::pair<int64_t, T>> entries;
  const int64_t num_chunks = full_rows.num_chunks();
  RegionErrors errors;
#pragma omp parallel num_threads(team)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < num_chunks; ++c) errors.run([&] {
      if (errors.failed()) return;
      for (int64_t i = full_rows.begin(c); i < full_rows.end(c); ++i) {
        full_rows.counts[i] = reciprocal_row(ranks, width, width, i, full_rows.items[c]);
        half_rows.counts[i] = reciprocal_row(ranks, width, half, i, half_rows.items[c]);
      }
    });
#pragma omp single
    errors.run([&] {
      if (errors.failed()) return;
      full_rows.flatten(full.offsets, full.members);
      half_rows.flatten(halves.offsets, halves.members);
    });
    std::vector<int64_t> mark, members;
    std::vector<T> logits;
    errors.run([&] { mark.assign(n, -1); });
    // The expanded sets E(i) (sorted, unique); their weights need x_i . x_m for every member.
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < num_chunks; ++c) errors.run([&] {
      if (errors.failed()) return;
      auto& out = expanded_sets.items[c];
      for (int64_t i = expanded_sets.begin(c); i < expanded_sets.end(c); ++i) {
        const int64_t* r1 = full.members.data() + full.offsets[i];
        const int64_t r1_size = full.offsets[i + 1] - full.offsets[i];
        members.assign(r1, r1 + r1_size);
        for (int64_t s = 0; s < r1_size; ++s) mark[r1[s]] = i;
        for (int64_t s = 0; s < r1_size; ++s) {
          const int64_t c1 = r1[s];
          const int64_t* rh = halves.members.data() + halves.offsets[c1];
          const int64_t rh_size = halves.offsets[c1 + 1] - halves.offsets[c1];
          int64_t overlap = 0;
          for (int64_t u = 0; u < rh_size; ++u) overlap += mark[rh[u]] == i;
          // SpCL's "> 2/3 * len", exact in integers; tested against R(i, K), not the growing set.
          if (3 * overlap > 2 * rh_size) members.insert(members.end(), rh, rh + rh_size);
        }
        std::sort(members.begin(), members.end());
        members.erase(std::unique(members.begin(), members.end()), members.end());
        out.insert(out.end(), members.begin(), members.end());
        expanded_sets.counts[i] = static_cast<int64_t>(members.size());
      }
    });
    // The member rows are random rows of x: their dot products are cache-blocked (common.h,
    // order_by_block), as screen_rescore's.
#pragma omp single
    errors.run([&] {
      if (errors.failed()) return;
      expanded_sets.flatten(set_offsets, set_members);
      const int64_t count = static_cast<int64_t>(set_members.size());
      member_dots.resize(count);
      set_rows.resize(count);
      for (int64_t i = 0; i < n; ++i)
        std::fill(set_rows.begin() + set_offsets[i], set_rows.begin() + set_offsets[i + 1], i);
      dot_blocks = order_by_block(count, n, cache_block_rows(dim * static_cast<int64_t>(sizeof(T))),
                                  [&](int64_t e) { return set_members[e]; });
    });
    for_each_by_block(dot_blocks, team, [&](int64_t e) {
      member_dots[e] = row_dot<T>(x + flat_index(set_rows[e], dim, 0), x + flat_index(set_members[e], dim, 0), dim);
    });
#pragma omp barrier
    // Weights over E(i): SpCL's softmax of -(2 - 2 x_i . x_m), or Zhong's exp(-d^2 / max d^2).
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < num_chunks; ++c) errors.run([&] {
      if (errors.failed()) return;
      auto& out = weighted.items[c];
      for (int64_t i = weighted.begin(c); i < weighted.end(c); ++i) {
        const int64_t first = set_offsets[i];
        const int64_t size = set_offsets[i + 1] - first;
        const int64_t* row_members = set_members.data() + first;
        logits.resize(size);
        for (int64_t s = 0; s < size; ++s) {
          const int64_t m = row_members[s];
          const T dot = member_dots[first + s];
          if (weighting == kSpcl) {
            logits[s] = -(T(2) - T(2) * dot);
            continue;
          }
          T d;
          if (m == i) {
            d = T(0);
          } else if (metric == kCosine) {
            d = T(1) - dot;
          } else {
            const T squared = (norms[i] + norms[m]) - T(2) * dot;
            d = squared > T(0) ? squared : T(0);
            if (metric == kEuclidean) d = std::sqrt(d);
          }
          const T scale = farthest[i] * farthest[i];
          // A row whose distances are all 0 (every row identical) weighs its entries equally.
          logits[s] = -(scale > T(0) ? (d * d) / scale : T(0));
        }
        T shift = T(0);
        if (weighting == kSpcl) {
          shift = -std::numeric_limits<T>::infinity();
          for (int64_t s = 0; s < size; ++s) shift = logits[s] > shift ? logits[s] : shift;
        }
        T total = T(0);
        for (int64_t s = 0; s < size; ++s) {
          logits[s] = std::exp(weighting == kSpcl ? logits[s] - shift : logits[s]);
          total += logits[s];
        }
        for (int64_t s = 0; s < size; ++s) out.emplace_back(row_members[s], logits[s] / total);
        weighted.counts[i] = size;
      }
    });
#pragma omp single
    errors.run([&] {
      if (errors.failed()) return;
      weighted.flatten(offsets, entries);
    });
    std::vector<int64_t>().swap(mark);
    // Query expansion: mean of the V rows of the first expansion_width list entries.
    if (expansion_width > 0) {
      std::vector<T> sums;
      std::vector<int64_t> seen, touched;
      errors.run([&] {
        sums.assign(n, T(0));
        seen.assign(n, -1);
      });
      const T divisor = static_cast<T>(expansion_width);
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < num_chunks; ++c) errors.run([&] {
        if (errors.failed()) return;
        auto& out = expanded.items[c];
        for (int64_t i = expanded.begin(c); i < expanded.end(c); ++i) {
          touched.clear();
          for (int64_t s = 0; s < expansion_width; ++s) {
            const int64_t neighbour = ranks[flat_index(i, width, s)];
            for (int64_t e = offsets[neighbour]; e < offsets[neighbour + 1]; ++e) {
              const int64_t col = entries[e].first;
              if (seen[col] != i) {
                seen[col] = i;
                touched.push_back(col);
              }
              sums[col] += entries[e].second;
            }
          }
          std::sort(touched.begin(), touched.end());
          const size_t first = out.size();
          for (const int64_t col : touched) {
            const T mean = sums[col] / divisor;
            sums[col] = T(0);
            if (mean != T(0)) out.emplace_back(col, mean);
          }
          expanded.counts[i] = static_cast<int64_t>(out.size() - first);
        }
      });
    }
  }
  errors.rethrow();
  Compressed<T> result;
  if (expansion_width == 0) {
    result.offsets = std::move(offsets);
    result.index.resize(entries.size());
    result.values.resize(entries.size());
    for (size_t e = 0; e < entries.size(); ++e) {
      result.index[e] = entries[e].first;
      result.values[e] = entries[e].second;
    }
    return result;
  }
  std::vector<std::pair<int64_t, T>>().swap(entries);
  std::vector<std::pair<int64_t, T>> flat;
  expanded.flatten(result.offsets, flat);
  result.index.resize(flat.size());
  result.values.resize(flat.size());
  for (size_t e = 0; e < flat.size(); ++e) {
    result.index[e] = flat[e].first;
    result.values[e] = flat[e].second;
  }
  std::vector<std::pair<int64_t, T>>().swap(flat);
  release_free_memory();
  return result;
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), sizeof(T) * v.size());
  return out;
}

// ------------------------------------------------------------------ 3. Jaccard

// V's column lists: the rows holding each column, ascending, with their values.
template <typename T>
Compressed<T> transpose(const int64_t* crow, const int64_t* cols, const T* values, int64_t n) {
  const int64_t nnz = crow[n];
  Compressed<T> c;
  c.offsets.assign(n + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) ++c.offsets[cols[e] + 1];
  for (int64_t k = 0; k < n; ++k) c.offsets[k + 1] += c.offsets[k];
  c.index.resize(nnz);
  c.values.resize(nnz);
  std::vector<int64_t> cursor(c.offsets.begin(), c.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
      const int64_t at = cursor[cols[e]]++;
      c.index[at] = i;
      c.values[at] = values[e];
    }
  }
  return c;
}

// One row's overlaps m_ij in a dense buffer plus a bitmap of the touched columns j.
template <typename T>
struct RowOverlaps {
  std::vector<T> sums;
  std::vector<uint64_t> touched;
  int64_t first_word = 0, last_word = -1;

  void allocate(int64_t n) {
    sums.assign(n, T(0));
    touched.assign((n + 63) / 64, 0);
  }

  // Partners j > i (upper) or j != i (all) of row i: sum_k min(V_ik, V_jk) in ascending k,
  // the reference's order (the same terms in the same order from either end of a pair).
  void accumulate(const int64_t* crow, const int64_t* cols, const T* values, const Compressed<T>& columns, int64_t i,
                  bool upper_only) {
    first_word = std::numeric_limits<int64_t>::max();
    last_word = -1;
    const int64_t* holders = columns.index.data();
    for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
      const int64_t k = cols[e];
      const T mine = values[e];
      const int64_t end = columns.offsets[k + 1];
      int64_t p = upper_only ? std::upper_bound(holders + columns.offsets[k], holders + end, i) - holders
                             : columns.offsets[k];
      if (p >= end) continue;
      first_word = std::min(first_word, holders[p] >> 6);
      last_word = std::max(last_word, holders[end - 1] >> 6);
      for (; p < end; ++p) {
        const int64_t j = holders[p];
        const T theirs = columns.values[p];
        sums[j] += mine < theirs ? mine : theirs;
        touched[j >> 6] |= uint64_t(1) << (j & 63);
      }
    }
  }

  // Visit the stored pairs (j, float32 J) in ascending j (j == i skipped), clearing the buffer.
  template <typename Visit>
  void drain(int64_t i, bool bounded, double max_distance, Visit&& visit) {
    for (int64_t w = first_word; w <= last_word; ++w) {
      uint64_t bits = touched[w];
      touched[w] = 0;
      while (bits) {
        const int64_t j = (w << 6) + __builtin_ctzll(bits);
        bits &= bits - 1;
        const T shared = sums[j];
        sums[j] = T(0);
        if (j == i || shared == T(0)) continue;
        T distance = T(1) - shared / (T(2) - shared);
        distance = distance > T(0) ? distance : T(0);
        const float stored = static_cast<float>(distance);
        if (!(stored < 1.0f)) continue;
        if (bounded && !(static_cast<double>(stored) <= max_distance)) continue;
        visit(j, stored);
      }
    }
  }
};

// Pairs (i, j > i) of one block of kJaccardBlock rows kept by the counting pass while they
// are few: columns and float32 distances, with each row's start.
struct UpperBlock {
  std::vector<uint32_t> cols;
  std::vector<float> values;
  std::vector<int64_t> starts;
};

// Upper-triangle pairs the counting pass keeps (8 bytes each) before it stops keeping them
// and the writing pass recomputes full rows instead: max(2^22, 8 nnz(V)) pairs.
inline int64_t kept_pairs_budget(int64_t nnz) { return std::max<int64_t>(int64_t(1) << 22, 8 * nnz); }

// A malloc'd array handed to NumPy without a copy (the capsule frees it with the array).
struct MallocDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename Item>
using MallocArray = std::unique_ptr<Item[], MallocDeleter>;

template <typename Item>
MallocArray<Item> malloc_array(int64_t count) {
  void* p = std::malloc(sizeof(Item) * static_cast<size_t>(std::max<int64_t>(count, 1)));
  if (p == nullptr) throw std::bad_alloc();
  return MallocArray<Item>(static_cast<Item*>(p));
}

template <typename Item>
py::array_t<Item> to_numpy(MallocArray<Item> data, int64_t count) {
  Item* raw = data.get();
  py::capsule owner(raw, [](void* p) { std::free(p); });
  data.release();
  return py::array_t<Item>(static_cast<py::ssize_t>(count), raw, owner);
}

// Two passes over V in one parallel region. Pass one walks the upper triangle and counts
// every row's stored pairs (its own j > i, and one for each mirrored j), keeping the pairs
// themselves while they fit the budget above (a max_distance that stores few pairs); one
// thread then sums the counts and allocates the returned arrays at their final size. Pass
// two writes them: from the kept pairs (each row's own part after its diagonal zero, and the
// mirrored part from chunks of target rows that read sources in ascending i, so it comes out
// sorted), or, when too many pairs were stored to keep, by recomputing every full row
// (j != i) in column order. m_ij has the same bits from both ends of a pair, so the matrix
// is exactly symmetric either way.
template <typename T>
py::tuple jaccard(const int64_t* crow, const int64_t* cols, const T* values, int64_t n, bool bounded,
                  double max_distance, int64_t kept_budget) {
  require(n < (int64_t(1) << 32), "rerank_jaccard: more than 2^32 rows");
  const int64_t nnz = crow[n];
  const int64_t num_blocks = (n + kJaccardBlock - 1) / kJaccardBlock;
  std::vector<int64_t> counts(n, 1);   // the diagonal
  std::vector<UpperBlock> blocks(num_blocks);
  std::atomic<int64_t> kept{0};
  std::atomic<bool> keeping{true};
  const int64_t budget = kept_budget >= 0 ? kept_budget : kept_pairs_budget(nnz);
  MallocArray<int64_t> crow_array, cols_array;
  MallocArray<float> values_array;
  int64_t total = 0;
  bool consistent = true;
  {
    py::gil_scoped_release release;
    release_free_memory();
    const Compressed<T> columns = transpose(crow, cols, values, n);
    const int team = region_threads(nnz * 16 >= kParallelMin);
    const int64_t target_chunk = dynamic_chunk(n, team), num_target_chunks = (n + target_chunk - 1) / target_chunk;
    std::vector<std::vector<int64_t>> lower(team);
    bool from_kept = true;
    int64_t* crow_out = nullptr;
    int64_t* cols_out = nullptr;
    float* values_out = nullptr;
    RegionErrors errors;
#pragma omp parallel num_threads(team) reduction(&& : consistent)
    {
      RowOverlaps<T> row;
      std::vector<int64_t>* mine = &lower[omp_get_thread_num()];
      errors.run([&] {
        row.allocate(n);
        mine->assign(n, 0);
      });
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < num_blocks; ++b) errors.run([&] {
        if (errors.failed()) return;
        UpperBlock& block = blocks[b];
        const int64_t i0 = b * kJaccardBlock, i1 = std::min(n, i0 + kJaccardBlock);
        block.starts.assign(1, 0);
        for (int64_t i = i0; i < i1; ++i) {
          row.accumulate(crow, cols, values, columns, i, true);
          const bool keep = keeping.load(std::memory_order_relaxed);
          int64_t upper = 0;
          row.drain(i, bounded, max_distance, [&](int64_t j, float value) {
            ++upper;
            ++(*mine)[j];
            if (keep) {
              block.cols.push_back(static_cast<uint32_t>(j));
              block.values.push_back(value);
            }
          });
          counts[i] += upper;
          block.starts.push_back(static_cast<int64_t>(block.cols.size()));
          if (keep && kept.fetch_add(upper, std::memory_order_relaxed) + upper > budget)
            keeping.store(false, std::memory_order_relaxed);
        }
        // Growth leaves up to twice the pairs' bytes reserved (resident where the heap reuses
        // freed pages); the kept pairs then sit beside the whole result, so trim them.
        block.cols.shrink_to_fit();
        block.values.shrink_to_fit();
      });
#pragma omp single
      errors.run([&] {
        if (errors.failed()) return;
        for (const auto& part : lower) {
          if (part.empty()) continue;
          for (int64_t j = 0; j < n; ++j) counts[j] += part[j];
        }
        std::vector<std::vector<int64_t>>().swap(lower);
        from_kept = keeping.load();
        if (!from_kept) std::vector<UpperBlock>().swap(blocks);
        release_free_memory();
        crow_array = malloc_array<int64_t>(n + 1);
        crow_out = crow_array.get();
        crow_out[0] = 0;
        for (int64_t i = 0; i < n; ++i) crow_out[i + 1] = crow_out[i] + counts[i];
        total = crow_out[n];
        cols_array = malloc_array<int64_t>(total);
        values_array = malloc_array<float>(total);
        cols_out = cols_array.get();
        values_out = values_array.get();
      });
      // After the single's barrier every thread reads the same failed() and from_kept.
      if (!errors.failed() && from_kept) {
        // Own part: the diagonal zero, then the kept j > i, after the mirrored j < i (the two
        // loops write disjoint entries, hence nowait).
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t b = 0; b < num_blocks; ++b) {
          const UpperBlock& block = blocks[b];
          for (int64_t r = 0; r + 1 < static_cast<int64_t>(block.starts.size()); ++r) {
            const int64_t i = b * kJaccardBlock + r;
            int64_t at = crow_out[i + 1] - (block.starts[r + 1] - block.starts[r]) - 1;
            cols_out[at] = i;
            values_out[at++] = 0.0f;
            for (int64_t e = block.starts[r]; e < block.starts[r + 1]; ++e, ++at) {
              cols_out[at] = block.cols[e];
              values_out[at] = block.values[e];
            }
          }
        }
        // Mirrored part: each chunk of target rows reads the sources in ascending i, so its
        // rows come out sorted.
#pragma omp for schedule(dynamic, 1)
        for (int64_t target = 0; target < num_target_chunks; ++target) errors.run([&] {
          const int64_t lo = target * target_chunk, hi = std::min(n, lo + target_chunk);
          std::vector<int64_t> fill(hi - lo, 0);
          for (int64_t b = 0; b < num_blocks && b * kJaccardBlock < hi; ++b) {
            const UpperBlock& block = blocks[b];
            for (int64_t r = 0; r + 1 < static_cast<int64_t>(block.starts.size()); ++r) {
              const uint32_t* begin = block.cols.data() + block.starts[r];
              const uint32_t* end = block.cols.data() + block.starts[r + 1];
              for (const uint32_t* p = std::lower_bound(begin, end, static_cast<uint32_t>(lo)); p < end && *p < hi;
                   ++p) {
                const int64_t at = crow_out[*p] + fill[*p - lo]++;
                cols_out[at] = b * kJaccardBlock + r;
                values_out[at] = block.values[p - block.cols.data()];
              }
            }
          }
        });
      } else if (!errors.failed()) {
#pragma omp for schedule(dynamic, kJaccardBlock)
        for (int64_t i = 0; i < n; ++i) {
          if (static_cast<int64_t>(row.sums.size()) != n) continue;
          row.accumulate(crow, cols, values, columns, i, false);
          int64_t at = crow_out[i];
          const int64_t end = crow_out[i + 1];
          bool diagonal = false;
          row.drain(i, bounded, max_distance, [&](int64_t j, float value) {
            if (!diagonal && j > i && at < end) {
              cols_out[at] = i;
              values_out[at++] = 0.0f;
              diagonal = true;
            }
            if (at < end) {
              cols_out[at] = j;
              values_out[at] = value;
            }
            ++at;
          });
          if (!diagonal && at < end) {
            cols_out[at] = i;
            values_out[at++] = 0.0f;
            diagonal = true;
          }
          consistent = consistent && diagonal && at == end;
        }
      }
    }
    errors.rethrow();
  }
  require(consistent, "rerank_jaccard: internal error, the two passes over V disagree");
  return py::make_tuple(to_numpy(std::move(crow_array), n + 1), to_numpy(std::move(cols_array), total),
                        to_numpy(std::move(values_array), total));
}

// ------------------------------------------------------------------ DBSCAN, centres

int64_t find_root(std::vector<int64_t>& parent, int64_t v) {
  while (parent[v] != v) {
    parent[v] = parent[parent[v]];
    v = parent[v];
  }
  return v;
}

// One parallel region: neighbour counts (chunked, dynamic), the union-find and numbering
// on one thread, then the border points (chunked, dynamic). Every loop writes its own rows.
void dbscan(const int64_t* crow, const int64_t* cols, const uint8_t* near, int64_t n, int64_t min_samples,
            int64_t* labels) {
  std::vector<uint8_t> core(n, 0);
  std::vector<int64_t> parent(n), number(n, -1);
  const int team = region_threads(crow[n] >= kParallelMin);
  const int64_t chunk = dynamic_chunk(n, team);
#pragma omp parallel num_threads(team)
  {
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i) {
      int64_t count = 0;
      bool diagonal = false;
      for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
        count += near[e];
        diagonal |= cols[e] == i;
      }
      // A point is its own neighbour unless a stored diagonal entry exceeds eps.
      core[i] = count + (diagonal ? 0 : 1) >= min_samples;
    }
#pragma omp single
    {
      for (int64_t i = 0; i < n; ++i) parent[i] = i;
      for (int64_t i = 0; i < n; ++i) {
        if (!core[i]) continue;
        for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
          const int64_t j = cols[e];
          if (!near[e] || j <= i || !core[j]) continue;   // symmetric: each edge once
          const int64_t a = find_root(parent, i), b = find_root(parent, j);
          if (a != b) parent[std::max(a, b)] = std::min(a, b);
        }
      }
      // Clusters numbered in the order of their smallest core point.
      int64_t next = 0;
      for (int64_t i = 0; i < n; ++i) {
        labels[i] = -1;
        if (!core[i]) continue;
        const int64_t root = find_root(parent, i);
        if (number[root] < 0) number[root] = next++;
        labels[i] = number[root];
      }
    }
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i) {
      if (core[i]) continue;
      int64_t best = -1;
      for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
        const int64_t j = cols[e];
        if (!near[e] || !core[j]) continue;
        // labels[j] of a core point is final (this loop writes non-core points only).
        if (best < 0 || labels[j] < best) best = labels[j];
      }
      labels[i] = best;
    }
  }
}

template <typename T>
void centres(const T* x, int64_t n, int64_t dim, const int64_t* labels, int64_t num_clusters, T* out) {
  // Members of every cluster in row order (counting sort), so each sum runs in row order.
  std::vector<int64_t> offsets(num_clusters + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (labels[i] >= 0) ++offsets[labels[i] + 1];
  for (int64_t c = 0; c < num_clusters; ++c) offsets[c + 1] += offsets[c];
  std::vector<int64_t> members(offsets[num_clusters]), cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    if (labels[i] >= 0) members[cursor[labels[i]]++] = i;
  const int team = region_threads(n * dim >= kParallelMin);
#pragma omp parallel for num_threads(team) schedule(dynamic, dynamic_chunk(num_clusters, team))
  for (int64_t c = 0; c < num_clusters; ++c) {
    T* row = out + flat_index(c, dim, 0);
    std::fill(row, row + dim, T(0));
    for (int64_t p = offsets[c]; p < offsets[c + 1]; ++p) {
      const T* source = x + flat_index(members[p], dim, 0);
      for (int64_t d = 0; d < dim; ++d) row[d] += source[d];
    }
    const T count = static_cast<T>(std::max<int64_t>(1, offsets[c + 1] - offsets[c]));
    for (int64_t d = 0; d < dim; ++d) row[d] /= count;
  }
}

}  // namespace

void register_cpu_rerank(py::module_& m) {
  m.def(
      "rerank_encode",
      [](std::uintptr_t ranks, int64_t n, int64_t width, int64_t half, int64_t expansion_width, std::uintptr_t x,
         bool is_double, int64_t dim, std::uintptr_t norms, std::uintptr_t farthest, int weighting,
         int metric) -> py::tuple {
        require(n >= 1 && width >= 1 && width <= n && half >= 1 && half <= width && expansion_width >= 0 &&
                    expansion_width <= width && dim >= 0,
                "rerank_encode: bad sizes");
        require(weighting == kSpcl || weighting == kZhong, "rerank_encode: unknown weighting");
        require(weighting == kSpcl || farthest, "rerank_encode: zhong weights need farthest");
        require(weighting == kSpcl || metric == kCosine || norms, "rerank_encode: zhong distances need norms");
        auto run = [&](auto zero) -> py::tuple {
          using T = decltype(zero);
          Compressed<T> v;
          {
            py::gil_scoped_release release;
            v = encode<T>(as_ptr<const int64_t>(ranks), n, width, half, expansion_width, as_ptr<const T>(x), dim,
                          as_ptr<const T>(norms), as_ptr<const T>(farthest), weighting, metric);
          }
          return py::make_tuple(to_numpy(v.offsets), to_numpy(v.index), to_numpy(v.values));
        };
        return is_double ? run(double(0)) : run(float(0));
      },
      py::arg("ranks"), py::arg("n"), py::arg("width"), py::arg("half"), py::arg("expansion_width"), py::arg("x"),
      py::arg("is_double"), py::arg("dim"), py::arg("norms"), py::arg("farthest"), py::arg("weighting"),
      py::arg("metric"),
      "k-reciprocal encoding V from the nearest lists ranks [n, width]: R(i, width), R(i, half),\n"
      "the 2/3 expansion, weights (0 SpCL softmax of -(2 - 2 x_i.x_m); 1 Zhong exp(-d^2 / farthest^2)\n"
      "normalised, metric 0 sqeuclidean with norms, 1 cosine, 2 euclidean) and, when\n"
      "expansion_width > 0, the mean over the first expansion_width list entries. Returns numpy\n"
      "(crow int64 [n + 1], cols int64, values) with columns sorted per row.");
  m.def(
      "rerank_jaccard",
      [](std::uintptr_t crow, std::uintptr_t cols, std::uintptr_t values, bool is_double, int64_t n, bool bounded,
         double max_distance, int64_t kept_budget) -> py::tuple {
        require(n >= 1, "rerank_jaccard: bad sizes");
        if (is_double)
          return jaccard(as_ptr<const int64_t>(crow), as_ptr<const int64_t>(cols), as_ptr<const double>(values), n,
                         bounded, max_distance, kept_budget);
        return jaccard(as_ptr<const int64_t>(crow), as_ptr<const int64_t>(cols), as_ptr<const float>(values), n,
                       bounded, max_distance, kept_budget);
      },
      py::arg("crow"), py::arg("cols"), py::arg("values"), py::arg("is_double"), py::arg("n"), py::arg("bounded"),
      py::arg("max_distance"), py::arg("kept_budget") = -1,
      "Jaccard distances J = max(1 - m / (2 - m), 0), m_ij = sum_k min(V_ik, V_jk), of the CSR V\n"
      "(columns sorted per row): numpy (crow int64 [n + 1], cols int64, values float32) of the\n"
      "symmetric matrix holding every pair with float32 J < 1 (and, when bounded, J <= max_distance\n"
      "in float64) plus the diagonal as explicit zeros, columns sorted per row. kept_budget: upper-\n"
      "triangle pairs the counting pass may keep for the writing pass (beyond it, full rows are\n"
      "recomputed instead); -1: max(2^22, 8 nnz(V)).");
  m.def(
      "rerank_dbscan",
      [](std::uintptr_t crow, std::uintptr_t cols, std::uintptr_t near, int64_t n, int64_t min_samples,
         std::uintptr_t labels) {
        require(n >= 0 && min_samples >= 1, "rerank_dbscan: bad sizes");
        py::gil_scoped_release release;
        dbscan(as_ptr<const int64_t>(crow), as_ptr<const int64_t>(cols), as_ptr<const uint8_t>(near), n,
               min_samples, as_ptr<int64_t>(labels));
      },
      py::arg("crow"), py::arg("cols"), py::arg("near"), py::arg("n"), py::arg("min_samples"), py::arg("labels"),
      "DBSCAN labels [n] (int64, -1 noise) of a symmetric CSR matrix whose entries e with near[e] != 0\n"
      "(uint8) are neighbours; an unstored diagonal counts as a neighbour. Clusters numbered by their\n"
      "smallest core point; a border point takes the smallest number among its core neighbours.");
  m.def(
      "rerank_cluster_centres",
      [](std::uintptr_t x, bool is_double, int64_t n, int64_t dim, std::uintptr_t labels, int64_t num_clusters,
         std::uintptr_t out) {
        require(n >= 0 && dim >= 0 && num_clusters >= 0, "rerank_cluster_centres: bad sizes");
        py::gil_scoped_release release;
        if (is_double)
          centres(as_ptr<const double>(x), n, dim, as_ptr<const int64_t>(labels), num_clusters, as_ptr<double>(out));
        else
          centres(as_ptr<const float>(x), n, dim, as_ptr<const int64_t>(labels), num_clusters, as_ptr<float>(out));
      },
      py::arg("x"), py::arg("is_double"), py::arg("n"), py::arg("dim"), py::arg("labels"), py::arg("num_clusters"),
      py::arg("out"),
      "Means [num_clusters, dim] of the rows of x [n, dim] per label in [0, num_clusters) (-1 ignored),\n"
      "summed in row order; a cluster without rows is all zeros.");
}

}  // namespace fastassoc
