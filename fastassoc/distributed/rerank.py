"""Sharded :func:`fastassoc.jaccard_distance` (k-reciprocal Jaccard distance, SpCL / Zhong et al.).

Where the work goes
-------------------
1. *Nearest lists* (the ``O(N^2 D)`` part): the sharded exact search of :mod:`._comm` with the
   family's own distances (``_tiles.exact_distances`` with the fixed-order squared norms of
   ``reference.rerank.exact_squared_norms``, a function of each row), ranked by (distance,
   global index); for ``weighting="zhong"`` a second list per row carries minus the farthest
   distance of each block, so the same merge returns the global maximum.
2. The ``N x K`` lists are all-gathered: every rank then builds the same expanded sets ``E``.
3. Each rank computes the pair values of ``E`` for its own rows (the rows of the other ranks
   that they name are fetched from their owners), and the values are all-gathered, so every
   rank holds the same ``[|E|]`` vector and runs the single-process expressions (segment
   softmax or Zhong's weights, query expansion) on identical tensors: the same bits, even
   where torch's vectorised ``exp`` rounds its tail elements differently.
4. The overlaps ``m_ij`` (step 6) are split by rows: a rank computes the pairs ``i < j`` of
   its rows and sends the mirrored entry ``(j, i)`` to ``j``'s owner.

The sparse ``V`` (about ``N k2 |E(i)|`` entries) is held by every rank; nothing ``N x N``
is held or sent.
"""
from __future__ import annotations

import torch

from .. import ops as _ops
from ..kernels.reference import rerank as _ref
from .. import _backend
from ..kernels.reference._tiles import band, distance_tile, exact_distances, exact_dots, prepare, row_chunks
from ..kernels.reference.knn import smallest_k_exact
from ..ops._sparse import CSRMatrix
from ._checks import agree_rows
from ._comm import QUERY_CHUNK, all_gather_padded, all_to_all_rows, route_to_owners, sharded_search
from .graph import _rows_csr


def _farthest_in_block(q, q_norms, a, a_norms, ranking):
    """[q]: each row's largest exact distance (squared for Euclidean) to the rows of ``a``, -inf if none."""
    out = torch.full((q.shape[0],), -torch.inf, dtype=q.dtype, device=q.device)
    if a.shape[0] == 0:
        return out
    for start, stop in row_chunks(q.shape[0], a.shape[0]):
        block_norms = q_norms[start:stop] if q_norms is not None else None
        tile = distance_tile(q[start:stop], a, ranking, a_norms)
        top = tile.amax(1).to(torch.float64)
        floor = (top - 2 * band(q[start:stop], a, ranking, block_norms, a_norms)) * (1 - 2.0 ** -20) - 1e-300
        rows, cols = (tile.to(torch.float64) >= floor.unsqueeze(1)).nonzero(as_tuple=True)
        exact = exact_distances(q[start + rows], a[cols], ranking, block_norms[rows] if a_norms is not None else None,
                                a_norms[cols] if a_norms is not None else None)
        out[start:stop] = out[start:stop].scatter_reduce(0, rows, exact, reduce="amax")
    return out


def jaccard_distance(features: torch.Tensor, k1: int = 20, k2: int = 6, *, weighting: str = "spcl",
                     max_distance: float | None = None, metric: str = "sqeuclidean", group=None,
                     query_chunk: int = QUERY_CHUNK) -> CSRMatrix:
    r"""Sharded :func:`fastassoc.jaccard_distance`: this rank's rows of the k-reciprocal Jaccard matrix.

    ``features`` is this rank's block of the rows (global row = block offset + local row). Returns
    rows ``offset : offset + n`` as a CSRMatrix ``(n, N)`` with global columns; stacked in rank
    order they equal ``jaccard_distance(cat(features), ..., as_tuple=True)`` of the reference
    backend (see the module docstring for how the work and the data are split). Collective.

    Parameters
    ----------
    features : Tensor [n, D], float
    k1, k2, weighting, max_distance, metric : as in :func:`fastassoc.jaccard_distance`
    group : ProcessGroup, optional; query_chunk : int >= 1

    Returns
    -------
    CSRMatrix, size ``(n, N)``, float32, columns sorted per row, explicit zeros on the diagonal.

    Communication
    -------------
    Bytes sent per rank, with ``K = min(k1, N)`` (``k1 + 1`` for ``"zhong"``), ``L`` = 1 (2 for
    ``"zhong"``), ``v`` = 4 (8 for float64): ``24 (W - 1)`` (sizes, check); per chunk
    ``(W - 1) c (D v + 8)`` (gathered rows) + ``sum_{r != rank} n_r L K (v + 8)`` (candidates);
    ``8 (W - 1) max_r n_r K`` (the lists) + ``8 (W - 1)`` + ``8`` per row of another rank this
    rank's pairs name and ``D v`` per row of this rank another rank asks for + ``v (W - 1)
    max_r |E_r|`` (pair values of the expanded sets of rank ``r``'s rows) + ``v (W - 1) max_r n_r``
    (farthest distances, ``"zhong"``) + ``8 (W - 1)`` +
    ``20`` per stored pair ``(i, j)``, ``i < j``, ``j`` on another rank (the mirrored entry).
    """
    error = None
    try:
        features = _ops._checks.features("features", features)
        k1, k2 = _ops.rerank._k1_k2(k1, k2)
        weighting = _ops._checks.choice("weighting", weighting, ("spcl", "zhong"))
        max_distance = _ops._checks.real("max_distance", max_distance, low=0.0, allow_none=True)
        metric = _ops._checks.choice("metric", metric, _ops._checks.METRICS)
        query_chunk = _ops._checks.non_negative_int("query_chunk", query_chunk, minimum=1)
    except (TypeError, ValueError) as caught:
        error = caught
    layout, _ = agree_rows(error, "features", features, [], 0, group)
    device = features.device
    num_rows, offset, size = layout.total, layout.offset, layout.size
    x = prepare(features, metric)
    local_rows = torch.arange(size, device=device) + offset
    if num_rows == 0:
        return _rows_csr(local_rows, local_rows, torch.zeros(0, dtype=torch.float32, device=device), 0, 0)
    width = min(k1 if weighting == "spcl" else k1 + 1, num_rows)
    ranking = "sqeuclidean" if metric == "euclidean" else metric
    norms = _ref.exact_squared_norms(x) if metric != "cosine" else None
    zhong = weighting == "zhong"

    def local_search(rows, meta):
        row_norms = _ref.exact_squared_norms(rows) if metric != "cosine" else None
        values = torch.full((rows.shape[0], 2 if zhong else 1, width), torch.inf, dtype=x.dtype, device=device)
        indices = torch.full(values.shape, -1, dtype=torch.int64, device=device)
        for start, stop in row_chunks(rows.shape[0], max(size, 1)):
            found, columns = smallest_k_exact(rows[start:stop], x, metric, width, None,
                                              row_norms[start:stop] if row_norms is not None else None, norms)
            values[start:stop, 0] = found
            indices[start:stop, 0] = torch.where(columns >= 0, columns + offset, -1)
        if zhong and size:
            # Minus the block's farthest distance: the merge's smallest is the global largest.
            values[:, 1, 0] = -_farthest_in_block(rows, row_norms, x, norms, ranking)
            indices[:, 1, 0] = offset
        return values, indices, []

    values, lists, _ = sharded_search(x, torch.zeros((size, 1), dtype=torch.int64, device=device), layout, width,
                                      2 if zhong else 1, local_search, x.dtype, query_chunk=query_chunk,
                                      group=group)
    ranks = torch.cat(all_gather_padded(lists[:, 0], layout.sizes, group))
    rows, cols = _ref._expanded_sets(ranks, k1)
    # This rank's rows' pairs (rows sorted, so they are one contiguous run of E).
    first, last = torch.searchsorted(rows, torch.tensor([offset, offset + size], device=device)).tolist()
    pair_values = _local_pair_values(x, norms, rows[first:last], cols[first:last], layout, metric, zhong, group)
    pair_values = torch.cat(all_gather_padded(pair_values, [s for s in _run_lengths(rows, layout)], group))
    if zhong:
        farthest = -values[:, 1, 0]
        farthest = farthest.sqrt_() if metric == "euclidean" else farthest
        farthest = torch.cat(all_gather_padded(farthest, layout.sizes, group))
        squared = torch.where(rows == cols, 0.0, pair_values).square_()
        scale = farthest.square()[rows]
        exps = torch.exp(-torch.where(scale > 0, squared / scale, 0.0))
        sums = torch.zeros(num_rows, dtype=x.dtype, device=device).index_add_(0, rows, exps)
        weights = exps / sums[rows]
    else:
        logits = -(2.0 - 2.0 * pair_values)
        row_max = torch.full((num_rows,), -torch.inf, dtype=x.dtype, device=device)
        row_max.scatter_reduce_(0, rows, logits, reduce="amax")
        exps = torch.exp(logits - row_max[rows])
        sums = torch.zeros(num_rows, dtype=x.dtype, device=device).index_add_(0, rows, exps)
        weights = exps / sums[rows]
    if k2 != 1:
        rows, cols, weights = _ref._query_expansion(_ref._crow(rows, num_rows), cols, weights, ranks, k2)
    v = _ref._both_orders(rows, cols, weights, num_rows)
    low, high, distances = [], [], []
    for start, stop in row_chunks(size, num_rows):
        overlaps = _ref._overlaps(v, offset + start, offset + stop)
        flat = overlaps.nonzero().squeeze(1)
        distance = _ref._jaccard_from_overlaps(overlaps[flat])
        keep = distance < 1.0
        if max_distance is not None:
            keep &= distance.to(torch.float64) <= max_distance
        flat = flat[keep]
        low.append(offset + start + flat // num_rows)
        high.append(flat % num_rows)
        distances.append(distance[keep])
    low = torch.cat(low) if low else local_rows[:0]
    high = torch.cat(high) if high else local_rows[:0]
    distances = torch.cat(distances) if distances else torch.zeros(0, dtype=torch.float32, device=device)
    # The mirrored entry (j, i) belongs to j's owner.
    (mirrored, mirrored_values), _, _ = route_to_owners(layout.owner(high), [torch.stack([high, low], 1), distances],
                                                        layout.world_size, group)
    all_rows = torch.cat([low, mirrored[:, 0], local_rows]) - offset
    all_cols = torch.cat([high, mirrored[:, 1], local_rows])
    all_values = torch.cat([distances, mirrored_values, torch.zeros(size, dtype=torch.float32, device=device)])
    return _rows_csr(all_rows, all_cols, all_values, size, num_rows)


def _run_lengths(rows: torch.Tensor, layout) -> list[int]:
    """How many entries of the row-sorted pair list belong to each rank's rows."""
    bounds = torch.searchsorted(rows, torch.tensor(layout.offsets, device=rows.device)).tolist()
    return [bounds[r + 1] - bounds[r] for r in range(layout.world_size)]


def _local_pair_values(x, norms, rows, cols, layout, metric, zhong, group) -> torch.Tensor:
    """Exact dots (spcl) or distances (zhong) of this rank's pairs ``(i, m)``, fetching remote rows ``m``."""
    offset, size = layout.offset, layout.size
    # Sorted, so the owners are non-decreasing and the route keeps this order: the replies come back in it.
    remote = cols[(cols < offset) | (cols >= offset + size)].unique()
    (asked,), send_counts, asked_counts = route_to_owners(layout.owner(remote), [remote], layout.world_size, group)
    served = all_to_all_rows(list(x[asked - offset].split(asked_counts)), send_counts, group)
    fetched = torch.cat(served) if served else x[:0]
    # Rows by global index: local block first, then the fetched ones.
    table_index = torch.cat([torch.arange(size, device=x.device) + offset, remote])
    table = torch.cat([x, fetched])
    lookup_keys, lookup_order = torch.sort(table_index)
    position = lookup_order[torch.searchsorted(lookup_keys, cols)]
    local = rows - offset
    table_norms = _ref.exact_squared_norms(table) if zhong and metric != "cosine" else None
    values = x.new_empty(rows.numel())
    step = max(1, _backend.tile_elements() // max(x.shape[1], 1))
    for start in range(0, rows.numel(), step):
        mine, theirs = local[start:start + step], position[start:start + step]
        if not zhong:
            values[start:start + step] = exact_dots(x[mine], table[theirs])
        else:
            values[start:start + step] = exact_distances(x[mine], table[theirs], metric,
                                                         norms[mine] if norms is not None else None,
                                                         table_norms[theirs] if table_norms is not None else None)
    return torch.where(rows == cols, 0.0, values) if zhong else values
