"""Compiled CPU launcher of ``evaluate_ranking`` (csrc/cpu/evaluation.cpp).

Algorithm: query rows are taken in tiles; torch's GEMM writes the tile's inner
products with the whole gallery into one reused buffer, a C++/OpenMP pass converts them
to distances in place (squared Euclidean for ``euclidean``: the reference ranks the
squares), and a second pass (one query per task, ``rank_tile_screened_f32``) computes
each query's first-match rank, AP and INP without sorting the gallery: the true matches
get exact distances (the reference's fixed-order inner product, ``_C.screen_dot``) and are
sorted, and each non-junk negative is counted in the gap between the true matches it
falls into, from its GEMM distance, or from its exact distance when a true match lies
within the GEMM's error bound of it (``_tiles.band``, about ``D 2^-24 |q| |g|``). That is
the reference's ranking ((exact distance, gallery index) order, so ties rank by gallery
index and copies of one gallery vector tie exactly), whatever the GEMM's rounding at a
pair's position. CMC, mAP and mINP are then reduced in float64 over the valid queries,
in the reference's order. float64 inputs run the reference itself.

int8 screening, only when forced (``FASTASSOC_CPU_SCREEN=always``, see :mod:`._screen`):
the tiles come from an int8 GEMM (4-5x the float32 GEMM's speed) with its wider error
bound and the same ranking kernel, hence the same exact result; at W-eval the wide band
makes it slower than the float32 path, so it is not the default.

Must equal :func:`fastassoc.kernels.reference.evaluation.evaluate_ranking_reference`:
identical CMC / first-match ranks, AP and INP up to float64 summation order.

Memory: one tile of at most ``max(tile_elements() / 4, G)`` elements (4M floats, 16 MiB,
by default: at W-eval 8 % of a Q x G float32 matrix, under the quarter the issue
allows), plus O(Q + G) vectors and O(true matches) per thread.
"""
from __future__ import annotations

import torch

from ... import _backend
from ...ops.evaluation import RankingResult
from ..reference import _tiles
from ..reference.evaluation import evaluate_ranking_reference
from . import _screen
from ._core import DotTiles, core, prepare, ptr, scratch_buffer, squared_norms

_METRIC_CODES = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}


# Query rows per tile: tile_elements / (4 G), the reference's chunks (memory only: the
# exact rescoring makes results independent of the tiling).
_REFERENCE_WORKSPACE_FACTOR = 4


def _rows_per_tile(num_query: int, num_gallery: int) -> int:
    step = _backend.tile_elements() // (max(num_gallery, 1) * _REFERENCE_WORKSPACE_FACTOR)
    return max(1, min(num_query, step))


def evaluate_ranking_cpu(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                         gallery_pids: torch.Tensor, query_cameras: torch.Tensor, gallery_cameras: torch.Tensor,
                         metric: str, max_rank: int, precision: str) -> RankingResult:
    """CMC, mAP and mINP under the Market-1501 / MARS protocol (see the module docstring).

    Parameters
    ----------
    query : Tensor [Q, D], float;  gallery : Tensor [G, D], same dtype
    query_pids, gallery_pids, query_cameras, gallery_cameras : Tensor [Q] / [G], int64
    metric : {"euclidean", "sqeuclidean", "cosine"}
    max_rank : int >= 1
    precision : {"highest", "tf32"} (CPU GEMMs are always full precision)

    Returns
    -------
    RankingResult

    Raises
    ------
    ValueError
        When no query has a true match in the gallery.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    first_rank = torch.zeros(num_query, dtype=torch.int64)
    ap = torch.zeros(num_query, dtype=torch.float64)
    inp = torch.zeros(num_query, dtype=torch.float64)
    if num_query and num_gallery:
        queries = prepare(query, metric)
        gallery_rows = prepare(gallery, metric)
        query_norms = squared_norms(queries, metric)
        gallery_norms = squared_norms(gallery_rows, metric)
        # Screened only when forced: see the module docstring (auto must equal the reference).
        if (_screen.mode() == "always" and _screen.worthwhile(queries, num_gallery, 1)
                and _screen.worthwhile(gallery_rows, num_query, 1)):
            # Queries are torch._int_mm's first operand (full range is exact wherever int8 screening
            # runs); the gallery gets the levels the probe allows (_screen.int8_column_levels).
            quantized = _screen.QRows.quantize(queries, 127), _screen.QRows.quantize(gallery_rows)
            if quantized[0] is not None and quantized[1] is not None:
                _rank_screened(queries, gallery_rows, *quantized, query_norms, gallery_norms, query_pids.contiguous(),
                               gallery_pids.contiguous(), query_cameras.contiguous(), gallery_cameras.contiguous(),
                               metric, first_rank, ap, inp)
                return _finish(first_rank, ap, inp, max_rank)
        if queries.dtype == torch.float64:
            # The exact rescoring kernels are float32 only; float64 ranks as the reference.
            return evaluate_ranking_reference(query, gallery, query_pids, gallery_pids, query_cameras,
                                              gallery_cameras, metric, max_rank, precision)
        _rank_exact(queries, gallery_rows, query_norms, gallery_norms, query_pids.contiguous(),
                    gallery_pids.contiguous(), query_cameras.contiguous(), gallery_cameras.contiguous(), metric,
                    first_rank, ap, inp)
    return _finish(first_rank, ap, inp, max_rank)


def _rank_exact(queries, gallery_rows, query_norms, gallery_norms, query_pids, gallery_pids, query_cameras,
                gallery_cameras, metric, first_rank, ap, inp) -> int:
    """Per-query statistics from float32 GEMM tiles, ranked by exact distances.

    ``rank_tile_screened_f32`` gives the true matches their exact distances and rescores a
    negative whenever a true match lies within its error band, here the float32 GEMM's
    (``_tiles.band``, a few ``D * 2^-24 |q| |g|``): the reference's ranking, whatever the
    GEMM's rounding at a pair's position. Returns how many negatives were rescored.
    """
    ranking = "cosine" if metric == "cosine" else "sqeuclidean"
    bounds = _tiles.band(queries, gallery_rows, ranking, query_norms, gallery_norms).contiguous()
    step = _rows_per_tile(queries.shape[0], gallery_rows.shape[0])
    buffer = scratch_buffer(step * gallery_rows.shape[0], torch.float32)

    def gemm_tile(start, stop):
        tile = buffer[: (stop - start) * gallery_rows.shape[0]].view(stop - start, gallery_rows.shape[0])
        return torch.mm(queries[start:stop], gallery_rows.T, out=tile)

    return _rank_tiles(gemm_tile, step, bounds, queries, gallery_rows, query_norms, gallery_norms, query_pids,
                       gallery_pids, query_cameras, gallery_cameras, ranking, first_rank, ap, inp)


def _rank_screened(queries, gallery_rows, quantized_query, quantized_gallery, query_norms, gallery_norms, query_pids,
                   gallery_pids, query_cameras, gallery_cameras, metric, first_rank, ap, inp) -> int:
    """Per-query statistics from int8-screened tiles (:mod:`._screen`); returns how many
    negatives needed an exact distance (their error band held a true match)."""
    ranking = "cosine" if metric == "cosine" else "sqeuclidean"   # sqrt is monotone: rank squared
    bounds = _screen.row_bounds(quantized_query, quantized_gallery, ranking, query_norms, gallery_norms)
    step = _rows_per_tile(queries.shape[0], gallery_rows.shape[0])
    tiles = DotTiles(step * gallery_rows.shape[0], torch.float32)
    return _rank_tiles(lambda start, stop: tiles.mm(quantized_query[start:stop], quantized_gallery), step, bounds,
                       queries, gallery_rows, query_norms, gallery_norms, query_pids, gallery_pids, query_cameras,
                       gallery_cameras, ranking, first_rank, ap, inp)


def _rank_tiles(approximate_dots, step, bounds, queries, gallery_rows, query_norms, gallery_norms, query_pids,
                gallery_pids, query_cameras, gallery_cameras, ranking, first_rank, ap, inp) -> int:
    """Rank query rows in tiles of ``step``: ``approximate_dots(start, stop)`` gives a tile's
    approximate inner products, turned into distances in place and ranked with the exact
    rescoring of ``rank_tile_screened_f32`` within ``bounds``; returns how many negatives
    needed an exact distance."""
    num_query, num_gallery = queries.shape[0], gallery_rows.shape[0]
    distance_tile, rank_tile = core().distance_tile_f32, core().rank_tile_screened_f32
    code = _METRIC_CODES[ranking]
    exact_count = torch.zeros(1, dtype=torch.int64)
    item = first_rank.element_size()
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        tile = approximate_dots(start, stop)
        distance_tile(ptr(tile), stop - start, num_gallery, code,
                      ptr(query_norms) + start * 4 if query_norms is not None else 0, ptr(gallery_norms))
        rank_tile(ptr(tile), stop - start, num_gallery, ptr(query_pids) + start * item, ptr(gallery_pids),
                  ptr(query_cameras) + start * item, ptr(gallery_cameras), ptr(bounds) + start * 8,
                  ptr(queries) + start * queries.shape[1] * 4, ptr(gallery_rows), queries.shape[1], code,
                  ptr(query_norms) + start * 4 if query_norms is not None else 0, ptr(gallery_norms),
                  ptr(first_rank) + start * item, ptr(ap) + start * 8, ptr(inp) + start * 8, ptr(exact_count))
    return int(exact_count)


def _finish(first_rank: torch.Tensor, ap: torch.Tensor, inp: torch.Tensor, max_rank: int) -> RankingResult:
    valid = first_rank > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("evaluate_ranking: no query has a true match in the gallery (every gallery entry of "
                         "the query identities is junk or missing), so CMC and mAP are undefined")
    hits = torch.bincount((first_rank[valid] - 1).clamp_max(max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = hits.cumsum(0).to(torch.float64) / num_valid
    # Skipped queries hold 0: summing all of them, then dividing, is the reference's reduction.
    return RankingResult(cmc=cmc, mAP=float(ap.sum()) / num_valid, mINP=float(inp.sum()) / num_valid,
                         num_valid_queries=num_valid)
