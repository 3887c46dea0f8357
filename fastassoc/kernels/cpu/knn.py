"""Compiled CPU backend of the knn family: ``topk_anchors_cpu`` and ``mutual_knn_cpu``.

Algorithm: per segment, bounded tiles of inner products come from torch's GEMM
(``_core.DotTiles``, at most ``_backend.tile_elements()`` entries);
``fastassoc._C.knn_tile_update`` (csrc/cpu/knn.cpp) converts each tile into distances
with precomputed norms and merges it into per-row top-k lists, and for mutual kNN into
per-column lists in the same pass; ``knn_mutual_pairs`` then intersects the two.
When every anchor queries its own segment (queries and anchors are one tensor, the
segments match, ``exclude`` is ``-1`` or the query itself), :func:`self_join_topk`
computes only the upper triangle of each segment's Gram matrix and feeds both
directions from it: about half the GEMM work. Euclidean is ranked as squared
Euclidean and finished with torch's ``sqrt`` (:func:`finish_lists`), as the reference.
Queries not ordered by segment are gathered into segment order once (one B x D copy)
and scattered back. Peak extra memory: one tile plus ``(B + N) * k`` list entries.

Distances are the reference's exact ones (``fastassoc.kernels.reference._tiles``: a
fixed-order inner product, so a pair's distance depends on its two rows only and copies
of one vector tie exactly, wherever they sit in a tile). A float32 GEMM's value for a
pair depends on its position in the output, so GEMM tiles only *propose*: the lists are
``k + SLACK`` wide, their candidates are rescored exactly (``_C.screen_rescore``) and
re-sorted, and a row is kept when the GEMM error bound certifies that no column outside
its list can reach the exact top k; other rows get exact distances to every column
(:func:`refine_lists`). Self-joins of float32 rows (:func:`topk_self_join`: every anchor
querying its own segment, and the soft labels) propose with a bf16 GEMM instead where the
CPU has bf16 dot-product instructions (:mod:`._screen`), with the same rescoring.

Ties go to the smaller index (lists are ordered by (exact distance, index)); tile shape
and thread count do not change results. Must equal
``fastassoc.kernels.reference.knn.topk_anchors_reference`` and
``mutual_knn_reference`` bit for bit.
"""
from __future__ import annotations

import torch

from ... import _backend
from ..reference import _tiles
from . import _core, _screen

_NO_FILTER, _AT_MOST = 0, 1  # knn_mutual_pairs filter codes

# Extra entries of float32-GEMM proposal lists. The float32 GEMM's error band is narrow,
# so a few suffice to certify most rows, and the lists' width is what the tile pass pays
# for (k = 1: width 17 costs ~15 % of the GEMM, width 5 ~4 %); rows with more columns in
# the band (copies of one vector) are searched again with k + _screen.SLACK entries.
FLOAT_SLACK = 4


def proposal_width(k: int, available: int) -> int:
    """Width of float32-GEMM proposal lists for top-k among ``available`` columns (>= k)."""
    return max(k, min(available, k + FLOAT_SLACK))


def new_lists(num_lists: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty top-k lists: values ``inf`` [num_lists, k] (compute dtype), indices -1 (int64)."""
    return (torch.full((num_lists, k), float("inf"), dtype=dtype),
            torch.full((num_lists, k), -1, dtype=torch.int64))


def block_topk(tiles: _core.DotTiles, rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int, *,
               row_norms: torch.Tensor | None = None, col_norms: torch.Tensor | None = None,
               row_base: int = 0, col_base: int = 0, row_ids: torch.Tensor | None = None,
               col_ids: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
               row_lists: tuple[torch.Tensor, torch.Tensor] | None = None,
               col_lists: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Merge every ``rows x cols`` distance into the given top-k lists, tile by tile.

    Parameters
    ----------
    tiles : DotTiles, buffer for the inner-product tiles (compute dtype)
    rows : Tensor [R, D], cols : Tensor [C, D], prepared (``_core.prepare``)
    metric : {"sqeuclidean", "cosine"}
        Euclidean searches pass "sqeuclidean" and finish with :func:`finish_lists`.
    k : int >= 1
    row_norms, col_norms : Tensor [R], [C], squared norms for Euclidean metrics
    row_base, col_base : int, global index of ``rows[0]`` / ``cols[0]`` stored in the lists
    row_ids, col_ids : Tensor [R], [C] int64, optional
        Ids stored in (and tie-broken on by) the lists instead of ``row_base + r`` /
        ``col_base + j``, for rows gathered out of their original order.
    exclude : Tensor [R] int64, optional, column ``col_base + j`` each row skips (-1 none)
    row_lists : (values [R, k], indices [R, k]), optional, updated in place
    col_lists : (values [C, k], indices [C, k]), optional, updated in place
    """
    num_rows, num_cols = rows.shape[0], cols.shape[0]
    if num_rows == 0 or num_cols == 0 or k == 0:
        return
    update = _core.kernel("knn_tile_update")
    code = _core.METRIC_CODES[metric]
    double = _core.is_double(rows)
    row_values, row_indices = row_lists if row_lists is not None else (None, None)
    col_values, col_indices = col_lists if col_lists is not None else (None, None)
    for r0, r1, c0, c1 in _core.tiles(num_rows, num_cols):
        dots = tiles.mm(rows[r0:r1], cols[c0:c1])
        update(
            _core.ptr(dots), double, r1 - r0, c1 - c0, c1 - c0, code,
            _core.ptr(row_norms[r0:r1]) if row_norms is not None else 0,
            _core.ptr(col_norms[c0:c1]) if col_norms is not None else 0,
            row_base + r0, col_base + c0,
            _core.ptr(row_ids[r0:r1]) if row_ids is not None else 0,
            _core.ptr(col_ids[c0:c1]) if col_ids is not None else 0,
            _core.ptr(exclude[r0:r1]) if exclude is not None else 0, k,
            _core.ptr(row_values[r0:r1]) if row_values is not None else 0,
            _core.ptr(row_indices[r0:r1]) if row_indices is not None else 0,
            _core.ptr(col_values[c0:c1]) if col_values is not None else 0,
            _core.ptr(col_indices[c0:c1]) if col_indices is not None else 0)


# Row-panel height of the symmetric (self-join) path: a panel of h rows computes h^2 / 2
# entries of the lower triangle it does not need (h / n of the work in all), while taller
# panels run the GEMM faster. Measured (2 threads, Zen 4, MKL, 12,936 x 2,048 float32, the
# panel GEMMs alone): h = 256: 2.20 s (159 GFLOP/s), 384: 2.06 s, 512: 2.01 s, 768: 1.96 s
# (185 GFLOP/s, 5.9 % extra work), 1,024: 2.02 s; W-jaccard on the float32 path 3.14 ->
# 2.96 s with 768, the bf16-screened path unchanged (2.16 / 2.13 s). So panels are n / 16
# rows (extra work <= 1/32), at least 256 and at most 768, and within the tile budget.
SELF_JOIN_PANEL_MIN_ROWS = 256
SELF_JOIN_PANEL_MAX_ROWS = 768


def self_join_panel_rows(n: int) -> int:
    """Row-panel height of :func:`self_join_topk` for ``n`` rows (before the tile budget)."""
    return min(n, SELF_JOIN_PANEL_MAX_ROWS, max(SELF_JOIN_PANEL_MIN_ROWS, n // 16))


def self_join_topk(x: torch.Tensor, metric: str, k: int, lists: tuple[torch.Tensor, torch.Tensor], *,
                   norms: torch.Tensor | None = None, base: int = 0, exclude_self: bool = False) -> None:
    """Every row of ``x`` searches all rows of ``x``: the k smallest of each row into ``lists``.

    The Gram matrix is symmetric, so only its upper triangle is computed: row panel
    ``[p0, p1)`` is multiplied with rows ``[p0, n)``; the panel's diagonal block updates
    the panel's lists, the block right of it updates the panel's lists (row side) and the
    lists of rows ``>= p1`` (column side) from the same dot products. About half the GEMM
    work of :func:`block_topk` for the same result (each distance is computed once, so
    ``d(i, j)`` and ``d(j, i)`` are bit-identical).

    Parameters
    ----------
    x : Tensor [n, D], prepared rows
    metric : {"sqeuclidean", "cosine"}
    k : int >= 1
    lists : (values [n, k], indices [n, k]), updated in place; ids stored are ``base + j``
    norms : Tensor [n], squared norms for "sqeuclidean"
    exclude_self : bool, skip the pair (i, i)
    """
    n = x.shape[0]
    if n == 0 or k == 0:
        return
    update = _core.kernel("knn_tile_update")
    code = _core.METRIC_CODES[metric]
    double = _core.is_double(x)
    values, indices = lists
    limit = _backend.tile_elements()
    height = max(1, min(self_join_panel_rows(n), limit // n if limit >= n else 1))
    width_limit = max(1, limit // height)
    tiles = _core.DotTiles(height * min(n, width_limit), x.dtype)
    itself = torch.arange(base, base + n, dtype=torch.int64) if exclude_self else None
    norm_ptr = (lambda start: _core.ptr(norms[start:]) if norms is not None else 0)  # noqa: E731
    for p0 in range(0, n, height):
        p1 = min(p0 + height, n)
        for c0 in range(p0, n, width_limit):
            c1 = min(c0 + width_limit, n)
            dots = tiles.mm(x[p0:p1], x[c0:c1])
            width = c1 - c0
            # One region per tile (issue 11: each region waits for its slowest thread). Every
            # column updates the rows' lists; only columns past the panel update their own:
            # for those this tile is the only place (i, j) and (j, i) meet, while (j, i) of a
            # column inside the panel is a row of this panel's too.
            split = min(max(p1, c0), c1)
            update(dots.data_ptr(), double, p1 - p0, width, width, code, norm_ptr(p0), norm_ptr(c0),
                   base + p0, base + c0, 0, 0, _core.ptr(itself[p0:p1]) if itself is not None else 0, k,
                   _core.ptr(values[p0:p1]), _core.ptr(indices[p0:p1]),
                   _core.ptr(values[split:c1]) if c1 > split else 0,
                   _core.ptr(indices[split:c1]) if c1 > split else 0, col_first=split - c0)


def self_join_screen(x: torch.Tensor, n: int, width: int) -> str | None:
    """The screening GEMM of a self-join of ``x`` [n, D] with lists of ``width``: "bf16" where
    :func:`._screen.worthwhile` allows it, else None (float32 proposals).

    :func:`topk_self_join` also takes "int8" (``_screen.QRows``, columns as wide as this
    process's int8 GEMM is exact for), which bench/bench_avx2_rerank.py forces to weigh it
    where bf16 is not fast (AVX2-only CPUs: int8 at 2x float32 with 64-level columns). Not
    chosen here: kNN lists often end in the bulk of the distances, where the int8 error bound
    (Cauchy-Schwarz on the rows' quantisation errors, about 0.04 in cosine at 64 levels) is
    wider than the bulk. Measured under an emulated AVX2 CPU (DNNL_MAX_CPU_ISA=AVX2, Zen 4,
    2 threads, float32 = 1): int8 left 99.5 % of W-jaccard's rows uncertified (2.0x), 65 %
    of W-soft's (1.7x), 36 % of W-merge's (1.15x), 99.6 % of W-rank k = 10's (2.3x) and 7 %
    of W-rank k = 1's (0.91x); a 64-row pilot that chose int8 only where >= 85 % certified
    came to 0.99x at W-rank k = 1 and 1.13-1.15x where it declined (commit f798771).
    """
    if _screen.worthwhile(x, n, width, "bf16"):
        return "bf16"
    return None


def topk_self_join(x: torch.Tensor, metric: str, k: int, lists: tuple[torch.Tensor, torch.Tensor], *,
                   norms: torch.Tensor | None = None, base: int = 0, exclude_self: bool = False) -> None:
    """:func:`self_join_topk` into fresh ``lists``, screened by a bf16 or int8 GEMM where it
    pays (:func:`self_join_screen`).

    Screened (:mod:`._screen`): the bf16 or int8 self-join keeps ``k + _screen.slack(k)`` approximate
    candidates per row, they are rescored exactly (those the error bound cannot rule out:
    :func:`._screen.rescore_pruned`) and re-sorted, and rows whose top k is
    not certified by the error bound are searched again with the float32 GEMM. The lists
    come back sorted by (value, index) either way.
    """
    n = x.shape[0]
    available = n - 1 if exclude_self else n
    width = min(available, k + _screen.slack(k))
    if n == 0 or k == 0:
        return
    quantized = None
    kind = self_join_screen(x, n, width) if width > k else None
    if kind is not None:
        # None for non-finite inputs; int8 columns as wide as this process's GEMM is exact for.
        quantized = _screen.BRows.quantize(x) if kind == "bf16" else _screen.QRows.quantize(x)
    if quantized is None:
        # float32 GEMM proposals, refined to exact distances (see refine_lists).
        proposals = new_lists(n, proposal_width(k, available), x.dtype)
        self_join_topk(x, metric, proposals[0].shape[1], proposals, norms=norms, base=base, exclude_self=exclude_self)
        exclude = torch.arange(base, base + n, dtype=torch.int64) if exclude_self else None
        refine_lists(x, x, metric, k, proposals, lists, row_norms=norms, col_norms=norms, col_base=base,
                     exclude=exclude, available=available)
        return
    approx_values, candidates = new_lists(n, width, torch.float32)
    self_join_topk(quantized, metric, width, (approx_values, candidates), norms=norms, base=base,
                   exclude_self=exclude_self)
    sort_lists(approx_values, candidates)
    exact = _screen.rescore_pruned(x, x, candidates, approx_values, quantized, quantized, metric, k, col_base=base,
                                   row_norms=norms, col_norms=norms)
    sort_lists(exact, candidates)   # approx_values stays sorted: only its last column is read below
    values, indices = lists
    values.copy_(exact[:, :k])
    indices.copy_(candidates[:, :k])
    lower = _screen.lower_outside(quantized, quantized, metric, approx_values[:, -1], norms, norms)
    certified = _screen.certify(approx_values, exact[:, k - 1], lower, available)
    _fall_back(x, x, metric, k, lists, torch.nonzero(~certified).flatten(), row_norms=norms, col_norms=norms,
               col_base=base, exclude=torch.arange(base, base + n, dtype=torch.int64) if exclude_self else None)


def _fall_back(rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int, lists: tuple[torch.Tensor, torch.Tensor],
               failed: torch.Tensor, *, row_norms: torch.Tensor | None, col_norms: torch.Tensor | None,
               col_base: int, exclude: torch.Tensor | None) -> None:
    """Rows ``failed`` (not certified by the screening GEMM): their exact k nearest by
    (exact distance, index), written over their lists.

    The same exact distances as the rescoring (``_screen.rescore``), so a row's result does
    not depend on the path it took (hence not on the thread count or tiling of the
    approximate GEMM): float32 GEMM tiles propose ``k + SLACK`` candidates and
    :func:`refine_lists` decides. ``exclude`` [R] (global column per row, -1 none) covers
    all rows of ``rows``. Chunks keep each block within the tile limit.
    """
    if failed.numel() == 0:
        return
    values, indices = lists
    num_cols = cols.shape[0]
    chunk_exclude = exclude[failed].contiguous() if exclude is not None else None
    available = num_cols
    if chunk_exclude is not None:
        available = num_cols - ((chunk_exclude >= col_base) & (chunk_exclude < col_base + num_cols)).to(torch.int64)
    width = max(k, min(num_cols, k + _screen.SLACK))
    chunk_rows = rows[failed].contiguous()
    chunk_norms = row_norms[failed].contiguous() if row_norms is not None else None
    exclude = chunk_exclude
    proposals = new_lists(failed.numel(), width, values.dtype)
    tiles = _core.DotTiles.for_blocks([(failed.numel(), num_cols)], values.dtype)
    block_topk(tiles, chunk_rows, cols, metric, width, row_norms=chunk_norms, col_norms=col_norms,
               col_base=col_base, exclude=exclude, row_lists=proposals)
    found = new_lists(failed.numel(), k, values.dtype)
    refine_lists(chunk_rows, cols, metric, k, proposals, found, row_norms=chunk_norms, col_norms=col_norms,
                 col_base=col_base, exclude=exclude, available=available)
    values[failed] = found[0]
    indices[failed] = found[1]


def refine_lists(rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int,
                 proposals: tuple[torch.Tensor, torch.Tensor], lists: tuple[torch.Tensor, torch.Tensor], *,
                 row_norms: torch.Tensor | None = None, col_norms: torch.Tensor | None = None, col_base: int = 0,
                 exclude: torch.Tensor | None = None, available: torch.Tensor | int,
                 allowed=None, row_stats: _core.RowStats | None = None,
                 col_stats: _core.RowStats | None = None) -> None:
    """Exact top-k lists from float32-GEMM proposals: the reference's definition of distance.

    A float32 GEMM's value for a pair depends on the pair's position in the tile, so copies
    of one vector can get different distances; the exact distance (``_screen.rescore``:
    fixed-order float64 accumulation, the reference's ``_tiles.exact_distances``) depends on
    the two rows only. ``proposals`` hold each row's ``W >= k`` best columns by GEMM value
    (from :func:`block_topk` / :func:`self_join_topk`, any order; overwritten); those within
    two GEMM error bounds (``_tiles.band``) of the k-th are rescored exactly, the others
    cannot reach the top k, and the list is sorted by (exact distance, index).
    A row is certified when its list holds every eligible column or when the GEMM error
    bound (:class:`._screen.FRows`) puts every column outside the list strictly behind the
    exact k-th; other rows get exact distances to every eligible column (:func:`_exact_rows`).

    Parameters
    ----------
    rows : Tensor [R, D], cols : Tensor [C, D], prepared rows (float32 or float64)
    metric : {"sqeuclidean", "cosine"} (ranking metric)
    k : int >= 1, at most ``W``
    proposals : (values [R, W], indices [R, W]), global column ids ``col_base + j``, -1 padding
    lists : (values [R, k], indices [R, k]), written
    row_norms, col_norms : squared norms for "sqeuclidean"
    exclude : Tensor [R] int64, optional: the global column each row skips (-1 none)
    available : int or Tensor [R], the number of eligible columns per row
    allowed : callable(row_positions [c]) -> bool [c, C], optional: the eligible columns of
        those rows (exclusions beyond ``exclude``), for the exact fallback
    row_stats, col_stats : _core.RowStats, optional: ``rows`` / ``cols``'s row statistics
        when the caller has them (slices of one op-wide computation); the error bounds then
        read them instead of recomputing them (same values, fewer parallel regions)
    """
    if rows.shape[0] == 0:
        return
    refinement = Refinement(rows, cols, metric, k, proposals, row_norms=row_norms, col_norms=col_norms,
                            col_base=col_base, row_stats=row_stats, col_stats=col_stats)
    distances = _screen.exact_distances(rows, cols, refinement.row_index, refinement.col_index, metric,
                                        row_norms=row_norms, col_norms=col_norms)
    refinement.finish(lists, distances, exclude=exclude, available=available, allowed=allowed)


class Refinement:
    """:func:`refine_lists` in two steps around its exact rescoring.

    Construction sorts the proposals and selects the candidates to rescore: pairs
    ``(rows[row_index[e]], cols[col_index[e]])``; :meth:`finish` takes their exact distances
    (``_screen.exact_distances``, in that order) and writes the lists. A caller refining
    many blocks of one tensor (cross_camera_graph's camera pairs) rescores the pairs of all
    blocks in one kernel call, one parallel region instead of one per block (issue 11).
    Arguments as :func:`refine_lists`; ``rows`` must have at least one row.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int,
                 proposals: tuple[torch.Tensor, torch.Tensor], *, row_norms: torch.Tensor | None = None,
                 col_norms: torch.Tensor | None = None, col_base: int = 0,
                 row_stats: _core.RowStats | None = None, col_stats: _core.RowStats | None = None):
        self.rows, self.cols, self.metric, self.k = rows, cols, metric, k
        self.proposals, self.row_norms, self.col_norms, self.col_base = proposals, row_norms, col_norms, col_base
        self.row_stats, self.col_stats = row_stats, col_stats
        approx_values, candidates = proposals
        sort_lists(approx_values, candidates)
        # Only candidates within two error bounds of the k-th GEMM value can be among the exact
        # k nearest (the first k are within one bound of their exact values); the rest rank
        # behind them and stay inf.
        bound = _tiles.band(rows, cols, metric,
                            row_norms if row_norms is not None or row_stats is None else row_stats.sq,
                            col_norms if col_norms is not None or col_stats is None else col_stats.sq)
        reach = (approx_values[:, k - 1].to(torch.float64) + 2 * bound) * (1 + 2.0 ** -20)
        self.row_index, self.slot = ((approx_values.to(torch.float64) <= reach.unsqueeze(1)) & (candidates >= 0)
                                     ).nonzero(as_tuple=True)
        self.col_index = candidates[self.row_index, self.slot] - col_base

    def finish(self, lists: tuple[torch.Tensor, torch.Tensor], distances: torch.Tensor, *,
               exclude: torch.Tensor | None = None, available: torch.Tensor | int, allowed=None) -> None:
        """Write the exact lists from ``distances`` [E] of the selected pairs (see the class)."""
        rows, cols, metric, k = self.rows, self.cols, self.metric, self.k
        row_norms, col_norms, col_base = self.row_norms, self.col_norms, self.col_base
        row_stats, col_stats = self.row_stats, self.col_stats
        approx_values, candidates = self.proposals
        values, indices = lists
        exact = torch.full_like(approx_values, float("inf"))
        exact[self.row_index, self.slot] = distances
        sort_lists(exact, candidates)
        values.copy_(exact[:, :k])
        indices.copy_(torch.where(torch.isinf(exact[:, :k]), -1, candidates[:, :k]))
        row_bounds = _screen.FRows(rows, row_norms, row_stats.length if row_stats is not None else None)
        col_bounds = row_bounds if cols is rows else _screen.FRows(
            cols, col_norms, col_stats.length if col_stats is not None else None)
        lower = _screen.lower_outside(row_bounds, col_bounds, metric, approx_values[:, -1], row_norms, col_norms)
        uncertain = torch.nonzero(~_screen.certify(approx_values, exact[:, k - 1], lower, available)).flatten()
        if uncertain.numel() and allowed is None and approx_values.shape[1] < k + _screen.SLACK:
            # Wider lists for these rows from a float32 GEMM of them alone, then exact rows.
            _fall_back(rows, cols, metric, k, lists, uncertain, row_norms=row_norms, col_norms=col_norms,
                       col_base=col_base, exclude=exclude)
            return
        _exact_rows(rows, cols, metric, k, lists, uncertain, row_norms=row_norms, col_norms=col_norms,
                    col_base=col_base, exclude=exclude, allowed=allowed)


def _exact_rows(rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int, lists: tuple[torch.Tensor, torch.Tensor],
                failed: torch.Tensor, *, row_norms: torch.Tensor | None, col_norms: torch.Tensor | None,
                col_base: int, exclude: torch.Tensor | None = None, allowed=None) -> None:
    """Rows ``failed``: exact distances to every eligible column, the k smallest by (distance, index)."""
    values, indices = lists
    num_cols = cols.shape[0]
    if failed.numel() == 0 or num_cols == 0:
        return
    step = max(1, _backend.tile_elements() // max(num_cols, 1))
    columns = torch.arange(col_base, col_base + num_cols, dtype=torch.int64)
    for start in range(0, failed.numel(), step):
        chunk = failed[start:start + step]
        candidates = columns.expand(chunk.numel(), num_cols).clone()   # sorted in place below
        exact = _screen.rescore(rows[chunk].contiguous(), cols, candidates, metric, col_base=col_base,
                                row_norms=row_norms[chunk].contiguous() if row_norms is not None else None,
                                col_norms=col_norms)
        if exclude is not None:
            skip = exclude[chunk] - col_base
            inside = ((skip >= 0) & (skip < num_cols)).nonzero().flatten()
            exact[inside, skip[inside]] = float("inf")
        if allowed is not None:
            exact[~allowed(chunk)] = float("inf")
        sort_lists(exact, candidates)
        found = exact[:, :k]
        values[chunk] = found
        indices[chunk] = torch.where(torch.isinf(found), -1, candidates[:, :k])


def sort_lists(values: torch.Tensor, indices: torch.Tensor) -> None:
    """Put lists filled by :func:`block_topk` into ascending (value, index) order, in place."""
    if values.numel():
        _core.kernel("knn_sort_lists")(_core.ptr(values), _core.ptr(indices), _core.is_double(values),
                                    values.shape[0], values.shape[1])


def ranking_metric(metric: str) -> str:
    """The metric the tile kernels rank by: Euclidean ranks as squared Euclidean."""
    return "sqeuclidean" if metric == "euclidean" else metric


def finish_lists(values: torch.Tensor, indices: torch.Tensor, metric: str) -> None:
    """Sort lists after :func:`block_topk`; for Euclidean take torch's square root first.

    torch's float sqrt (MKL VML) is not always correctly rounded, so the reference's
    Euclidean values come from torch; re-sorting by (sqrt value, index) keeps its tie rule
    where two squared distances round to one square root.
    """
    if metric == "euclidean":
        values.sqrt_()
    sort_lists(values, indices)


def mutual_pairs(row_lists, col_lists, *, row_base: int = 0, col_base: int = 0, filter_code: int = _NO_FILTER,
                 threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, value) with j in row list i and i in column list j, sorted by (i, j) (global indices)."""
    row_values, row_indices = row_lists
    _, col_indices = col_lists
    k = row_values.shape[1]
    rows, cols, values = _core.kernel("knn_mutual_pairs")(
        _core.ptr(row_values), _core.ptr(row_indices), row_values.shape[0], _core.ptr(col_indices),
        col_indices.shape[0], k, _core.is_double(row_values), row_base, col_base, filter_code, threshold)
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(values)


def _segment_runs(query_segments: torch.Tensor, num_segments: int) -> tuple[torch.Tensor | None, list[int]]:
    """(order or None when already grouped, query offsets per segment)."""
    counts = torch.bincount(query_segments, minlength=num_segments)
    starts = [0] + torch.cumsum(counts, 0).tolist()
    grouped = query_segments.numel() < 2 or bool((query_segments[1:] >= query_segments[:-1]).all())
    order = None if grouped else torch.argsort(query_segments, stable=True)
    return order, starts


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are the same contiguous rows (one tensor passed twice)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _excludes_only_self(exclude: torch.Tensor) -> bool:
    """True when ``exclude`` is all -1 or exactly ``arange(B)`` (each query skips itself)."""
    if exclude.numel() == 0:
        return True
    if int(exclude[0]) == -1:
        return bool((exclude == -1).all())
    return bool((exclude == torch.arange(exclude.numel())).all())


def topk_anchors_cpu(queries: torch.Tensor, anchors: torch.Tensor, k: int, metric: str,
                     anchor_offsets: torch.Tensor, query_segments: torch.Tensor, exclude: torch.Tensor,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`fastassoc.topk_anchors`; ``precision`` is ignored (full float32 on CPU)."""
    num_queries = queries.shape[0]
    dtype = _core.compute_dtype(queries)
    values, indices = new_lists(num_queries, k, dtype)
    if num_queries == 0 or k == 0 or anchors.shape[0] == 0:
        return values.to(torch.float32), indices
    num_segments = anchor_offsets.shape[0] - 1
    order, query_starts = _segment_runs(query_segments, num_segments)
    q = _core.prepare(queries if order is None else queries[order], metric)
    same = order is None and _same_rows(queries, anchors)
    a = q if same else _core.prepare(anchors, metric)
    skip = exclude if order is None else exclude[order].contiguous()
    q_norms = _core.squared_norms(q, metric)
    a_norms = q_norms if a is q else _core.squared_norms(a, metric)
    ranking = ranking_metric(metric)
    bounds = anchor_offsets.tolist()
    blocks = [(query_starts[s], query_starts[s + 1], bounds[s], bounds[s + 1]) for s in range(num_segments)]
    blocks = [b for b in blocks if b[1] > b[0] and b[3] > b[2]]
    if same and query_starts == bounds and _excludes_only_self(exclude):
        # Every anchor queries its own segment: symmetric blocks, half the GEMM work.
        exclude_self = bool(exclude.numel()) and int(exclude[0]) == 0
        for q0, q1, _, _ in blocks:
            topk_self_join(q[q0:q1], ranking, k, (values[q0:q1], indices[q0:q1]),
                           norms=q_norms[q0:q1] if q_norms is not None else None, base=q0,
                           exclude_self=exclude_self)
    else:
        tiles = _core.DotTiles.for_blocks([(q1 - q0, a1 - a0) for q0, q1, a0, a1 in blocks], dtype)
        for q0, q1, a0, a1 in blocks:
            row_norms = q_norms[q0:q1] if q_norms is not None else None
            col_norms = a_norms[a0:a1] if a_norms is not None else None
            block_skip = skip[q0:q1]
            available = (a1 - a0) - ((block_skip >= a0) & (block_skip < a1)).to(torch.int64)
            proposals = new_lists(q1 - q0, proposal_width(k, a1 - a0), dtype)
            block_topk(tiles, q[q0:q1], a[a0:a1], ranking, proposals[0].shape[1], row_norms=row_norms,
                       col_norms=col_norms, col_base=a0, exclude=block_skip, row_lists=proposals)
            refine_lists(q[q0:q1], a[a0:a1], ranking, k, proposals, (values[q0:q1], indices[q0:q1]),
                         row_norms=row_norms, col_norms=col_norms, col_base=a0, exclude=block_skip,
                         available=available)
    finish_lists(values, indices, metric)
    values = values.to(torch.float32)
    if order is not None:
        values = torch.empty_like(values).index_copy_(0, order, values)
        indices = torch.empty_like(indices).index_copy_(0, order, indices)
    return values, indices


def exact_block_lists(rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int,
                      row_norms: torch.Tensor | None = None, col_norms: torch.Tensor | None = None, *,
                      row_base: int = 0, col_base: int = 0, tiles: _core.DotTiles | None = None,
                      row_stats: _core.RowStats | None = None, col_stats: _core.RowStats | None = None
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Exact k-nearest lists of both sides of one ``rows x cols`` block from one GEMM pass.

    Returns ``(row_lists, col_lists)``: each row's k nearest columns (ids ``col_base + j``)
    and each column's k nearest rows (ids ``row_base + i``), sorted by (exact distance, id).
    The GEMM tiles fill proposal lists ``k + FLOAT_SLACK`` wide on both sides
    (:func:`block_topk`); :func:`refine_lists` makes each side exact (``row_stats`` /
    ``col_stats``: see there).
    """
    dtype = rows.dtype
    num_rows, num_cols = rows.shape[0], cols.shape[0]
    row_proposals, col_proposals = block_proposals(rows, cols, metric, k, row_norms, col_norms, row_base=row_base,
                                                   col_base=col_base, tiles=tiles)
    row_lists, col_lists = new_lists(num_rows, k, dtype), new_lists(num_cols, k, dtype)
    refine_lists(rows, cols, metric, k, row_proposals, row_lists, row_norms=row_norms, col_norms=col_norms,
                 col_base=col_base, available=num_cols, row_stats=row_stats, col_stats=col_stats)
    refine_lists(cols, rows, metric, k, col_proposals, col_lists, row_norms=col_norms, col_norms=row_norms,
                 col_base=row_base, available=num_rows, row_stats=col_stats, col_stats=row_stats)
    return row_lists, col_lists


def block_proposals(rows: torch.Tensor, cols: torch.Tensor, metric: str, k: int,
                    row_norms: torch.Tensor | None = None, col_norms: torch.Tensor | None = None, *,
                    row_base: int = 0, col_base: int = 0, tiles: _core.DotTiles | None = None
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The GEMM proposal lists of both sides of one block (the first half of :func:`exact_block_lists`).

    Row lists ``proposal_width(k, C)`` wide, column lists ``proposal_width(k, R)`` wide; one
    GEMM pass feeds both when the widths agree, else the column side gets its own pass.
    """
    dtype = rows.dtype
    num_rows, num_cols = rows.shape[0], cols.shape[0]
    row_proposals = new_lists(num_rows, proposal_width(k, num_cols), dtype)
    col_proposals = new_lists(num_cols, proposal_width(k, num_rows), dtype)
    if tiles is None:
        tiles = _core.DotTiles.for_blocks([(num_rows, num_cols), (num_cols, num_rows)], dtype)
    if col_proposals[0].shape[1] == row_proposals[0].shape[1]:
        block_topk(tiles, rows, cols, metric, row_proposals[0].shape[1], row_norms=row_norms, col_norms=col_norms,
                   row_base=row_base, col_base=col_base, row_lists=row_proposals, col_lists=col_proposals)
    else:
        # Widths differ only for a side smaller than k + SLACK (block_topk takes one k): a
        # second, small GEMM pass for the column side.
        block_topk(tiles, rows, cols, metric, row_proposals[0].shape[1], row_norms=row_norms, col_norms=col_norms,
                   row_base=row_base, col_base=col_base, row_lists=row_proposals)
        block_topk(tiles, cols, rows, metric, col_proposals[0].shape[1], row_norms=col_norms, col_norms=row_norms,
                   row_base=col_base, col_base=row_base, row_lists=col_proposals)
    return row_proposals, col_proposals


def mutual_knn_cpu(a: torch.Tensor, b: torch.Tensor, k: int, metric: str, max_distance: float | None,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`fastassoc.mutual_knn`; ``precision`` is ignored (full float32 on CPU)."""
    if k == 0 or a.shape[0] == 0 or b.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone(), torch.empty(0, dtype=torch.float32)
    pa, pb = _core.prepare(a, metric), _core.prepare(b, metric)
    row_lists, col_lists = exact_block_lists(pa, pb, ranking_metric(metric), k, _core.squared_norms(pa, metric),
                                             _core.squared_norms(pb, metric))
    finish_lists(*row_lists, metric)  # column lists only serve membership tests: order is irrelevant
    if max_distance is None:
        ia, ib, values = mutual_pairs(row_lists, col_lists)
    else:
        ia, ib, values = mutual_pairs(row_lists, col_lists, filter_code=_AT_MOST, threshold=max_distance)
    return ia, ib, values.to(torch.float32)
