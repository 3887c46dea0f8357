"""Reference k-reciprocal Jaccard distance, DBSCAN on a sparse distance matrix and cluster
centres: the spec and oracle of ``jaccard_distance``, ``dbscan`` and ``cluster_centres``
(Zhong et al., CVPR 2017, in the form of SpCL's ``compute_jaccard_distance``).

Algorithm
---------
``jaccard_distance``, on rows ``x`` (L2-normalised first for ``metric="cosine"``; the
semantics are SpCL's when the caller L2-normalised them):

1. *k1-nearest lists.* ``K = min(k1, N)`` (``weighting="zhong"``: ``min(k1 + 1, N)``, as
   torchreid's ``re_ranking`` slices ``[:k1 + 1]`` of a full ranking): every row's ``K``
   nearest rows, itself included, in (exact distance, index) order (:func:`nearest_lists`).
   Distances are exact, a function of the two rows alone (``_tiles.exact_distances``: the
   fixed-order inner product), with squared norms taken as the same inner product of a row
   with itself (:func:`exact_squared_norms`), so a row's squared Euclidean distance to
   itself and to its copies is exactly 0 and rows at one exact distance tie exactly, wherever
   they sit. A float32 GEMM tile only proposes (``knn.smallest_k_exact``, row chunks of at
   most ``_backend.tile_elements()`` distances).
2. *k-reciprocal sets.* ``R(i, w)``: the ``j`` among the first ``w`` entries of ``i``'s list
   whose own first ``w`` entries hold ``i``. ``R1 = R(i, K)`` and
   ``Rh = R(i, min(round(k1 / 2) + 1, K))`` -- SpCL slices ``[:k + 1]`` of a list with ``k1``
   columns, so the half sets use one more neighbour than ``round(k1 / 2)`` and the full sets
   exactly ``K``. ``round`` is half-to-even, as NumPy's ``around``.
3. *Expansion.* ``E(i) = R1(i)`` united with every ``Rh(c)``, ``c`` in ``R1(i)``, for which
   ``3 |Rh(c) & R1(i)| > 2 |Rh(c)|`` (SpCL's ``> 2/3 * len``, exact in integers; the test
   is against ``R1(i)``, not the growing set). Triples ``(i, c, m)`` are enumerated in
   pieces of at most ``tile_elements() / 16`` and membership is a ``searchsorted`` on the
   sorted keys ``i * N + j`` of ``R1``.
4. *Weights.* ``V[i, E(i)] = softmax(-(2 - 2 x_i . x_E(i)))`` (a segment softmax over each
   row's sorted ``E(i)``), dot products gathered in chunks of at most ``tile_elements()``
   elements. ``weighting="zhong"`` (torchreid's ``re_ranking``, the paper's form):
   ``V[i, m] = exp(-d_im^2 / max_k d_ik^2)`` divided by the row sum, ``d`` the metric's
   exact distance (so ``d^2`` is the 4th power of the Euclidean distance for ``"sqeuclidean"``,
   as torchreid squares the squared-Euclidean matrices its callers pass), ``max_k`` over all
   ``N`` rows (:func:`farthest_distances`: GEMM tiles propose, candidates within their error
   bound of the maximum are rescored exactly); a row whose distances are all 0 weighs its
   entries equally (torchreid divides 0 by 0 there). Weights use the exact pair distances and
   the fixed-order inner products (``_tiles.exact_dots``), the compiled core's bits.
5. *Query expansion* (only when ``k2 != 1``, as SpCL): row ``i`` becomes the mean of the
   ``V`` rows of its first ``min(k2, K)`` list entries (itself normally first), summed in
   list order and divided by their number. With ``k2 == 1`` ``V`` is left as it is (not
   replaced by the row of ``i``'s nearest, which differs when a smaller index ties).
6. *Jaccard.* ``m_ij = sum_k min(V_ik, V_jk)`` through the transposed (column) lists of
   ``V``: for every stored ``V_ik`` of a row block, the ``j > i`` stored in column ``k``
   (triples in pieces as above) add ``min`` into a dense ``[b, N]`` tile with
   ``b * N <= tile_elements()``, in ascending ``k`` for each ``(i, j)`` as SpCL sums.
   ``J_ij = 1 - m_ij / (2 - m_ij)`` clamped at 0, computed once per unordered pair, so the
   matrix is exactly symmetric. A pair is stored when its float32 ``J < 1`` (and, given
   ``max_distance``, ``J <= max_distance`` compared in float64); the diagonal is stored as
   explicit zeros.

``dbscan``: neighbourhoods are the stored entries ``<= eps`` (compared in the values'
dtype, as scikit-learn compares a float32 matrix with a Python float), plus the point itself
when its diagonal entry is not stored (scikit-learn stores an explicit 0 there). Core points
have at least ``min_samples`` neighbours. Clusters are the connected components of the core
points (hooking the larger root onto the smaller along core-core edges, then pointer
jumping, so every root is its component's smallest index); they are numbered by their
smallest core index, which is the order in which scikit-learn's index-order scan starts
them. A non-core point with core neighbours takes the smallest of their cluster numbers:
scikit-learn expands one cluster completely before starting the next, so the first cluster
to reach a border point is the smallest-numbered one.

``evaluate_reranked_reference`` (``evaluate_ranking(..., rerank=...)``): steps 1-5 with
``weighting="zhong"`` on ``[query; gallery]``, then per chunk of queries the overlaps of step 6
with the gallery rows only (a dense ``[b, G]`` tile, same sums as step 6), torchreid's final
distance ``J (1 - lambda) + lambda d^2 / max d^2`` and the plain evaluation's scoring; see its
docstring.

``cluster_centres``: ``index_add_`` of the rows of each non-noise label (in row chunks of
``tile_elements()`` elements, rows in index order), divided by the counts.

Tie-breaking
------------
Nearest lists: equal exact distances go to the smaller index. A row's own squared Euclidean
distance is exactly 0, so exact copies of it with a smaller index come first (cosine: its
own distance ``1 - x.x`` is within a unit roundoff of 0 and equal to its copies'); rows whose
exact distances differ only after float32 rounding tie (the float64 truth may order them).

Limits
------
Arithmetic in float32 (float64 inputs stay float64); the output values are float32.
Memory: a few tiles, the ``N x K`` lists, the sparse ``V`` (about ``N * k2 * |E|`` entries)
and the stored pairs. One stored ``V`` entry's partner list (at most ``N``) is never split,
so a piece may exceed its budget by that much. Python loops run over tiles and pieces only.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from ... import _backend
from ._tiles import band, compute_dtype, distance_tile, exact_distances, exact_dots, prepare, row_chunks
from ...ops.evaluation import RankingResult
from .evaluation import RankingScores
from .graph import to_csr
from .knn import smallest_k_exact


def _triple_budget() -> int:
    # A piece's triples live in about eight int64 temporaries at once: a sixteenth of the
    # tile's elements is about the bytes of one float32 tile.
    return max(1, _backend.tile_elements() // 16)


def _pieces(counts: torch.Tensor, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of entries whose ``counts`` sum to at most ``budget`` (at least one entry each)."""
    total = counts.numel()
    if total == 0:
        return
    cumulative = torch.cumsum(counts, 0)
    start, base = 0, 0
    while start < total:
        stop = int(torch.searchsorted(cumulative, base + budget, right=True))
        stop = min(max(stop, start + 1), total)
        yield start, stop
        base = int(cumulative[stop - 1])
        start = stop


def _expand(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries with ``lengths``: (entry of each expanded item, its position inside the entry)."""
    entry = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return entry, torch.arange(entry.numel(), device=lengths.device) - starts[entry]


def _crow(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=num_rows), 0)
    return crow


def exact_squared_norms(x: torch.Tensor) -> torch.Tensor:
    """[N], compute dtype: every row's fixed-order inner product with itself (``_tiles.exact_dots``).

    The squared norms of this family's distances: with them a row's squared Euclidean distance
    ``(|x|^2 + |x|^2) - 2 x.x`` to itself, and to every copy of itself, is exactly 0.
    """
    out = x.new_empty(x.shape[0])
    step = max(1, _backend.tile_elements() // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        out[start:start + step] = exact_dots(x[start:start + step], x[start:start + step])
    return out


def nearest_lists(x: torch.Tensor, width: int, metric: str, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Every row's ``width`` nearest rows, [N, width] int64, by (exact distance, index).

    Exact distances (``_tiles.exact_distances``, a function of the two rows alone) with the
    squared norms of :func:`exact_squared_norms` (``norms``, computed when not given), so a
    row's distance to itself and to its copies is exactly 0 (cosine: ``1 - x.x`` of the
    normalised row, within a unit roundoff of 0, the same for its copies): the row comes first,
    behind copies of smaller index. A float32 GEMM only proposes
    (:func:`fastassoc.kernels.reference.knn.smallest_k_exact`).
    """
    num_rows = x.shape[0]
    if metric != "cosine" and norms is None:
        norms = exact_squared_norms(x)
    ranks = torch.empty((num_rows, width), dtype=torch.int64, device=x.device)
    for start, stop in row_chunks(num_rows, num_rows):
        ranks[start:stop] = smallest_k_exact(x[start:stop], x, metric, width, None,
                                             norms[start:stop] if norms is not None else None, norms)[1]
    return ranks


def farthest_distances(x: torch.Tensor, metric: str, norms: torch.Tensor | None = None) -> torch.Tensor:
    """[N], compute dtype: every row's largest exact distance to all rows (as :func:`nearest_lists`,
    ``norms`` computed when not given).

    GEMM tiles of the upper triangle only (row panel ``[p0, p1)`` against rows ``[p0, N)``,
    each tile feeding the maxima of its rows and of its columns: half the GEMM work) propose:
    with ``t`` a row's largest GEMM value and ``B`` its ``_tiles.band`` (a bound for any pair
    the row is part of, whichever side of the product it sits on), some column's exact value
    is ``>= t - B``, so a pair whose GEMM value is below ``t - 2B`` for both of its rows
    cannot hold either row's exact maximum. Each tile's pairs at or above the floor of the
    running maxima (a floor that only rises, so no pair above the final floor is skipped) are
    rescored exactly at once, each updating both of its rows: memory stays within a tile.
    Euclidean works in squared space and takes torch's square root at the end (monotone, so
    the maximum is the root of the squared maximum).
    """
    ranking = "sqeuclidean" if metric == "euclidean" else metric
    num_rows, dtype, device = x.shape[0], x.dtype, x.device
    norms = exact_squared_norms(x) if metric != "cosine" and norms is None else norms
    bound = band(x, x, ranking, norms, norms)
    running = torch.full((num_rows,), -torch.inf, dtype=torch.float64, device=device)
    below = torch.tensor(-torch.inf, dtype=dtype, device=device)

    def floors() -> torch.Tensor:
        low = running - 2 * bound
        # Rounded down into the tiles' dtype: the kept pairs are a superset.
        return torch.nextafter((low - low.abs() * 2.0 ** -20 - 1e-300).to(dtype), below)

    farthest = torch.full((num_rows,), -torch.inf, dtype=dtype, device=device)
    step = max(1, _backend.tile_elements() // max(x.shape[1], 1))
    for start, stop in row_chunks(num_rows, num_rows):
        tile = x[start:stop] @ x[start:].T
        if ranking == "cosine":
            tile.neg_().add_(1.0)
        else:
            tile.mul_(-2.0).add_(norms[start:stop].unsqueeze(1)).add_(norms[start:].unsqueeze(0)).clamp_min_(0.0)
        running[start:stop] = torch.maximum(running[start:stop], tile.amax(1).to(torch.float64))
        running[start:] = torch.maximum(running[start:], tile.amax(0).to(torch.float64))
        floor = floors()
        rows, cols = ((tile >= floor[start:stop].unsqueeze(1)) | (tile >= floor[start:].unsqueeze(0))).nonzero(
            as_tuple=True)
        del tile
        rows, cols = rows + start, cols + start
        # Rescored now (a tile's worth at most): exact distances only ever raise a row's maximum.
        for begin in range(0, rows.numel(), step):
            left, right = rows[begin:begin + step], cols[begin:begin + step]
            exact = exact_distances(x[left], x[right], ranking, norms[left] if norms is not None else None,
                                    norms[right] if norms is not None else None)
            farthest.scatter_reduce_(0, left, exact, reduce="amax").scatter_reduce_(0, right, exact, reduce="amax")
    return farthest.sqrt_() if metric == "euclidean" else farthest


def _reciprocal(ranks: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(i, j)`` of ``R(i, width)``, sorted by ``(i, j)``."""
    num_rows = ranks.shape[0]
    forward = ranks[:, :width]
    rows = torch.arange(num_rows, device=ranks.device).unsqueeze(1).expand_as(forward).reshape(-1)
    cols = forward.reshape(-1)
    keys = rows * num_rows + cols
    keys = keys[torch.isin(cols * num_rows + rows, keys)]
    keys = torch.sort(keys).values
    return keys // num_rows, keys % num_rows


def _expanded_sets(ranks: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(i, m)`` of the expanded sets ``E(i)``, sorted by ``(i, m)``."""
    num_rows, width = ranks.shape
    device = ranks.device
    rows1, cols1 = _reciprocal(ranks, width)
    keys1 = rows1 * num_rows + cols1
    half_rows, half_cols = _reciprocal(ranks, min(round(k1 / 2) + 1, width))
    half_crow = _crow(half_rows, num_rows)
    half_lengths = half_crow[1:] - half_crow[:-1]
    added = [keys1]
    candidate_lengths = half_lengths[cols1]
    for start, stop in _pieces(candidate_lengths, _triple_budget()):
        owners, candidates = rows1[start:stop], cols1[start:stop]
        lengths = candidate_lengths[start:stop]
        entry, offset = _expand(lengths)
        members = half_cols[half_crow[candidates][entry] + offset]
        queries = owners[entry] * num_rows + members
        position = torch.searchsorted(keys1, queries).clamp_max(keys1.numel() - 1)
        inside = (keys1[position] == queries).to(torch.int64)
        overlap = torch.zeros(stop - start, dtype=torch.int64, device=device).index_add_(0, entry, inside)
        accepted = 3 * overlap > 2 * lengths
        added.append(queries[accepted[entry]])
    keys = torch.unique(torch.cat(added))
    return keys // num_rows, keys % num_rows


def _pair_distances(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric: str) -> torch.Tensor:
    """The exact distance (``_tiles.exact_distances`` with :func:`exact_squared_norms`) of every
    pair ``(rows[p], cols[p])``, 0 when ``rows[p] == cols[p]``; rows gathered in chunks of
    ``tile_elements()`` elements."""
    distances = torch.empty(rows.numel(), dtype=x.dtype, device=x.device)
    norms = exact_squared_norms(x) if metric != "cosine" else None
    step = max(1, _backend.tile_elements() // max(x.shape[1], 1))
    for start in range(0, rows.numel(), step):
        left, right = rows[start:start + step], cols[start:start + step]
        distances[start:start + step] = exact_distances(x[left], x[right], metric,
                                                        norms[left] if norms is not None else None,
                                                        norms[right] if norms is not None else None)
    return torch.where(rows == cols, 0.0, distances)


def _zhong_weights(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric: str,
                   farthest: torch.Tensor) -> torch.Tensor:
    """``exp(-d_im^2 / max_k d_ik^2)`` over each row's entries, divided by the row sum (rows sorted)."""
    num_rows = x.shape[0]
    squared = _pair_distances(x, rows, cols, metric).square_()
    scale = farthest.square()[rows]
    # A row whose distances are all 0 (every row identical) weighs its entries equally.
    exps = torch.exp(-torch.where(scale > 0, squared / scale, 0.0))
    sums = torch.zeros(num_rows, dtype=x.dtype, device=x.device).index_add_(0, rows, exps)
    return exps / sums[rows]


def _weights(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Segment softmax of ``-(2 - 2 x_i . x_m)`` over each row's entries (rows sorted)."""
    num_rows = x.shape[0]
    logits = torch.empty(rows.numel(), dtype=x.dtype, device=x.device)
    step = max(1, _backend.tile_elements() // max(x.shape[1], 1))
    for start in range(0, rows.numel(), step):
        stop = min(start + step, rows.numel())
        # The fixed-order inner product: a function of the two rows (the compiled core's bits).
        dots = exact_dots(x[rows[start:stop]], x[cols[start:stop]])
        logits[start:stop] = -(2.0 - 2.0 * dots)
    row_max = torch.full((num_rows,), -torch.inf, dtype=x.dtype, device=x.device)
    row_max.scatter_reduce_(0, rows, logits, reduce="amax")
    exps = torch.exp(logits - row_max[rows])
    sums = torch.zeros(num_rows, dtype=x.dtype, device=x.device).index_add_(0, rows, exps)
    return exps / sums[rows]


def _query_expansion(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, ranks: torch.Tensor,
                     k2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR rows ``mean(V[ranks[i, :k2]])``; returns (rows, cols, values) sorted by (row, col)."""
    num_rows = crow.numel() - 1
    width = min(k2, ranks.shape[1])
    neighbours = ranks[:, :width]
    lengths = crow[1:] - crow[:-1]
    per_row = lengths[neighbours].sum(1)
    out_rows, out_cols, out_values = [], [], []
    for start, stop in _pieces(per_row, _triple_budget()):
        block = neighbours[start:stop].reshape(-1)          # neighbour rows in list order
        entry, offset = _expand(lengths[block])
        source = crow[block][entry] + offset
        owner = start + entry // width
        keys = owner * num_rows + cols[source]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        # index_add_ follows the list order, as NumPy's mean adds the rows one after another.
        sums = torch.zeros(unique_keys.numel(), dtype=values.dtype, device=values.device)
        sums.index_add_(0, inverse, values[source])
        mean = sums / width
        nonzero = mean != 0
        out_rows.append(unique_keys[nonzero] // num_rows)
        out_cols.append(unique_keys[nonzero] % num_rows)
        out_values.append(mean[nonzero])
    if not out_rows:
        empty = torch.empty(0, dtype=torch.int64, device=crow.device)
        return empty, empty, values.new_empty(0)
    return torch.cat(out_rows), torch.cat(out_cols), torch.cat(out_values)


class _SparseRows(NamedTuple):
    """``V`` in both orders: entries by (row, col) with row offsets, and by (col, row) for the
    partner lists of every column."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    crow: torch.Tensor
    column_keys: torch.Tensor
    column_rows: torch.Tensor
    column_values: torch.Tensor
    num_rows: int


def _both_orders(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_rows: int) -> _SparseRows:
    column_keys, order = torch.sort(cols * num_rows + rows)
    return _SparseRows(rows, cols, values, _crow(rows, num_rows), column_keys, rows[order], values[order], num_rows)


def _overlaps(v: _SparseRows, block_start: int, block_stop: int, first_partner: int | None = None
              ) -> torch.Tensor:
    """``m_ij = sum_k min(V_ik, V_jk)`` for the rows ``i`` of a block, flat ``[b * width]``.

    Partners are ``j > i`` (``first_partner=None``, width ``N``, column ``j``) or
    ``j >= first_partner`` (width ``N - first_partner``, column ``j - first_partner``); every
    other entry is 0. Each ``(i, j)`` adds its terms in ascending ``k``, as SpCL sums.
    """
    num_rows = v.num_rows
    offset = 0 if first_partner is None else first_partner
    width = num_rows - offset
    overlaps = torch.zeros((block_stop - block_start) * width, dtype=v.values.dtype, device=v.values.device)
    first, last = int(v.crow[block_start]), int(v.crow[block_stop])
    if first == last:
        return overlaps
    owners, columns, mine = v.rows[first:last], v.cols[first:last], v.values[first:last]
    if first_partner is None:
        # Partners j > i of column k start right after the key k * N + i (itself stored there).
        begin = torch.searchsorted(v.column_keys, columns * num_rows + owners, right=True)
    else:
        begin = torch.searchsorted(v.column_keys, columns * num_rows + first_partner)
    end = torch.searchsorted(v.column_keys, (columns + 1) * num_rows)
    for start, stop in _pieces(end - begin, _triple_budget()):
        entry, step = _expand(end[start:stop] - begin[start:stop])
        position = begin[start:stop][entry] + step
        target = (owners[start:stop][entry] - block_start) * width + v.column_rows[position] - offset
        overlaps.index_add_(0, target, torch.minimum(mine[start:stop][entry], v.column_values[position]))
    return overlaps


def _jaccard_from_overlaps(shared: torch.Tensor) -> torch.Tensor:
    """float32 ``J = 1 - m / (2 - m)`` clamped at 0 (``m = 0`` gives exactly 1)."""
    return (1.0 - shared / (2.0 - shared)).clamp_min_(0.0).to(torch.float32)


def _jaccard_pairs(v: _SparseRows, max_distance: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs ``i < j`` with float32 ``J_ij < 1`` (and ``<= max_distance``) from ``V``."""
    num_rows, device = v.num_rows, v.values.device
    out_i, out_j, out_d = [], [], []
    for block_start, block_stop in row_chunks(num_rows, num_rows):
        overlaps = _overlaps(v, block_start, block_stop)
        flat = overlaps.nonzero().squeeze(1)
        distance = _jaccard_from_overlaps(overlaps[flat])
        keep = distance < 1.0
        if max_distance is not None:
            keep &= distance.to(torch.float64) <= max_distance
        flat = flat[keep]
        out_i.append(block_start + flat // num_rows)
        out_j.append(flat % num_rows)
        out_d.append(distance[keep])
    if not out_i:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty, torch.empty(0, dtype=torch.float32, device=device)
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_d)


def _encoding(x: torch.Tensor, k1: int, k2: int, weighting: str, metric: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 1-5 on prepared rows: ``V`` as (rows, cols, values) sorted by (row, col), and, for
    ``weighting="zhong"``, every row's largest exact distance to all rows ([N], compute dtype;
    else None)."""
    num_rows = x.shape[0]
    # SpCL's lists hold k1 rows; torchreid's slices [:k1 + 1] of a full ranking.
    width = min(k1 if weighting == "spcl" else k1 + 1, num_rows)
    ranks = nearest_lists(x, width, metric)
    # Only Zhong's weights (and the re-ranked evaluation) read the farthest distances.
    farthest = farthest_distances(x, metric) if weighting == "zhong" else None
    rows, cols = _expanded_sets(ranks, k1)
    if weighting == "spcl":
        values = _weights(x, rows, cols)
    else:
        values = _zhong_weights(x, rows, cols, metric, farthest)
    if k2 != 1:
        rows, cols, values = _query_expansion(_crow(rows, num_rows), cols, values, ranks, k2)
    return rows, cols, values, farthest


def jaccard_distance_reference(features: torch.Tensor, k1: int, k2: int, weighting: str,
                               max_distance: float | None, metric: str) -> torch.Tensor:
    """k-reciprocal Jaccard distance as a symmetric sparse matrix (SpCL's ``compute_jaccard_distance``).

    Parameters
    ----------
    features : Tensor [N, D], float, finite
    k1 : int >= 1
    k2 : int, 1 <= k2 <= k1
    weighting : {"spcl", "zhong"}
    max_distance : float >= 0 or None
    metric : {"sqeuclidean", "euclidean", "cosine"}
        Ranking of the nearest lists; ``"cosine"`` also L2-normalises the rows used for weights.

    Returns
    -------
    Tensor [N, N], sparse CSR, float32, symmetric, column indices sorted per row: every pair
    with ``J < 1`` (and ``<= max_distance``) plus explicit zeros on the diagonal.
    """
    num_rows, device = features.shape[0], features.device
    diagonal = torch.arange(num_rows, device=device)
    if num_rows == 0:
        return to_csr(diagonal, diagonal, torch.empty(0, dtype=torch.float32, device=device), 0)
    x = prepare(features, metric)
    rows, cols, values, _ = _encoding(x, k1, k2, weighting, metric)
    low, high, distances = _jaccard_pairs(_both_orders(rows, cols, values, num_rows), max_distance)
    all_rows = torch.cat([low, high, diagonal])
    all_cols = torch.cat([high, low, diagonal])
    all_values = torch.cat([distances, distances, torch.zeros(num_rows, dtype=torch.float32, device=device)])
    return to_csr(all_rows, all_cols, all_values, num_rows)


# The sort, the gathered identities/cameras and the cumulative sums of a query chunk hold
# several int64 entries per gallery entry; chunks are shrunk by this factor (as the plain
# evaluation does) to keep the workspace near one tile.
_WORKSPACE_FACTOR = 4


def evaluate_reranked_reference(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                                gallery_pids: torch.Tensor, query_cameras: torch.Tensor,
                                gallery_cameras: torch.Tensor, metric: str, max_rank: int, k1: int, k2: int,
                                lambda_value: float, *, encode=None) -> RankingResult:
    """CMC, mAP and mINP of ranking the gallery by torchreid's ``re_ranking`` final distance.

    Rows ``x = [query; gallery]`` (L2-normalised for ``"cosine"``); ``d`` is the squared
    Euclidean distance for ``"euclidean"`` and ``"sqeuclidean"`` (torchreid's
    ``compute_distance_matrix(..., "euclidean")``, what its engine passes to ``re_ranking``)
    and ``1 - cos`` for ``"cosine"``. Per query ``q`` and gallery entry ``g``::

        final = J_qg * (1 - lambda_value) + (d_qg^2 / max_r d_qr^2) * lambda_value

    with ``max_r`` over all ``Q + G`` rows (torchreid's column maximum of the squared matrix;
    0 instead of torchreid's 0 / 0 when every row equals ``q``) and ``J`` the Zhong-weighted
    Jaccard distance of :func:`jaccard_distance_reference` over all ``Q + G`` rows
    (``weighting="zhong"``, ``k1``, ``k2``; reciprocal sets, expansion, weights and the sums
    ``m_qg`` run over query and gallery rows alike, as torchreid's ``invIndex`` does), float32,
    1 where no weight is shared. The gallery is then ranked by ``final`` (ties by gallery
    index) and scored as ``evaluate_ranking_reference`` scores (junk removed, queries without a
    true match skipped), with its accumulators.

    Memory: the sparse ``V`` of step 5 and, per chunk of queries, a few ``[b, G]`` tiles (the
    float32 GEMM distances of ``_tiles.distance_tile``, the overlaps ``m`` gathered from ``V``'s
    column lists, the ranking workspace); never a ``(Q + G)^2`` or ``Q x G`` array beyond the
    tile bound, nor the sparse Jaccard matrix of all pairs.

    Limits: the lists, weights and farthest distances are exact (as in
    :func:`jaccard_distance_reference`), but the ``lambda_value`` term's distances come from
    float32 GEMM tiles (rescoring every query-gallery pair exactly would cost a float64 pass
    over all of them), whose rounding of a pair can depend on its position in the tile; exact
    copies of one gallery row may then differ in the last bit, and their tie is not
    guaranteed to go to the smaller index (it is whenever the GEMM is exact, e.g. small-integer
    rows). Final distances that are equal only mathematically (equal ``J`` from
    different float32 sums, e.g. ``J = 0`` of duplicated rows with ``lambda_value = 0``) are
    ordered by their rounding, as in torchreid.

    Parameters
    ----------
    query : Tensor [Q, D], float; gallery : Tensor [G, D], same dtype
    query_pids, gallery_pids : Tensor [Q], [G], int64 (gallery -1: junk)
    query_cameras, gallery_cameras : Tensor [Q], [G], int64
    metric : {"euclidean", "sqeuclidean", "cosine"}
    max_rank : int >= 1
    k1 : int >= 1; k2 : int in [1, k1]; lambda_value : float in [0, 1]
    encode : callable, optional
        A backend's steps 1-5 with ``_encoding``'s signature and result (default: ``_encoding``).

    Returns
    -------
    RankingResult with ``cmc`` float64 [max_rank] on the inputs' device.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    scores = RankingScores(num_query, max_rank, query.device)
    if num_gallery == 0 or num_query == 0:
        return scores.result(num_gallery)
    distance = "cosine" if metric == "cosine" else "sqeuclidean"
    x = prepare(torch.cat([query, gallery]), distance)
    num_rows = x.shape[0]
    rows, cols, values, farthest = (encode or _encoding)(x, k1, k2, "zhong", distance)
    encoding = _both_orders(rows, cols, values, num_rows)
    del rows, cols, values
    # max_r d^2 == (max_r d)^2: squaring is monotone, also after rounding.
    scale = farthest.square().unsqueeze(1)
    gallery_rows = x[num_query:]
    gallery_sq_norms = (gallery_rows * gallery_rows).sum(1)
    for start, stop in row_chunks(num_query, num_gallery * _WORKSPACE_FACTOR):
        original = distance_tile(x[start:stop], gallery_rows, distance, gallery_sq_norms).square_()
        block_scale = scale[start:stop]
        original = torch.where(block_scale > 0, original / block_scale, 0.0)
        shared = _overlaps(encoding, start, stop, first_partner=num_query).view(stop - start, num_gallery)
        jaccard = _jaccard_from_overlaps(shared).to(original.dtype)
        del shared
        # torchreid's expression and order of operations.
        final = jaccard * (1 - lambda_value) + original * lambda_value
        del jaccard, original
        order = torch.argsort(final, dim=1, stable=True)
        del final
        scores.add_order(order, query_pids[start:stop], gallery_pids, query_cameras[start:stop],
                         gallery_cameras, start, stop)
    return scores.result(num_gallery)


def _components(num_rows: int, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] int64: the smallest index of every vertex's connected component."""
    parent = torch.arange(num_rows, device=sources.device)
    while sources.numel():
        root_s, root_t = parent[sources], parent[targets]
        apart = root_s != root_t
        # Edges whose ends share a root keep sharing it: roots only ever merge.
        sources, targets, root_s, root_t = sources[apart], targets[apart], root_s[apart], root_t[apart]
        if sources.numel() == 0:
            break
        parent.scatter_reduce_(0, torch.maximum(root_s, root_t), torch.minimum(root_s, root_t), reduce="amin")
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    return parent


def dbscan_reference(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                     num_rows: int, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN labels of a symmetric sparse distance matrix, equal to scikit-learn's.

    Parameters
    ----------
    crow_indices : Tensor [N+1], int64
    col_indices : Tensor [nnz], int64, sorted within rows, no duplicates
    values : Tensor [nnz], float, finite, non-negative, symmetric matrix
    num_rows : int
    eps : float >= 0
    min_samples : int >= 1

    Returns
    -------
    Tensor [N], int64: cluster numbers from 0 in the order scikit-learn assigns them, -1 for noise.
    """
    device = values.device
    rows = torch.repeat_interleave(torch.arange(num_rows, device=device), crow_indices[1:] - crow_indices[:-1])
    stored_diagonal = torch.zeros(num_rows, dtype=torch.bool, device=device)
    stored_diagonal[rows[rows == col_indices]] = True
    near = values <= torch.tensor(eps, dtype=values.dtype, device=device)
    sources, targets = rows[near], col_indices[near]
    neighbours = torch.bincount(sources, minlength=num_rows) + (~stored_diagonal).to(torch.int64)
    core = neighbours >= min_samples
    linked = core[sources] & core[targets] & (sources != targets)
    roots = _components(num_rows, sources[linked], targets[linked])
    labels = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    core_roots = roots[core]
    labels[core] = torch.searchsorted(torch.unique(core_roots), core_roots)
    border = ~core[sources] & core[targets]
    unreached = torch.iinfo(torch.int64).max
    reached = torch.full((num_rows,), unreached, dtype=torch.int64, device=device)
    reached.scatter_reduce_(0, sources[border], labels[targets[border]], reduce="amin")
    labels = torch.where(~core & (reached != unreached), reached, labels)
    return labels


def cluster_centres_reference(features: torch.Tensor, labels: torch.Tensor, num_clusters: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the rows of every cluster ``0 .. num_clusters - 1``; label -1 is ignored.

    Parameters
    ----------
    features : Tensor [N, D], float
    labels : Tensor [N], int64 in [-1, num_clusters)
    num_clusters : int >= 0

    Returns
    -------
    centres : Tensor [C, D], float32 (float64 stays float64); a cluster without rows is all zeros
    counts : Tensor [C], int64
    """
    x = features.to(compute_dtype(features))
    members = (labels >= 0).nonzero().squeeze(1)
    clustered = labels[members]
    counts = torch.bincount(clustered, minlength=num_clusters)
    sums = x.new_zeros((num_clusters, x.shape[1]))
    step = max(1, _backend.tile_elements() // max(x.shape[1], 1))
    for start in range(0, members.numel(), step):
        chunk = members[start:start + step]
        sums.index_add_(0, clustered[start:start + step], x[chunk])
    return sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype), counts
