"""Reference nearest-anchor ranking and mutual kNN: the spec and oracle of ``topk_anchors``
and ``mutual_knn`` (DAL Eqs. 2 and 4, UTAL Eq. 9).

Algorithm
---------
``topk_anchors``: queries are grouped by their segment (a stable argsort of
``query_segments``), so the queries of segment ``s`` only ever meet the anchors
``anchor_offsets[s]:anchor_offsets[s+1]``. Each group is walked in row chunks of at most
``_backend.tile_elements()`` distances (``_tiles.row_chunks``) and
:func:`smallest_k_exact` picks each row's ``k`` smallest *exact* distances (as
``_tiles`` defines them: squared Euclidean ``(|q|^2 + |a|^2) - 2 q.a`` clamped at 0,
Euclidean its square root, cosine ``1 - q_hat . a_hat``, with a fixed-order inner
product, so a pair's distance depends on its two rows only): a float32 GEMM tile
(``_tiles.distance_tile``) proposes, and every column whose GEMM value lies within the
GEMM's rounding bound of the k-th (``_tiles.band``) is rescored exactly.

``mutual_knn``: ``topk_anchors`` in both directions (a -> b and b -> a, one segment
each); a pair ``(i, j)`` is mutual when the key ``i * Nb + j`` of the a -> b lists also
occurs among the keys of the b -> a lists (``torch.isin``), so nothing ``Na x Nb`` is
ever held beyond one tile.

Tie-breaking
------------
Ranking uses the metric's own exact values in the compute dtype (the square root is
taken before ranking for ``"euclidean"``). Copies of one vector get bit-identical
distances wherever they sit in a tile. Equal values go to the smaller anchor index:
:func:`smallest_k` never relies on ``torch.topk``'s tie order. It uses ``topk`` only for
the *value* of the k-th smallest entry (which does not depend on tie order), takes every
entry ``<=`` that value as a candidate (``nonzero``, so columns ascend within a row),
drops the excluded column, and orders the candidates by (value, column) with two stable
sorts. The excluded entry is set to inf first, so it never moves the k-th value.
:func:`smallest_k_exact` ranks its rescored candidates with the same two sorts.

``mutual_knn`` returns the a -> b distance of each pair; the b -> a ranking uses its own
tile (the same formula with the operands swapped).

Limits
------
Distances must be finite (finite features whose squared norms do not overflow the
compute dtype). ``precision`` is accepted and ignored: matmuls run in full float32
unless the caller enabled TF32 globally in torch. Memory is a few tiles plus the
``B x k`` outputs; with massive ties (many entries equal to the k-th value) the
candidate lists grow up to three int64 per tile entry. Python loops run over non-empty
segments only.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._tiles import band, distance_tile, exact_distances, prepare, row_chunks


def smallest_k(tile: torch.Tensor, k: int, skip: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of every row, ordered by (value, column).

    Parameters
    ----------
    tile : Tensor [b, n], floating point, finite; overwritten (skipped entries become inf)
    k : int >= 0
    skip : Tensor [b], int64, optional
        One column per row that must not be returned; a value outside ``[0, n)`` skips nothing.

    Returns
    -------
    values : Tensor [b, k], ``tile.dtype``
    columns : Tensor [b, k], int64
        Rows with fewer than ``k`` eligible entries are padded with ``(inf, -1)``.
    """
    num_rows, num_cols = tile.shape
    values = tile.new_full((num_rows, k), math.inf)
    columns = torch.full((num_rows, k), -1, dtype=torch.int64, device=tile.device)
    width = min(k, num_cols)
    if width == 0 or num_rows == 0:
        return values, columns
    skipping = None
    if skip is not None:
        skipping = (skip >= 0) & (skip < num_cols)
        # An inf entry ranks last, so with k < n it never moves the k-th smallest eligible value.
        tile[skipping.nonzero().squeeze(1), skip[skipping]] = math.inf
    if width < num_cols:
        # The k-th smallest value is the same whichever tied entries topk picked.
        kth = torch.topk(tile, width, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
        rows, cols = (tile <= kth).nonzero(as_tuple=True)
    else:
        rows, cols = torch.ones_like(tile, dtype=torch.bool).nonzero(as_tuple=True)
    # nonzero is row-major, so columns ascend within a row: the stable sorts keep that order among ties.
    if skipping is not None:
        eligible = cols != torch.where(skipping, skip, -1)[rows]
        rows, cols = rows[eligible], cols[eligible]
    return _select(rows, cols, tile[rows, cols], num_rows, width, values, columns)


def _select(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, num_rows: int, width: int,
            values: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each row's ``width`` smallest candidates by (value, column) into ``values`` / ``columns``.

    ``rows``, ``cols`` in row-major order (columns ascending within a row), ``vals`` their values.
    """
    by_value = torch.argsort(vals, stable=True)
    order = by_value[torch.argsort(rows[by_value], stable=True)]
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    keep = rank < width
    rows, rank = rows[keep], rank[keep]
    values[rows, rank] = vals[keep]
    columns[rows, rank] = cols[keep]
    return values, columns


def smallest_k_exact(q: torch.Tensor, a: torch.Tensor, metric: str, k: int, skip: torch.Tensor | None = None,
                     q_sq_norms: torch.Tensor | None = None, a_sq_norms: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest exact distances of every row ``q[r]`` to the rows of ``a``, by (value, column).

    Parameters
    ----------
    q : Tensor [b, D], a : Tensor [n, D], prepared rows (:func:`._tiles.prepare`)
    metric : {"sqeuclidean", "euclidean", "cosine"}
    k : int >= 0
    skip : Tensor [b], int64, optional, one column per row not to return (outside ``[0, n)``: none)
    q_sq_norms, a_sq_norms : Tensor [b], [n], ``(x * x).sum(1)`` (Euclidean metrics)

    Returns
    -------
    values : Tensor [b, k], compute dtype, the exact distances (``_tiles.exact_distances``)
    columns : Tensor [b, k], int64; rows with fewer than ``k`` eligible columns padded ``(inf, -1)``

    The GEMM tile (:func:`._tiles.distance_tile`, squared for "euclidean") proposes: with
    ``t`` a row's k-th smallest eligible tile value and ``B`` its :func:`._tiles.band`, at
    least k columns have exact values ``<= t + B``, so a column whose tile value exceeds
    ``t + 2B`` (plus a margin that keeps square roots apart) is strictly behind the exact
    k-th and is never rescored. Every other eligible column gets its exact distance and the
    candidates are ranked by (exact value, column).
    """
    ranking = "sqeuclidean" if metric == "euclidean" else metric
    num_rows, num_cols = q.shape[0], a.shape[0]
    values = q.new_full((num_rows, k), math.inf)
    columns = torch.full((num_rows, k), -1, dtype=torch.int64, device=q.device)
    width = min(k, num_cols)
    if width == 0 or num_rows == 0:
        return values, columns
    tile = distance_tile(q, a, ranking, a_sq_norms)
    eligible = torch.ones_like(tile, dtype=torch.bool)
    if skip is not None:
        skipping = ((skip >= 0) & (skip < num_cols)).nonzero().squeeze(1)
        eligible[skipping, skip[skipping]] = False
        tile[skipping, skip[skipping]] = math.inf
    if width < num_cols:
        kth = torch.topk(tile, width, dim=1, largest=False, sorted=False).values.amax(dim=1)
        reach = kth.to(torch.float64) + 2 * band(q, a, ranking, q_sq_norms, a_sq_norms)
        # Two squared distances this close may share a float32 square root.
        reach = reach * (1 + 2.0 ** -20) + 1e-300
        eligible &= tile.to(torch.float64) <= reach.unsqueeze(1)
    rows, cols = eligible.nonzero(as_tuple=True)
    vals = exact_distances(q[rows], a[cols], metric, q_sq_norms[rows] if q_sq_norms is not None else None,
                           a_sq_norms[cols] if a_sq_norms is not None else None)
    return _select(rows, cols, vals, num_rows, width, values, columns)


def topk_anchors_reference(queries: torch.Tensor, anchors: torch.Tensor, k: int, metric: str,
                           anchor_offsets: torch.Tensor, query_segments: torch.Tensor, exclude: torch.Tensor,
                           precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest anchors of every query inside its segment, in bounded tiles.

    Parameters
    ----------
    queries : Tensor [B, D], float
    anchors : Tensor [N, D], same dtype
    k : int >= 0
    metric : {"sqeuclidean", "euclidean", "cosine"}
    anchor_offsets : Tensor [S+1], int64, validated offsets
    query_segments : Tensor [B], int64 in [0, S)
    exclude : Tensor [B], int64 in [-1, N)
    precision : str, ignored (full precision)

    Returns
    -------
    distances : Tensor [B, k], float32, ascending per row
    indices : Tensor [B, k], int64, global anchor indices; padding ``(inf, -1)``
    """
    num_queries = queries.shape[0]
    device = queries.device
    distances = torch.full((num_queries, k), math.inf, dtype=torch.float32, device=device)
    indices = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    if k == 0 or num_queries == 0 or anchors.shape[0] == 0:
        return distances, indices
    q = prepare(queries, metric)
    a = prepare(anchors, metric)
    q_sq_norms = (q * q).sum(1) if metric != "cosine" else None
    a_sq_norms = (a * a).sum(1) if metric != "cosine" else None
    bounds = anchor_offsets.tolist()
    order = torch.argsort(query_segments, stable=True)
    counts = torch.bincount(query_segments, minlength=len(bounds) - 1).tolist()
    first = 0
    for segment, count in enumerate(counts):
        rows = order[first:first + count]
        first += count
        low, high = bounds[segment], bounds[segment + 1]
        if count == 0 or high == low:
            continue
        segment_anchors = a[low:high]
        segment_norms = a_sq_norms[low:high] if a_sq_norms is not None else None
        for start, stop in row_chunks(count, high - low):
            chunk = rows[start:stop]
            # exclude - low is a column of this tile only when the excluded anchor is in this segment.
            values, columns = smallest_k_exact(q[chunk], segment_anchors, metric, k, exclude[chunk] - low,
                                               q_sq_norms[chunk] if q_sq_norms is not None else None, segment_norms)
            distances[chunk] = values.to(torch.float32)
            indices[chunk] = torch.where(columns >= 0, columns + low, columns)
    return distances, indices


def nearest_in(queries: torch.Tensor, anchors: torch.Tensor, k: int, metric: str, precision: str,
               topk_anchors: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_anchors`` over one segment holding every anchor, nothing excluded (shared with Triton).

    ``topk_anchors`` is a backend's ``topk_anchors_<backend>`` (default: the reference).
    """
    num_queries, device = queries.shape[0], queries.device
    offsets = torch.tensor([0, anchors.shape[0]], dtype=torch.int64, device=device)
    segments = torch.zeros(num_queries, dtype=torch.int64, device=device)
    exclude = torch.full((num_queries,), -1, dtype=torch.int64, device=device)
    return (topk_anchors or topk_anchors_reference)(queries, anchors, k, metric, offsets, segments, exclude,
                                                    precision)


def mutual_knn_reference(a: torch.Tensor, b: torch.Tensor, k: int, metric: str, max_distance: float | None,
                         precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual k-nearest-neighbour pairs between ``a`` and ``b``.

    Parameters
    ----------
    a : Tensor [Na, D], float
    b : Tensor [Nb, D], same dtype
    k : int >= 0
    metric : {"sqeuclidean", "euclidean", "cosine"}
    max_distance : float or None
        Keep pairs whose returned (float32) distance is ``<= max_distance`` exactly.
    precision : str, ignored

    Returns
    -------
    ia, ib : Tensor [P], int64, sorted by ``(ia, ib)``
    distances : Tensor [P], float32, the a -> b distance of each pair
    """
    ab_distances, ab_indices = nearest_in(a, b, k, metric, precision)
    _, ba_indices = nearest_in(b, a, k, metric, precision)
    return mutual_pairs(ab_distances, ab_indices, ba_indices, max_distance)


def mutual_pairs(ab_distances: torch.Tensor, ab_indices: torch.Tensor, ba_indices: torch.Tensor,
                 max_distance: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual pairs from the k-nearest lists of both sides (shared with Triton).

    Parameters
    ----------
    ab_distances, ab_indices : Tensor [Na, k], float32 / int64: each ``a`` row's nearest ``b`` (padding -1)
    ba_indices : Tensor [Nb, k], int64: each ``b`` row's nearest ``a`` (padding -1)
    max_distance : float or None (kept when the float32 distance is ``<= max_distance``)

    Returns
    -------
    ia, ib : Tensor [P], int64, sorted by ``(ia, ib)``: ``ib`` lists ``ia`` and ``ia`` lists ``ib``
    distances : Tensor [P], float32, the a -> b distance of each pair
    """
    num_a, num_b = ab_indices.shape[0], ba_indices.shape[0]
    device = ab_indices.device
    rows_a = torch.arange(num_a, device=device).unsqueeze(1).expand_as(ab_indices)
    found = ab_indices >= 0
    ia, ib, distances = rows_a[found], ab_indices[found], ab_distances[found]
    rows_b = torch.arange(num_b, device=device).unsqueeze(1).expand_as(ba_indices)
    back = ba_indices >= 0
    keep = torch.isin(ia * num_b + ib, ba_indices[back] * num_b + rows_b[back])
    if max_distance is not None:
        # Compared in float64 so the float32 result is <= max_distance exactly, not after rounding it.
        keep &= distances.to(torch.float64) <= max_distance
    ia, ib, distances = ia[keep], ib[keep], distances[keep]
    order = torch.argsort(ia * num_b + ib)
    return ia[order], ib[order], distances[order]
