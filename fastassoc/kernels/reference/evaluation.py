"""Pure-torch reference of re-id ranking evaluation (CMC, mAP, mINP; Market-1501 / MARS protocol).

Algorithm (the spec every backend's ``evaluate_ranking_<backend>`` must equal), per query:

1. Distances to every gallery entry as ``_tiles`` defines them (squared Euclidean
   ``(|q|^2 + |g|^2) - 2 q.g`` clamped at 0, ``1 - q_hat.g_hat`` for ``cosine``, with a
   fixed-order inner product: a pair's distance depends on its two rows only) in float32
   (float64 inputs: float64). ``euclidean`` ranks by the squared distance (the square
   root is monotone; ranking the squares keeps ties that a rounded root would merge apart).
2. Gallery sorted by ascending distance, ties by gallery index (stable sort).
3. Junk removed: entries with the query's identity *and* camera, and entries with
   identity -1. Ranks are counted over the remaining entries, from 1.
4. A query without a true match (same identity, kept) is skipped. Otherwise, with the
   true matches at kept ranks ``r_1 < ... < r_m``:
   first-match rank ``r_1`` (CMC), AP ``= (1/m) sum_t t / r_t``, INP ``= m / r_m``.
5. ``cmc[r]`` = fraction of valid queries with ``r_1 <= r + 1`` for ``r < max_rank`` (ranks
   past the gallery size repeat the last value); mAP and mINP are means over valid
   queries, accumulated in float64.

Only the order of true matches among the rest matters, so exact distances are needed only
near them: a float32 GEMM tile (``_tiles.distance_tile``) gives every entry's distance
within ``_tiles.band`` of the exact one; true matches are rescored exactly, and so is a
negative whose band holds a true match's exact distance. Every other negative lies
strictly on one side of each true match whether its GEMM or exact distance is used.

Queries are processed in row chunks, fully vectorised inside a chunk. A chunk holds at
most ``tile_elements() / 4`` query-gallery entries because the sort and the per-entry
int64 workspace take several times the distances' memory. Raises ``ValueError`` when
no query is valid. ``precision`` is accepted for the common signature; the reference
always computes at full precision of its compute dtype.
"""
from __future__ import annotations

import torch

from ...ops.evaluation import RankingResult
from . import _tiles

# The sort, the gathered identities/cameras and the cumulative sums hold several int64
# entries per distance; chunks are shrunk by this factor to keep memory near one tile.
_WORKSPACE_FACTOR = 4


def evaluate_ranking_reference(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                               gallery_pids: torch.Tensor, query_cameras: torch.Tensor,
                               gallery_cameras: torch.Tensor, metric: str, max_rank: int,
                               precision: str) -> RankingResult:
    """CMC, mAP and mINP of ranking ``gallery`` for every query; see the module docstring.

    Parameters
    ----------
    query : Tensor [Q, D], float; gallery : Tensor [G, D], same dtype
    query_pids, gallery_pids : Tensor [Q], [G], int64 (gallery -1: junk)
    query_cameras, gallery_cameras : Tensor [Q], [G], int64
    metric : {"euclidean", "sqeuclidean", "cosine"}
    max_rank : int >= 1
    precision : {"highest", "tf32"} (ignored: the reference is always exact)

    Returns
    -------
    RankingResult with ``cmc`` float64 [max_rank] on the inputs' device.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    scores = RankingScores(num_query, max_rank, query.device)
    if num_gallery > 0:
        query = _tiles.prepare(query, metric)
        gallery = _tiles.prepare(gallery, metric)
        ranking = "cosine" if metric == "cosine" else "sqeuclidean"
        query_sq_norms = (query * query).sum(1)
        gallery_sq_norms = (gallery * gallery).sum(1)
        for start, stop in _tiles.row_chunks(num_query, num_gallery * _WORKSPACE_FACTOR):
            distances = _tiles.distance_tile(query[start:stop], gallery, ranking, gallery_sq_norms)
            _rescore_near_matches(distances, query[start:stop], gallery, ranking, query_sq_norms[start:stop],
                                  gallery_sq_norms, query_pids[start:stop], gallery_pids, query_cameras[start:stop],
                                  gallery_cameras)
            order = torch.argsort(distances, dim=1, stable=True)  # ties by gallery index
            del distances
            scores.add_order(order, query_pids[start:stop], gallery_pids, query_cameras[start:stop],
                             gallery_cameras, start, stop)
    return scores.result(num_gallery)


def evaluate_distances_reference(distances: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                                 query_cameras: torch.Tensor, gallery_cameras: torch.Tensor,
                                 max_rank: int) -> RankingResult:
    """CMC, mAP and mINP of ranking the gallery by a precomputed matrix (steps 2-5 above).

    Each row of ``distances`` is sorted as given (ascending, stable: ties by gallery index;
    no rescoring, the matrix is the ranking), then scored as :func:`evaluate_ranking_reference`
    scores, in row chunks of at most ``tile_elements() / 4`` entries (the sort's workspace).

    Parameters
    ----------
    distances : Tensor [Q, G], float, no NaN
    query_pids, gallery_pids : Tensor [Q], [G], int64 (gallery -1: junk)
    query_cameras, gallery_cameras : Tensor [Q], [G], int64
    max_rank : int >= 1

    Returns
    -------
    RankingResult with ``cmc`` float64 [max_rank] on the matrix's device.
    """
    num_query, num_gallery = distances.shape
    scores = RankingScores(num_query, max_rank, distances.device)
    if num_gallery > 0:
        for start, stop in _tiles.row_chunks(num_query, num_gallery * _WORKSPACE_FACTOR):
            order = torch.argsort(distances[start:stop], dim=1, stable=True)
            scores.add_order(order, query_pids[start:stop], gallery_pids, query_cameras[start:stop],
                             gallery_cameras, start, stop)
    return scores.result(num_gallery)


def _rescore_near_matches(distances: torch.Tensor, query: torch.Tensor, gallery: torch.Tensor, ranking: str,
                          query_sq_norms: torch.Tensor, gallery_sq_norms: torch.Tensor, query_pids: torch.Tensor,
                          gallery_pids: torch.Tensor, query_cameras: torch.Tensor, gallery_cameras: torch.Tensor
                          ) -> None:
    """Overwrite, in the GEMM tile ``distances`` [b, G], the true matches and the negatives
    whose error band holds a true match with their exact distances (see the module docstring)."""
    num_rows = distances.shape[0]
    same_pid = gallery_pids.unsqueeze(0) == query_pids.unsqueeze(1)
    matches = same_pid & (gallery_cameras.unsqueeze(0) != query_cameras.unsqueeze(1)) & (query_pids != -1).unsqueeze(1)
    rows, cols = matches.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    exact = _tiles.exact_distances(query[rows], gallery[cols], ranking, query_sq_norms[rows], gallery_sq_norms[cols])
    distances[rows, cols] = exact
    # Each row's match distances ascending, padded with inf, for a banded search per entry.
    counts = torch.bincount(rows, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.full((num_rows, int(counts.max())), float("inf"), dtype=torch.float64, device=distances.device)
    slots[rows, torch.arange(rows.numel(), device=rows.device) - starts[rows]] = exact.to(torch.float64)
    slots = slots.sort(dim=1).values
    bound = _tiles.band(query, gallery, ranking, query_sq_norms, gallery_sq_norms).unsqueeze(1)
    approx = distances.to(torch.float64)
    before = torch.searchsorted(slots, approx - bound)
    within = torch.searchsorted(slots, approx + bound, right=True)
    near = (within != before) & ~same_pid & (gallery_pids != -1).unsqueeze(0)
    rows, cols = near.nonzero(as_tuple=True)
    if rows.numel():
        distances[rows, cols] = _tiles.exact_distances(query[rows], gallery[cols], ranking, query_sq_norms[rows],
                                                       gallery_sq_norms[cols])


class RankingScores:
    """Per-query CMC / AP / INP accumulators of one evaluation (shared with Triton).

    Per-query values (0 for skipped queries) are summed once at the end so that the
    float64 sums do not depend on the chunking.
    """

    def __init__(self, num_query: int, max_rank: int, device: torch.device):
        self.num_query, self.max_rank = num_query, max_rank
        self.first_match_counts = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.average_precision = torch.zeros(num_query, dtype=torch.float64, device=device)
        self.inverse_negative_penalty = torch.zeros(num_query, dtype=torch.float64, device=device)
        self.num_valid = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, matches: torch.Tensor, ranks: torch.Tensor, start: int, stop: int) -> None:
        """Score query rows ``start:stop`` (see :func:`score_ranked_matches`)."""
        score_ranked_matches(matches, ranks, start, stop, self.max_rank, self.first_match_counts,
                             self.average_precision, self.inverse_negative_penalty, self.num_valid)

    def add_order(self, order: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                  query_cameras: torch.Tensor, gallery_cameras: torch.Tensor, start: int, stop: int) -> None:
        """Score query rows ``start:stop`` from their gallery order [stop - start, G].

        Drops junk (gallery entries with the query's identity and camera, and identity
        -1) before ranking; ``query_pids`` / ``query_cameras`` are the tile's rows.
        """
        ranked_pids = gallery_pids[order]
        same_pid = ranked_pids == query_pids[:, None]
        junk = same_pid & (gallery_cameras[order] == query_cameras[:, None])
        junk |= ranked_pids == -1
        del order, ranked_pids
        keep = ~junk
        self.add(same_pid & keep, keep.cumsum(1), start, stop)  # cumsum: 1-based rank among kept entries

    def result(self, num_gallery: int) -> RankingResult:
        """The RankingResult (see :func:`ranking_result`)."""
        return ranking_result(self.first_match_counts, self.average_precision, self.inverse_negative_penalty,
                              self.num_valid, self.num_query, num_gallery)


def score_ranked_matches(matches: torch.Tensor, ranks: torch.Tensor, start: int, stop: int, max_rank: int,
                         first_match_counts: torch.Tensor, average_precision: torch.Tensor,
                         inverse_negative_penalty: torch.Tensor, num_valid: torch.Tensor) -> None:
    """Accumulate CMC / AP / INP of one query chunk from its ranked match mask (shared with Triton).

    Parameters
    ----------
    matches : Tensor [R, G], bool: true matches (same identity, not junk) in ranked order
    ranks : Tensor [R, G] or [G], int64: 1-based rank among kept entries of each position
    start, stop : int, the chunk's query rows (``stop - start == R``)
    max_rank : int
    first_match_counts : Tensor [max_rank], float64, updated in place (+= counts of first-match ranks)
    average_precision, inverse_negative_penalty : Tensor [Q], float64, rows ``start:stop`` written
    num_valid : Tensor [], int64, updated in place (+= queries with a true match)
    """
    matches_so_far = matches.cumsum(1)
    num_matches = matches_so_far[:, -1]
    valid = num_matches > 0
    first_rank = torch.where(matches, ranks, matches.shape[1] + 1).amin(1)
    last_rank = torch.where(matches, ranks, 0).amax(1)
    precision_at_match = torch.where(matches, matches_so_far.double() / ranks.clamp_min(1), 0.0)
    average_precision[start:stop] = precision_at_match.sum(1) / num_matches.clamp_min(1)
    inverse_negative_penalty[start:stop] = num_matches.double() / last_rank.clamp_min(1)
    num_valid += valid.sum()
    counted = first_rank[valid & (first_rank <= max_rank)] - 1
    first_match_counts += torch.bincount(counted, minlength=max_rank).to(torch.float64)


def ranking_result(first_match_counts: torch.Tensor, average_precision: torch.Tensor,
                   inverse_negative_penalty: torch.Tensor, num_valid: torch.Tensor, num_query: int,
                   num_gallery: int) -> RankingResult:
    """RankingResult from the accumulated per-query values (shared with Triton).

    Raises ``ValueError`` when no query is valid; mAP and mINP are float64 sums over all
    queries (0 for skipped ones) divided by the number of valid queries.
    """
    valid_queries = int(num_valid)
    if valid_queries == 0:
        raise ValueError(f"evaluate_ranking: none of the {num_query} queries has a true match among the "
                         f"{num_gallery} gallery entries (same identity, not junk); nothing to evaluate")
    cmc = first_match_counts.cumsum(0) / valid_queries
    return RankingResult(cmc=cmc, mAP=float(average_precision.sum()) / valid_queries,
                         mINP=float(inverse_negative_penalty.sum()) / valid_queries,
                         num_valid_queries=valid_queries)
