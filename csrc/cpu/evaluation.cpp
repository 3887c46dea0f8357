// Per-query ranking statistics for evaluate_ranking (Market-1501 / MARS protocol).
//
// Must equal fastassoc/kernels/reference/evaluation.py::evaluate_ranking_reference.
// The launcher computes a tile of query x gallery inner products with torch's GEMM;
// distance_tile turns it into distances in place (squared for both Euclidean metrics:
// the launcher takes torch's sqrt, which is not always correctly rounded, so that ties
// come out exactly where the reference's do), and rank_tile derives, per query:
//   first_rank  rank (1-based, junk removed) of the first true match, 0 if none,
//   ap          average precision  (1/n) sum_k k / rank_k,
//   inp         inverse negative penalty  n / rank_n,
// where rank_k is the rank of the k-th true match in (distance, gallery index) order.
//
// No per-query sort of the gallery: a true match's rank is 1 + the number of true
// matches before it + the number of non-junk negatives strictly before it in
// (distance, index) order. The n true matches (a handful per identity) are sorted;
// each gallery entry ranked before the last match is placed among them by a branch-free
// binary search and, when it is a negative, counted in a histogram of the gaps between
// matches, whose prefix sums are the negatives before each match. One comparison per
// entry after the last match (most of the gallery once features are any good), at most
// O(log n) before it; O(n) extra memory per thread.
//
// Junk (removed from the ranking): gallery identity -1, or the query's identity in
// the query's camera. True match: the query's identity in another camera (identity
// != -1). Distances use the shared formulas: squared Euclidean (|q|^2 + |g|^2) - 2 q.g
// clamped at 0, Euclidean its square root (torch's), cosine 1 - q.g of normalised rows;
// ties in distance rank by gallery index.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace fastassoc {
namespace {

enum Metric : int { kSqEuclidean = 0, kEuclidean = 1, kCosine = 2 };

// Below this many tile entries a parallel region costs more than it saves (and on a
// loaded machine a descheduled worker can stall it for a time slice).
constexpr int64_t kMinParallelWork = int64_t{1} << 15;

template <typename T>
struct Match {
  T distance;
  int64_t index;
};

template <typename T>
inline bool before(T distance_a, int64_t index_a, T distance_b, int64_t index_b) {
  // Bitwise, not short-circuit: no branch to mispredict on random rankings.
  return (distance_a < distance_b) | ((distance_a == distance_b) & (index_a < index_b));
}

// dots -> distances in place: squared Euclidean (|q|^2 + |g|^2) - 2 q.g clamped at 0
// (also for "euclidean": the launcher takes torch's sqrt, whose bits the reference's
// ties need), or cosine 1 - q.g of normalised rows.
template <typename T>
void distance_tile(T* tile, int64_t num_rows, int64_t num_gallery, int metric, const T* query_sq_norms,
                   const T* gallery_sq_norms) {
  const int threads = region_threads(num_rows * num_gallery >= kMinParallelWork);
  const int64_t chunk = dynamic_chunk(num_rows, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
  for (int64_t r = 0; r < num_rows; ++r) {
    T* distances = tile + r * num_gallery;
    if (metric == kCosine) {
      for (int64_t g = 0; g < num_gallery; ++g) distances[g] = T(1) - distances[g];
    } else {
      const T query_norm = query_sq_norms[r];
      for (int64_t g = 0; g < num_gallery; ++g) {
        const T squared = (query_norm + gallery_sq_norms[g]) - T(2) * distances[g];
        distances[g] = squared > T(0) ? squared : T(0);
      }
    }
  }
}

// First-match rank, AP and INP of one query from the negatives counted between its
// num_matches true matches (negatives_in_gap[k]: between match k-1 and match k).
inline void query_statistics(const int64_t* negatives_in_gap, int64_t num_matches, int64_t* first_rank, double* ap,
                             double* inp) {
  int64_t negatives_before = 0;
  double precision_sum = 0.0;
  int64_t rank = 0;
  for (int64_t k = 0; k < num_matches; ++k) {
    negatives_before += negatives_in_gap[k];
    rank = k + 1 + negatives_before;
    if (k == 0) *first_rank = rank;
    precision_sum += double(k + 1) / double(rank);
  }
  *ap = precision_sum / double(num_matches);
  *inp = double(num_matches) / double(rank);
}

template <typename T>
void rank_tile(const T* tile, int64_t num_rows, int64_t num_gallery, const int64_t* query_pids,
               const int64_t* gallery_pids, const int64_t* query_cameras, const int64_t* gallery_cameras,
               int64_t* first_rank, double* ap, double* inp) {
#pragma omp parallel num_threads(region_threads(num_rows * num_gallery >= kMinParallelWork))
  {
    std::vector<Match<T>> matches;
    std::vector<int64_t> negatives_in_gap;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < num_rows; ++r) {
      const T* distances = tile + r * num_gallery;
      const int64_t pid = query_pids[r], camera = query_cameras[r];

      matches.clear();
      if (pid != -1) {
        for (int64_t g = 0; g < num_gallery; ++g) {
          if (gallery_pids[g] == pid && gallery_cameras[g] != camera) matches.push_back({distances[g], g});
        }
      }
      first_rank[r] = 0;
      ap[r] = 0.0;
      inp[r] = 0.0;
      const int64_t num_matches = static_cast<int64_t>(matches.size());
      if (num_matches == 0) continue;
      std::sort(matches.begin(), matches.end(),
                [](const Match<T>& a, const Match<T>& b) { return before(a.distance, a.index, b.distance, b.index); });

      // negatives_in_gap[k]: negatives between match k-1 and match k (slot n: after the
      // last match, unused). The search is branch-free: on poor rankings a branchy one
      // mispredicts at every step.
      negatives_in_gap.assign(num_matches + 1, 0);
      const Match<T>* sorted = matches.data();
      const Match<T> last = matches.back();
      for (int64_t g = 0; g < num_gallery; ++g) {
        const T distance = distances[g];
        // After the last match (most of the gallery once features are any good): no gap.
        if (!before(distance, g, last.distance, last.index)) continue;
        const int64_t gallery_pid = gallery_pids[g];
        // Matches ranked before (distance, g): a branch-free lower bound.
        const Match<T>* first = sorted;
        int64_t length = num_matches;
        while (length > 1) {
          const int64_t half = length / 2;
          first += before(first[half - 1].distance, first[half - 1].index, distance, g) ? half : 0;
          length -= half;
        }
        const int64_t gap = (first - sorted) + (before(first->distance, first->index, distance, g) ? 1 : 0);
        // True matches and junk (the query's identity, or -1) are not negatives.
        negatives_in_gap[gap] += (gallery_pid != pid) & (gallery_pid != -1);
      }
      query_statistics(negatives_in_gap.data(), num_matches, first_rank + r, ap + r, inp + r);
    }
  }
}

// Screened ranking (float32). `tile` holds APPROXIMATE distances (int8 GEMM, see
// csrc/cpu/screen.cpp) that are within bounds[r] of the exact ones for every gallery
// entry of row r; metric is 0 (squared Euclidean, also used for "euclidean": the square
// root is monotone) or 2 (cosine). The true matches get exact distances (screen_dot);
// a negative is placed among them from its approximate distance when no match lies
// within its error band, and from its exact distance otherwise. The ranking is thus the
// exact one: (exact distance, gallery index) order, as rank_tile.
void rank_tile_screened(const float* tile, int64_t num_rows, int64_t num_gallery, const int64_t* query_pids,
                        const int64_t* gallery_pids, const int64_t* query_cameras, const int64_t* gallery_cameras,
                        const double* bounds, const float* queries, const float* gallery, int64_t dim, int metric,
                        const float* query_sq_norms, const float* gallery_sq_norms, int64_t* first_rank, double* ap,
                        double* inp, int64_t* exact_count) {
  auto exact = [&](int64_t r, int64_t g) {
    const float dot = static_cast<float>(screen_dot(queries + r * dim, gallery + g * dim, dim));
    if (metric == kCosine) return 1.0f - dot;
    const float squared = (query_sq_norms[r] + gallery_sq_norms[g]) - 2.0f * dot;
    return squared > 0.0f ? squared : 0.0f;
  };
  int64_t recomputed = 0;
#pragma omp parallel num_threads(region_threads(num_rows * num_gallery >= kMinParallelWork)) reduction(+ : recomputed)
  {
    std::vector<Match<float>> matches;
    std::vector<float> match_distances;
    std::vector<int64_t> negatives_in_gap;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < num_rows; ++r) {
      const float* approx = tile + r * num_gallery;
      const int64_t pid = query_pids[r], camera = query_cameras[r];
      const double bound = bounds[r];
      first_rank[r] = 0;
      ap[r] = 0.0;
      inp[r] = 0.0;
      matches.clear();
      if (pid != -1) {
        for (int64_t g = 0; g < num_gallery; ++g) {
          if (gallery_pids[g] == pid && gallery_cameras[g] != camera) matches.push_back({exact(r, g), g});
        }
      }
      const int64_t num_matches = static_cast<int64_t>(matches.size());
      if (num_matches == 0) continue;
      std::sort(matches.begin(), matches.end(), [](const Match<float>& a, const Match<float>& b) {
        return before(a.distance, a.index, b.distance, b.index);
      });
      match_distances.resize(num_matches);
      for (int64_t k = 0; k < num_matches; ++k) match_distances[k] = matches[k].distance;
      const double last = match_distances.back();
      negatives_in_gap.assign(num_matches + 1, 0);
      for (int64_t g = 0; g < num_gallery; ++g) {
        const double low = double(approx[g]) - bound;
        if (low > last) continue;  // certainly after the last match: no gap to count
        const int64_t gallery_pid = gallery_pids[g];
        if (gallery_pid == pid || gallery_pid == -1) continue;  // true match or junk
        const double high = double(approx[g]) + bound;
        // Matches certainly before g (distance < low) and possibly before it (<= high).
        const int64_t certain = std::lower_bound(match_distances.begin(), match_distances.end(), low,
                                                 [](float d, double v) { return double(d) < v; }) -
                                match_distances.begin();
        const int64_t possible = std::upper_bound(match_distances.begin(), match_distances.end(), high,
                                                  [](double v, float d) { return v < double(d); }) -
                                 match_distances.begin();
        int64_t gap = certain;
        if (possible != certain) {
          const float distance = exact(r, g);
          ++recomputed;
          gap = std::partition_point(matches.begin(), matches.end(),
                                     [&](const Match<float>& m) { return before(m.distance, m.index, distance, g); }) -
                matches.begin();
        }
        if (gap < num_matches) ++negatives_in_gap[gap];
      }
      query_statistics(negatives_in_gap.data(), num_matches, first_rank + r, ap + r, inp + r);
    }
  }
  if (exact_count) *exact_count += recomputed;
}

template <typename T>
void bind(py::module_& m, const std::string& suffix) {
  m.def(("distance_tile_" + suffix).c_str(),
        [](std::uintptr_t tile, int64_t num_rows, int64_t num_gallery, int metric, std::uintptr_t query_sq_norms,
           std::uintptr_t gallery_sq_norms) {
          require(num_rows >= 0 && num_gallery >= 0, "evaluate_ranking: negative size");
          require(metric >= kSqEuclidean && metric <= kCosine, "evaluate_ranking: metric code must be 0, 1 or 2");
          require(metric == kCosine || (query_sq_norms != 0 && gallery_sq_norms != 0),
                  "evaluate_ranking: Euclidean metrics need squared norms");
          py::gil_scoped_release release;
          distance_tile<T>(as_ptr<T>(tile), num_rows, num_gallery, metric, as_ptr<const T>(query_sq_norms),
                           as_ptr<const T>(gallery_sq_norms));
        },
        py::arg("tile"), py::arg("num_rows"), py::arg("num_gallery"), py::arg("metric"),
        py::arg("query_sq_norms"), py::arg("gallery_sq_norms"),
        "Inner products [num_rows, num_gallery] -> distances in place: metric 0 and 1 squared Euclidean "
        "(take the square root for 1), 2 cosine (1 - dot).");
  m.def(("rank_tile_" + suffix).c_str(),
        [](std::uintptr_t tile, int64_t num_rows, int64_t num_gallery, std::uintptr_t query_pids,
           std::uintptr_t gallery_pids, std::uintptr_t query_cameras, std::uintptr_t gallery_cameras,
           std::uintptr_t first_rank, std::uintptr_t ap, std::uintptr_t inp) {
          require(num_rows >= 0 && num_gallery >= 0, "evaluate_ranking: negative size");
          py::gil_scoped_release release;
          rank_tile<T>(as_ptr<const T>(tile), num_rows, num_gallery, as_ptr<const int64_t>(query_pids),
                       as_ptr<const int64_t>(gallery_pids), as_ptr<const int64_t>(query_cameras),
                       as_ptr<const int64_t>(gallery_cameras), as_ptr<int64_t>(first_rank), as_ptr<double>(ap),
                       as_ptr<double>(inp));
        },
        py::arg("tile"), py::arg("num_rows"), py::arg("num_gallery"), py::arg("query_pids"),
        py::arg("gallery_pids"), py::arg("query_cameras"), py::arg("gallery_cameras"), py::arg("first_rank"),
        py::arg("ap"), py::arg("inp"),
        "Ranking statistics of num_rows queries from their distances to the gallery [num_rows, num_gallery]: "
        "first-match rank (0: no true match), AP and INP per query.");
}

}  // namespace

void register_cpu_evaluation(py::module_& m) {
  bind<float>(m, "f32");
  bind<double>(m, "f64");
  m.def(
      "rank_tile_screened_f32",
      [](std::uintptr_t tile, int64_t num_rows, int64_t num_gallery, std::uintptr_t query_pids,
         std::uintptr_t gallery_pids, std::uintptr_t query_cameras, std::uintptr_t gallery_cameras,
         std::uintptr_t bounds, std::uintptr_t queries, std::uintptr_t gallery, int64_t dim, int metric,
         std::uintptr_t query_sq_norms, std::uintptr_t gallery_sq_norms, std::uintptr_t first_rank, std::uintptr_t ap,
         std::uintptr_t inp, std::uintptr_t exact_count) {
        require(num_rows >= 0 && num_gallery >= 0 && dim >= 0, "evaluate_ranking: negative size");
        require(metric == kSqEuclidean || metric == kCosine, "rank_tile_screened: metric code must be 0 or 2");
        require(metric == kCosine || (query_sq_norms != 0 && gallery_sq_norms != 0),
                "rank_tile_screened: squared Euclidean needs squared norms");
        py::gil_scoped_release release;
        rank_tile_screened(as_ptr<const float>(tile), num_rows, num_gallery, as_ptr<const int64_t>(query_pids),
                           as_ptr<const int64_t>(gallery_pids), as_ptr<const int64_t>(query_cameras),
                           as_ptr<const int64_t>(gallery_cameras), as_ptr<const double>(bounds),
                           as_ptr<const float>(queries), as_ptr<const float>(gallery), dim, metric,
                           as_ptr<const float>(query_sq_norms), as_ptr<const float>(gallery_sq_norms),
                           as_ptr<int64_t>(first_rank), as_ptr<double>(ap), as_ptr<double>(inp),
                           as_ptr<int64_t>(exact_count));
      },
      py::arg("tile"), py::arg("num_rows"), py::arg("num_gallery"), py::arg("query_pids"), py::arg("gallery_pids"),
      py::arg("query_cameras"), py::arg("gallery_cameras"), py::arg("bounds"), py::arg("queries"),
      py::arg("gallery"), py::arg("dim"), py::arg("metric"), py::arg("query_sq_norms"), py::arg("gallery_sq_norms"),
      py::arg("first_rank"), py::arg("ap"), py::arg("inp"), py::arg("exact_count"),
      "rank_tile from approximate distances within bounds[r] of the exact ones (int8 screening): exact distances "
      "for the true matches and for negatives whose error band holds a match; adds the latter's count to "
      "exact_count[0] (null: not counted).");
}

}  // namespace fastassoc
