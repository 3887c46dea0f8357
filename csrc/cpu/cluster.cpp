// One greedy agglomerative merging step (TSSL Eq. 8, BUC, centroid linkage).
//
// Must equal fastassoc/kernels/reference/cluster.py::agglomerative_merge_reference:
// cluster pairs i < j ordered by (linkage, i, j), walked greedily with a union-find
// until num_merges merges, labels renumbered by first appearance.
//
// Points and tiles. The launcher hands over "points" sorted by cluster: the cluster
// means (centroid, tssl; one point per cluster) or the samples (buc), their squared
// norms, and a callback that writes the inner products of points [r0, r1) with points
// [c0, P) into a reused buffer with torch's GEMM and returns its address. Only the
// upper triangle is requested: a row block of whole clusters against every point from
// its first cluster on (a cluster too large for one tile is split into row pieces
// against the later clusters, its cluster-pair minimum kept across pieces). Tiles hold
// at most max(tile_elements, P) products.
//
// Per tile (OpenMP over row clusters): squared distance (|p|^2 + |q|^2) - 2 p.q clamped
// at 0 (the formula every backend shares); buc and buc_l2 reduce it to the cluster-pair
// minimum; D = its square root, taken by a launcher callback with torch's sqrt (torch's
// float sqrt is not always correctly rounded; the reference's values and ties need its
// bits), except for buc, which ranks the squared minimum D2 itself (the public BUC code).
// Linkages:
//   centroid  D
//   buc       D2 + size_penalty * (|C_i| + |C_j|)   (squared, as BUC's code ranks pairs)
//   buc_l2    D + size_penalty * (|C_i| + |C_j|)
//   tssl      D + exp(2 D - (a_i + a_j)),  a_i = (ascending sum of the k smallest D_il) / k
//   tssl_typeset  (D + exp(2 D)) - (a_i + a_j)   (Eq. 8 as typeset; same a_i)
//
// Streaming selection. Each scan keeps the `capacity` smallest pairs strictly after
// the last pair walked: per-thread buffers grow to 2 x capacity, then nth_element cuts
// them back to capacity and their largest kept pair becomes the thread's rejection
// threshold. The merged buffer is sorted by (linkage, i, j) and walked; if it runs out
// before num_merges merges, the scan is repeated after its last pair with the
// capacity doubled (at most max(tile_elements, capacity)), exactly as the reference.
// The selected set depends only on the total order, never on threads or tiles.
//
// tssl and tssl_typeset need every a_i before any linkage is known. Its first GEMM pass therefore
// offers no pairs: it collects each cluster's `depth` (>= neighbours) nearest clusters
// by (D, index) (one list per cluster: a row pass feeds row i's list, then a column
// pass over the same tile, threads owning blocks of columns, feeds the lists of j > i),
// from which a_i follows. The pairs in those lists are the candidates.
// A pair in no list has D_ij >= thr_i and >= thr_j (the lists' last distances), and
// fl(D + exp(fl(2D - fl(a_i + a_j)))) (and tssl_typeset's fl(fl(D + exp(2D)) - fl(a_i + a_j)))
// is monotone in D and in -a_j, so its linkage is at least lb_i, the linkage at
// D = thr_i with a_j = max a, and at least the second smallest
// lb over all clusters. Candidates below that bound are exactly the start of the global
// order and are walked at once; only when they do not give num_merges merges does a
// second pass (a streaming scan by linkage, after the last pair walked) run.
//
// Regions (issue 11, a shared CPU: each region waits for its slowest thread). Every region
// takes its team from region_threads() (counted by parallel_regions()) and shares its rows
// dynamically in dynamic_chunk pieces. A tile above kMinParallelWork opens two: the squared
// distances, then (after the sqrt callback) linkages, pair offers and both nearest-list
// passes together; tssl's pair scans add one for the exponents before the exp callback.
// The torch callbacks (GEMM, sqrt, exp) run between regions, with every core to themselves.
// A call opens those per tile of each GEMM pass, so the count grows with the passes
// (capacity doubling) and the tiles, not with the merges walked.
//
// Limits: float32 or float64 (the launcher casts other dtypes to float32); cluster and
// point counts are int64 throughout. exp overflow gives linkage +inf; such pairs tie and
// fall back to (i, j) order, as in the reference. sqrt and exp are torch's (launcher
// callbacks on whole blocks), so the linkages carry the reference's bits.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"

namespace fastassoc {
namespace {

enum Linkage : int { kCentroid = 0, kTssl = 1, kBuc = 2, kBucL2 = 3, kTsslTypeset = 4 };

// The two readings of TSSL Eq. 8: both need the neighbour densities a_i first.
inline bool is_tssl(int linkage) { return linkage == kTssl || linkage == kTsslTypeset; }

// Below this many tile entries a parallel region costs more than it saves (and on a
// loaded machine a descheduled worker can stall it for a time slice).
constexpr int64_t kMinParallelWork = int64_t{1} << 15;

template <typename T>
struct Pair {
  T key;
  int64_t i;
  int64_t j;
};

template <typename T>
inline bool pair_less(const Pair<T>& a, const Pair<T>& b) {
  if (a.key != b.key) return a.key < b.key;
  if (a.i != b.i) return a.i < b.i;
  return a.j < b.j;
}

// The `capacity` smallest pairs offered to one thread (between compactions up to 2x).
template <typename T>
class PairBuffer {
 public:
  void reset(size_t capacity) {
    capacity_ = std::max<size_t>(capacity, 1);
    items_.clear();
    full_ = false;
    dropped_ = false;
  }
  // Keys above limit() are rejected at once; offer() makes the exact (key, i, j) decision.
  inline T limit() const { return full_ ? worst_.key : std::numeric_limits<T>::infinity(); }
  inline void offer(const Pair<T>& pair) {
    if (full_ && !pair_less(pair, worst_)) {
      dropped_ = true;
      return;
    }
    items_.push_back(pair);
    if (items_.size() >= 2 * capacity_) compact();
  }
  void compact() {
    if (items_.size() <= capacity_) return;
    std::nth_element(items_.begin(), items_.begin() + (capacity_ - 1), items_.end(), pair_less<T>);
    items_.resize(capacity_);
    worst_ = items_[capacity_ - 1];
    full_ = true;
    dropped_ = true;
  }
  std::vector<Pair<T>>& items() { return items_; }
  bool dropped() const { return dropped_; }

 private:
  std::vector<Pair<T>> items_;
  Pair<T> worst_{};
  size_t capacity_ = 1;
  bool full_ = false;
  bool dropped_ = false;
};

// k smallest (distance, index) per cluster, ascending; slot k-1 is the worst kept.
// `worst` repeats each list's last distance contiguously, so that the test that
// rejects almost every candidate touches one cache line per 16 clusters.
template <typename T>
struct NearestLists {
  int64_t k = 0;
  std::vector<T> distance;
  std::vector<int64_t> index;
  std::vector<T> worst;
  void reset(int64_t num_clusters, int64_t k_) {
    k = k_;
    distance.assign(num_clusters * k, std::numeric_limits<T>::infinity());
    index.assign(num_clusters * k, std::numeric_limits<int64_t>::max());
    worst.assign(num_clusters, std::numeric_limits<T>::infinity());
  }
  inline void offer(int64_t cluster, T d, int64_t other) {
    if (d > worst[cluster]) return;
    T* dist = distance.data() + cluster * k;
    int64_t* idx = index.data() + cluster * k;
    if (!(d < dist[k - 1] || (d == dist[k - 1] && other < idx[k - 1]))) return;
    int64_t slot = k - 1;
    while (slot > 0 && (d < dist[slot - 1] || (d == dist[slot - 1] && other < idx[slot - 1]))) {
      dist[slot] = dist[slot - 1];
      idx[slot] = idx[slot - 1];
      --slot;
    }
    dist[slot] = d;
    idx[slot] = other;
    worst[cluster] = dist[k - 1];
  }
};

class UnionFind {
 public:
  explicit UnionFind(int64_t n) : parent_(n) { std::iota(parent_.begin(), parent_.end(), int64_t{0}); }
  int64_t find(int64_t node) {
    while (parent_[node] != node) {
      parent_[node] = parent_[parent_[node]];
      node = parent_[node];
    }
    return node;
  }
  bool unite(int64_t a, int64_t b) {
    a = find(a);
    b = find(b);
    if (a == b) return false;
    parent_[std::max(a, b)] = std::min(a, b);
    return true;
  }

 private:
  std::vector<int64_t> parent_;
};

struct Problem {
  int64_t num_points = 0;           // P
  int64_t num_clusters = 0;         // C
  const int64_t* cluster_start;     // [C+1], points of cluster c: [start[c], start[c+1])
  bool identity = false;            // one point per cluster (P == C)
  int linkage = kCentroid;
  int64_t neighbours = 1;
  double size_penalty = 0.0;
  int64_t tile_elements = 1;
  py::function dots;                // (r0, r1, c0) -> address of [r1-r0, P-c0] products
  py::function sqrt;                // (address, count): in-place square root (torch's)
  py::function exp;                 // (address, count): in-place exponential (torch's)
};

template <typename T>
class Merger {
 public:
  Merger(const Problem& problem, const T* sq_norms, const T* sizes)
      : p_(problem), sq_norms_(sq_norms), sizes_(sizes), buffers_(std::max(1, kernel_threads())) {}

  // The `capacity` smallest pairs strictly after `after` (all pairs when has_after is false),
  // by linkage, sorted; `complete` is true when no other pair exists after `after`.
  std::vector<Pair<T>> scan(size_t capacity, bool has_after, const Pair<T>& after, bool& complete) {
    has_after_ = has_after;
    after_ = after;
    offer_pairs_ = true;
    collect_nearest_ = false;
    capacity_ = capacity;
    for (auto& buffer : buffers_) buffer.reset(capacity);
    run_tiles();

    std::vector<Pair<T>> kept;
    bool dropped = false;
    for (auto& buffer : buffers_) {
      dropped = dropped || buffer.dropped();
      kept.insert(kept.end(), buffer.items().begin(), buffer.items().end());
      std::vector<Pair<T>>().swap(buffer.items());
    }
    if (kept.size() > capacity) {
      std::nth_element(kept.begin(), kept.begin() + (capacity - 1), kept.end(), pair_less<T>);
      kept.resize(capacity);
      dropped = true;
    }
    std::sort(kept.begin(), kept.end(), pair_less<T>);
    complete = !dropped;
    return kept;
  }

  // tssl's first pass: no pairs offered; each cluster's `depth` nearest other clusters
  // (by (D, index)) are collected and a_i computed from the first `neighbours` of them.
  // Afterwards nearest() holds the merged lists: row c at [c * depth, (c + 1) * depth).
  void scan_nearest(int64_t depth) {
    offer_pairs_ = false;
    collect_nearest_ = true;
    depth_ = std::min<int64_t>(depth, p_.num_clusters - 1);
    nearest_.reset(p_.num_clusters, depth_);
    run_tiles();
    compute_density();
  }

  int64_t depth() const { return depth_; }
  int linkage() const { return p_.linkage; }
  const NearestLists<T>& nearest() const { return nearest_; }
  const std::vector<T>& density() const { return density_; }

  // TSSL Eq. 8 for a batch: key D in, D + exp(2 D - (a_i + a_j)) out (tssl_typeset:
  // (D + exp(2 D)) - (a_i + a_j)); the sum a_i + a_j rounds first, as in the reference,
  // and the exp is torch's, through the callback.
  void tssl_linkages(std::vector<Pair<T>>& pairs) {
    std::vector<T> exponent(pairs.size());
    for (size_t p = 0; p < pairs.size(); ++p) exponent[p] = tssl_exponent(pairs[p].key, pairs[p].i, pairs[p].j);
    take_exp(exponent.data(), static_cast<int64_t>(exponent.size()));
    for (size_t p = 0; p < pairs.size(); ++p) {
      pairs[p].key = tssl_linkage(pairs[p].key, exponent[p], pairs[p].i, pairs[p].j);
    }
  }

  // The argument of the exponential, and the linkage from D and that exponential.
  inline T tssl_exponent(T distance, int64_t i, int64_t j) const {
    if (p_.linkage == kTsslTypeset) return T(2) * distance;
    return T(2) * distance - (density_[i] + density_[j]);
  }
  inline T tssl_linkage(T distance, T exponential, int64_t i, int64_t j) const {
    if (p_.linkage == kTsslTypeset) return (distance + exponential) - (density_[i] + density_[j]);
    return distance + exponential;
  }

  // Applies the launcher's torch sqrt / exp in place: torch's float sqrt and exp are not
  // always correctly rounded, and the reference's values and ties need their exact bits.
  void take_sqrt(T* values, int64_t count) {
    if (count > 0) p_.sqrt(reinterpret_cast<std::uintptr_t>(values), count);
  }
  void take_exp(T* values, int64_t count) {
    if (count > 0) p_.exp(reinterpret_cast<std::uintptr_t>(values), count);
  }

 private:
  // a_i = (ascending sum of the k smallest D) / k: the reference's order, so a_i
  // matches it to the last bit.
  void compute_density() {
    const int64_t num_clusters = p_.num_clusters, depth = depth_;
    const int64_t k = std::min<int64_t>(p_.neighbours, depth);
    density_.assign(num_clusters, T(0));
    if (depth <= 0) return;
    for (int64_t c = 0; c < num_clusters; ++c) {
      const T* nearest = nearest_.distance.data() + c * depth;
      T total = nearest[0];
      for (int64_t s = 1; s < k; ++s) total += nearest[s];
      density_[c] = total / T(k);
    }
  }

  // row[j] for j in (i, C): distance in (tssl: linkage already), linkage out; then every
  // pair that passes the buffer's current limit is offered. Branch-light, vectorisable.
  void offer_row(PairBuffer<T>& buffer, T* row, int64_t i) const {
    const int64_t num_clusters = p_.num_clusters;
    if (p_.linkage == kBuc || p_.linkage == kBucL2) {
      const T penalty = T(p_.size_penalty), size_i = sizes_[i];
      for (int64_t j = i + 1; j < num_clusters; ++j) row[j] = row[j] + penalty * (size_i + sizes_[j]);
    }
    T limit = buffer.limit();
    for (int64_t j = i + 1; j < num_clusters; ++j) {
      if (row[j] > limit) continue;
      const Pair<T> pair{row[j], i, j};
      if (has_after_ && !pair_less(after_, pair)) continue;
      buffer.offer(pair);
      limit = buffer.limit();
    }
  }

  // Row clusters [first, last) (whole clusters) against points [start[first], P), in
  // three steps: (1) squared cluster-pair distances (the minimum over the clusters'
  // points for buc) into a block whose row i - first holds cluster j > i at column
  // j - first (the tile itself, in place, when there is one point per cluster);
  // (2) D = sqrt of the block by the launcher's callback (torch's sqrt, which is not
  // always correctly rounded: the reference's values and ties need its bits; buc ranks
  // the squared minimum and skips it);
  // (3) pairs offered, nearest lists fed.
  void packed_tile(T* tile, int64_t first, int64_t last) {
    const int64_t* start = p_.cluster_start;
    const int64_t column_origin = start[first];
    const int64_t num_columns = p_.num_points - column_origin;
    const int64_t num_clusters = p_.num_clusters;
    const int64_t work = (start[last] - start[first]) * num_columns;
    const int64_t block_columns = p_.identity ? num_columns : num_clusters - first;
    if (!p_.identity) level_.resize((last - first) * block_columns);
    T* block = p_.identity ? tile : level_.data();
    const int squared_team = region_threads(work >= kMinParallelWork);
#pragma omp parallel for num_threads(squared_team) schedule(dynamic, dynamic_chunk(last - first, squared_team))
    for (int64_t i = first; i < last; ++i) {
      T* squared_row = block + (i - first) * block_columns - first;  // [j] for j > i
      if (p_.identity) {
        const T norm = sq_norms_[i];
        for (int64_t j = i + 1; j < num_clusters; ++j) {
          const T squared = (norm + sq_norms_[j]) - T(2) * squared_row[j];
          squared_row[j] = squared > T(0) ? squared : T(0);
        }
        continue;
      }
      for (int64_t s = start[i]; s < start[i + 1]; ++s) {
        const T* products = tile + (s - column_origin) * num_columns - column_origin;
        const T norm = sq_norms_[s];
        const bool first_row = s == start[i];
        for (int64_t j = i + 1; j < num_clusters; ++j) {
          T minimum = first_row ? std::numeric_limits<T>::infinity() : squared_row[j];
          for (int64_t t = start[j]; t < start[j + 1]; ++t) {
            T squared = (norm + sq_norms_[t]) - T(2) * products[t];
            squared = squared > T(0) ? squared : T(0);
            minimum = squared < minimum ? squared : minimum;
          }
          squared_row[j] = minimum;
        }
      }
    }
    if (p_.linkage != kBuc) take_sqrt(block, (last - first) * block_columns);
    const bool tssl_pairs = offer_pairs_ && is_tssl(p_.linkage);
    if (tssl_pairs) tssl_exponents(block, block_columns, first, last);
    // One region for the rest of the tile: rows to linkages (tssl), pairs offered, nearest
    // lists fed by rows, then (after the loop's barrier: a row's list can also receive from
    // the column pass) by columns.
    const int team = buffer_team(work >= kMinParallelWork);
#pragma omp parallel num_threads(team)
    {
      PairBuffer<T>& buffer = buffers_[omp_get_thread_num()];
#pragma omp for schedule(dynamic, dynamic_chunk(last - first, team))
      for (int64_t i = first; i < last; ++i) {
        T* distances = block + (i - first) * block_columns - first;
        if (tssl_pairs) {
          const T* exponent = exponent_.data() + (i - first) * block_columns - first;
          for (int64_t j = i + 1; j < num_clusters; ++j) distances[j] = tssl_linkage(distances[j], exponent[j], i, j);
        }
        if (collect_nearest_) {
          for (int64_t j = i + 1; j < num_clusters; ++j) {
            if (distances[j] <= nearest_.worst[i]) nearest_.offer(i, distances[j], j);
          }
        }
        // Turns the row into linkages in place; the column pass below only runs when no
        // pairs are offered, so it still reads distances.
        if (offer_pairs_) offer_row(buffer, distances, i);
      }
      if (collect_nearest_) column_pass(block, block_columns, first, last);
    }
  }

  // tssl / tssl_typeset: the exponents of a block of distances, exponentiated in place by one
  // exp callback for the block; packed_tile turns them into linkages row by row.
  void tssl_exponents(const T* block, int64_t block_columns, int64_t first, int64_t last) {
    const int64_t num_clusters = p_.num_clusters;
    exponent_.resize((last - first) * block_columns);
    const int64_t work = (last - first) * block_columns;
    const int team = region_threads(work >= kMinParallelWork);
#pragma omp parallel for num_threads(team) schedule(dynamic, dynamic_chunk(last - first, team))
    for (int64_t i = first; i < last; ++i) {
      const T* distances = block + (i - first) * block_columns - first;
      T* exponent = exponent_.data() + (i - first) * block_columns - first;
      for (int64_t j = i + 1; j < num_clusters; ++j) exponent[j] = tssl_exponent(distances[j], i, j);
    }
    take_exp(exponent_.data(), work);
  }

  // Lists of clusters j > first receive D_ij from the block's rows i < j. Each thread
  // owns a run of columns at a time (no list is shared between threads) and reads it row by
  // row, a contiguous run per row. Called inside packed_tile's region (an orphaned loop).
  void column_pass(const T* block, int64_t block_columns, int64_t first, int64_t last) {
    constexpr int64_t kRun = 64;
    const int64_t num_runs = (p_.num_clusters - (first + 1) + kRun - 1) / kRun;
#pragma omp for schedule(dynamic, 1)
    for (int64_t run = 0; run < num_runs; ++run) {
      const int64_t j0 = first + 1 + run * kRun, j1 = std::min(j0 + kRun, p_.num_clusters);
      const T* worst = nearest_.worst.data();
      for (int64_t i = first; i < std::min(last, j1 - 1); ++i) {
        const T* distances = block + (i - first) * block_columns - first;
        for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
          if (distances[j] <= worst[j]) nearest_.offer(j, distances[j], i);
        }
      }
    }
  }

  // Rows [r0, r1) of one large cluster c against the points of clusters > c; the
  // squared minimum per later cluster accumulates in open_minimum_ across pieces.
  void piece_tile(const T* tile, int64_t c, int64_t r0, int64_t r1) {
    const int64_t* start = p_.cluster_start;
    const int64_t column_origin = start[c + 1];
    const int64_t num_columns = p_.num_points - column_origin;
    const int64_t work = (r1 - r0) * num_columns;
    const int team = region_threads(work >= kMinParallelWork);
#pragma omp parallel for num_threads(team) schedule(dynamic, dynamic_chunk(p_.num_clusters - c - 1, team))
    for (int64_t j = c + 1; j < p_.num_clusters; ++j) {
      T minimum = open_minimum_[j];
      for (int64_t s = r0; s < r1; ++s) {
        const T* products = tile + (s - r0) * num_columns - column_origin;
        const T norm = sq_norms_[s];
        for (int64_t t = start[j]; t < start[j + 1]; ++t) {
          T squared = (norm + sq_norms_[t]) - T(2) * products[t];
          squared = squared > T(0) ? squared : T(0);
          minimum = squared < minimum ? squared : minimum;
        }
      }
      open_minimum_[j] = minimum;
    }
  }

  void offer_open_cluster(int64_t c) {
    if (p_.linkage != kBuc) take_sqrt(open_minimum_.data() + c + 1, p_.num_clusters - c - 1);
    offer_row(buffers_[0], open_minimum_.data(), c);
  }

  // Team of a region whose threads offer pairs to buffers_[thread]: region_threads(parallel),
  // with buffers added (empty, at the scan's capacity) if set_num_threads raised the count
  // since the merge began.
  int buffer_team(bool parallel) {
    const int team = region_threads(parallel);
    while (static_cast<int>(buffers_.size()) < team) {
      buffers_.emplace_back();
      buffers_.back().reset(capacity_);
    }
    return team;
  }

  T* request(int64_t r0, int64_t r1, int64_t c0) {
    const std::uintptr_t address = p_.dots(r0, r1, c0).template cast<std::uintptr_t>();
    return as_ptr<T>(address);
  }

  // Row blocks as the reference forms them (rows_per_tile = tile_elements / P; whole
  // clusters while they fit, a larger cluster alone in row pieces), so that every GEMM
  // has the reference's row count: MKL's results for a row can depend on how many rows
  // a call has (fewer than 8 take another path), and equal tiles keep equal bits.
  void run_tiles() {
    const int64_t* start = p_.cluster_start;
    const int64_t num_clusters = p_.num_clusters, num_points = p_.num_points;
    const int64_t rows_per_tile = std::max<int64_t>(1, std::max<int64_t>(p_.tile_elements, 1) / num_points);
    int64_t c = 0;
    while (c < num_clusters - 1) {
      int64_t last = c + 1;
      while (last < num_clusters && start[last + 1] - start[c] <= rows_per_tile) ++last;
      if (start[last] - start[c] <= rows_per_tile) {
        packed_tile(request(start[c], start[last], start[c]), c, last);
      } else {  // one cluster larger than a tile: row pieces against the later clusters
        open_minimum_.assign(num_clusters, std::numeric_limits<T>::infinity());
        for (int64_t r0 = start[c]; r0 < start[c + 1]; r0 += rows_per_tile) {
          const int64_t r1 = std::min(r0 + rows_per_tile, start[c + 1]);
          piece_tile(request(r0, r1, start[c + 1]), c, r0, r1);
        }
        offer_open_cluster(c);
      }
      c = last;
    }
  }

  const Problem& p_;
  const T* sq_norms_;
  const T* sizes_;
  std::vector<PairBuffer<T>> buffers_;   // one per thread of the largest team so far
  size_t capacity_ = 1;
  std::vector<T> open_minimum_;
  std::vector<T> level_;
  std::vector<T> exponent_;
  bool has_after_ = false;
  Pair<T> after_{};
  bool offer_pairs_ = true;
  bool collect_nearest_ = false;
  int64_t depth_ = 0;
  NearestLists<T> nearest_;
  std::vector<T> density_;
};

// tssl, tssl_typeset: every pair found in some cluster's nearest list, with its linkage, sorted.
template <typename T>
std::vector<Pair<T>> tssl_candidates(Merger<T>& merger) {
  const NearestLists<T>& lists = merger.nearest();
  const int64_t depth = merger.depth();
  const int64_t num_clusters = static_cast<int64_t>(merger.density().size());
  std::vector<Pair<T>> pairs;
  pairs.reserve(num_clusters * depth);
  for (int64_t c = 0; c < num_clusters; ++c) {
    for (int64_t s = 0; s < depth; ++s) {
      const T d = lists.distance[c * depth + s];
      const int64_t other = lists.index[c * depth + s];
      if (other < c) {
        // Already listed from `other`'s side when (d, c) is within other's list.
        const T worst = lists.distance[other * depth + depth - 1];
        const int64_t worst_index = lists.index[other * depth + depth - 1];
        if (d < worst || (d == worst && c <= worst_index)) continue;
      }
      const int64_t i = std::min(c, other), j = std::max(c, other);
      pairs.push_back({d, i, j});
    }
  }
  merger.tssl_linkages(pairs);
  std::sort(pairs.begin(), pairs.end(), pair_less<T>);
  return pairs;
}

// tssl, tssl_typeset: a lower bound on the linkage of every pair that is in no nearest
// list. Such a pair (i, j) has D_ij >= thr_i and D_ij >= thr_j (the lists' last
// distances), so with a_j <= max a, and both linkages monotone in D and in -a (as
// rounded: fl(D + exp(fl(2D - fl(a_i + a_j)))), fl(fl(D + exp(2D)) - fl(a_i + a_j))),
// its linkage is >= lb_i and >= lb_j; over pairs of distinct clusters, >= the second
// smallest lb. +inf when the lists hold every pair. The bound is lowered by a few ulps
// of its terms so that it holds even if torch's exp were off monotonicity by an ulp
// somewhere (tssl_typeset's bound can be negative, and its terms cancel).
template <typename T>
T tssl_unseen_bound(Merger<T>& merger) {
  const NearestLists<T>& lists = merger.nearest();
  const std::vector<T>& density = merger.density();
  const int64_t depth = merger.depth();
  const int64_t num_clusters = static_cast<int64_t>(density.size());
  const T infinity = std::numeric_limits<T>::infinity();
  if (depth >= num_clusters - 1) return infinity;
  const T density_max = *std::max_element(density.begin(), density.end());
  std::vector<T> exponent(num_clusters);
  const bool typeset = merger.linkage() == kTsslTypeset;
  for (int64_t c = 0; c < num_clusters; ++c) {
    const T threshold = lists.distance[c * depth + depth - 1];
    exponent[c] = typeset ? T(2) * threshold : T(2) * threshold - (density[c] + density_max);
  }
  merger.take_exp(exponent.data(), num_clusters);
  const T slack = T(8) * std::numeric_limits<T>::epsilon();
  T smallest = infinity, second = infinity;
  for (int64_t c = 0; c < num_clusters; ++c) {
    const T threshold = lists.distance[c * depth + depth - 1];
    T bound = (threshold + exponent[c]) * (T(1) - slack);
    if (typeset) {
      const T density_sum = density[c] + density_max;
      bound = (threshold + exponent[c]) - density_sum;
      // An overflowed exp stays +inf (inf - slack * inf would be NaN).
      if (bound < infinity) bound -= slack * ((threshold + exponent[c]) + density_sum);
    }
    if (bound < smallest) {
      second = smallest;
      smallest = bound;
    } else if (bound < second) {
      second = bound;
    }
  }
  return second;
}

// Returns the number of GEMM passes (scans) it took.
template <typename T>
int64_t merge(const Problem& problem, const T* sq_norms, const T* sizes, int64_t num_merges, int64_t capacity,
              int64_t depth, const int64_t* sample_cluster, int64_t num_samples, int64_t* labels_out) {
  UnionFind forest(problem.num_clusters);
  int64_t scans = 0;
  if (num_merges > 0 && problem.num_clusters > 1) {
    Merger<T> merger(problem, sq_norms, sizes);
    int64_t merges = 0;
    bool has_after = false;
    Pair<T> after{};
    size_t size = static_cast<size_t>(std::max<int64_t>(capacity, 1));
    const size_t max_size = std::max<size_t>(static_cast<size_t>(std::max<int64_t>(problem.tile_elements, 1)), size);
    auto walk = [&](const std::vector<Pair<T>>& pairs, size_t count) {
      for (size_t p = 0; p < count && merges < num_merges; ++p) {
        if (forest.unite(pairs[p].i, pairs[p].j)) ++merges;
        after = pairs[p];
        has_after = true;
      }
    };
    if (is_tssl(problem.linkage)) {
      merger.scan_nearest(depth);
      ++scans;
      std::vector<Pair<T>> pairs = tssl_candidates(merger);
      const T bound = tssl_unseen_bound(merger);
      size_t exact = 0;
      while (exact < pairs.size() && pairs[exact].key < bound) ++exact;
      walk(pairs, exact);
    }
    while (merges < num_merges) {
      bool complete = false;
      std::vector<Pair<T>> pairs = merger.scan(size, has_after, after, complete);
      ++scans;
      if (pairs.empty()) {  // only if num_merges exceeded C - 1, which the op rejects
        throw std::runtime_error("agglomerative_merge: ran out of cluster pairs before num_merges merges");
      }
      walk(pairs, pairs.size());
      size = std::min(2 * size, max_size);
    }
  }
  // Renumber the merged clusters by first appearance in sample order.
  std::vector<int64_t> label_of_root(problem.num_clusters, -1);
  int64_t next = 0;
  for (int64_t n = 0; n < num_samples; ++n) {
    const int64_t root = forest.find(sample_cluster[n]);
    if (label_of_root[root] < 0) label_of_root[root] = next++;
    labels_out[n] = label_of_root[root];
  }
  return scans;
}

template <typename T>
void bind_merge(py::module_& m, const char* name) {
  m.def(
      name,
      [](int64_t num_points, int64_t num_clusters, std::uintptr_t cluster_start, std::uintptr_t sq_norms,
         std::uintptr_t sizes, int linkage, int64_t neighbours, double size_penalty, int64_t num_merges,
         int64_t capacity, int64_t depth, int64_t tile_elements, std::uintptr_t sample_cluster,
         int64_t num_samples, std::uintptr_t labels_out, py::function dots, py::function sqrt,
         py::function exp) {
        require(num_points >= 0 && num_clusters >= 0 && num_samples >= 0, "agglomerative_merge: negative size");
        require(linkage >= kCentroid && linkage <= kTsslTypeset,
                "agglomerative_merge: linkage code must be 0, 1, 2, 3 or 4");
        require(neighbours >= 1, "agglomerative_merge: neighbours must be >= 1");
        require(num_merges >= 0 && num_merges <= std::max<int64_t>(num_clusters - 1, 0),
                "agglomerative_merge: num_merges must lie in [0, num_clusters - 1]");
        const int64_t* start = as_ptr<const int64_t>(cluster_start);
        require(num_clusters == 0 || (start[0] == 0 && start[num_clusters] == num_points),
                "agglomerative_merge: cluster_start must run from 0 to num_points");
        Problem problem;
        problem.num_points = num_points;
        problem.num_clusters = num_clusters;
        problem.cluster_start = start;
        problem.identity = num_points == num_clusters;
        problem.linkage = linkage;
        problem.neighbours = neighbours;
        problem.size_penalty = size_penalty;
        problem.tile_elements = tile_elements;
        problem.dots = std::move(dots);
        problem.sqrt = std::move(sqrt);
        problem.exp = std::move(exp);
        return merge<T>(problem, as_ptr<const T>(sq_norms), as_ptr<const T>(sizes), num_merges, capacity,
                        std::max(depth, neighbours), as_ptr<const int64_t>(sample_cluster), num_samples, as_ptr<int64_t>(labels_out));
      },
      py::arg("num_points"), py::arg("num_clusters"), py::arg("cluster_start"), py::arg("sq_norms"),
      py::arg("sizes"), py::arg("linkage"), py::arg("neighbours"), py::arg("size_penalty"), py::arg("num_merges"),
      py::arg("capacity"), py::arg("depth"), py::arg("tile_elements"), py::arg("sample_cluster"), py::arg("num_samples"),
      py::arg("labels_out"), py::arg("dots"), py::arg("sqrt"), py::arg("exp"),
      "One greedy merging step over points sorted by cluster (cluster_start [C+1] int64, sq_norms [P], "
      "sizes [C] in the compute dtype); dots(r0, r1, c0) must return the address of the contiguous "
      "[r1-r0, P-c0] inner products of points r0..r1 with points c0..P, and sqrt(address, count) must take "
      "the square root of count values in place and exp(address, count) their exponential (torch's, for the "
      "reference's bits). Writes int64 labels renumbered "
      "by first appearance of sample_cluster [num_samples]; returns the number of GEMM passes. "
      "linkage: 0 centroid, 1 tssl, 2 buc (squared minimum distance), 3 buc_l2 (minimum distance), "
      "4 tssl_typeset ((D + exp(2 D)) - (a_i + a_j)).");
}

}  // namespace

void register_cpu_cluster(py::module_& m) {
  bind_merge<float>(m, "agglomerative_merge_f32");
  bind_merge<double>(m, "agglomerative_merge_f64");
}

}  // namespace fastassoc
