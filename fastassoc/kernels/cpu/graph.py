"""Compiled CPU backend of the graph family: ``cross_camera_graph_cpu`` and ``knn_soft_labels_cpu``.

Algorithm: rows are grouped by camera once (stable order). The neighbour lists come
from the knn tile kernels (``fastassoc.kernels.cpu.knn.block_topk``: torch GEMM tiles
+ C++/OpenMP bounded top-k, csrc/cpu/knn.cpp), and the CSR matrix is assembled in
C++ (``fastassoc._C.graph_csr_from_edges``, csrc/cpu/graph.cpp) with columns sorted
per row.

- cross_camera_graph ranks by the exact cosine distance ``1 - x_hat_i . x_hat_j`` (as the
  reference: GEMM tiles propose ``k + FLOAT_SLACK`` candidates per list, ``knn.refine_lists``
  rescores them with the fixed-order inner product and certifies the lists).
  pairwise: every unordered camera pair (t, m) is one block ``x_t @ x_m.T`` whose tiles
  update the rows' lists (k nearest in m) and the columns' lists (k nearest in t) in the
  same pass, so the GEMM work is half of the ordered pairs'. Camera t's blocks with all
  later cameras come from one GEMM panel, updated in one kernel call per tile, and the
  candidates of all pairs are rescored in one call (:func:`_pairwise_lists`): few parallel
  regions per call, which is what a shared CPU punishes (issue 11).
  pooled: the same blocks (t < m) feed one list per tracklet over all
  other cameras (row side for t, column side for m). Mutual pairs come from
  ``knn_mutual_pairs``; the edge weight is the float32 dot product of the normalised
  rows ``min(i, j)`` and ``max(i, j)`` (once per unordered pair, so exactly symmetric)
  and ``min_similarity`` is applied to it in float64, as in the reference.
- knn_soft_labels: one block ``x_t @ x_t.T`` per camera with the diagonal excluded;
  sigma_t^2, the Gaussian weights and the row sums are O(N k) torch expressions written
  exactly as in the reference.

Ties go to the smaller index; tile shape and thread count do not change results.
Peak extra memory: one tile plus ``N * k`` list entries per side. Must equal
``fastassoc.kernels.reference.graph.cross_camera_graph_reference`` and
``knn_soft_labels_reference``.
"""
from __future__ import annotations

import warnings

import torch

from ... import _backend
from . import _core, _screen
from .knn import (Refinement, block_proposals, block_topk, mutual_pairs, new_lists, proposal_width, refine_lists,
                  topk_self_join)


def _group_by_camera(cameras: torch.Tensor, num_cameras: int) -> tuple[torch.Tensor | None, list[int]]:
    """(stable order grouping rows by camera, or None when already grouped; camera offsets)."""
    counts = torch.bincount(cameras, minlength=num_cameras)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    grouped = cameras.numel() < 2 or bool((cameras[1:] >= cameras[:-1]).all())
    return (None if grouped else torch.argsort(cameras, stable=True)), offsets


def _csr(num_nodes: int, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *,
         symmetrize: bool, diagonal: float | None) -> torch.Tensor:
    """Sparse CSR [num_nodes, num_nodes] float32 from an edge list (see graph_csr_from_edges)."""
    sources = sources.to(torch.int64).contiguous()
    targets = targets.to(torch.int64).contiguous()
    weights = weights.to(torch.float64).contiguous()
    crow, col, values = _core.kernel("graph_csr_from_edges")(
        num_nodes, _core.ptr(sources), _core.ptr(targets), _core.ptr(weights), sources.shape[0], symmetrize,
        diagonal is not None, 0.0 if diagonal is None else float(diagonal))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(values),
                                       size=(num_nodes, num_nodes), check_invariants=False)


def _pair_dots(xn: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(xn[low] * xn[high]).sum(1)``, the reference's edge weights bit for bit, in chunks.

    Chunks of ``_core.chunk_rows`` edges gathered into this thread's row-pass buffers:
    no fresh E x D temporaries to page-fault, and the four parallel regions a chunk costs
    (two gathers, product, sum) are paid a few times per call, not once per 512 edges
    (each region can stall on a shared CPU; each row's sum is the same either way).
    """
    out = torch.empty(low.shape[0], dtype=xn.dtype)
    step = _core.chunk_rows(xn.shape[1])
    for start in range(0, low.shape[0], step):
        stop = min(start + step, low.shape[0])
        shape = (stop - start, xn.shape[1])
        left = torch.index_select(xn, 0, low[start:stop], out=_core.row_scratch(0, shape, xn.dtype))
        right = torch.index_select(xn, 0, high[start:stop], out=_core.row_scratch(1, shape, xn.dtype))
        product = torch.mul(left, right, out=_core.row_scratch(2, shape, xn.dtype))
        torch.sum(product, 1, out=out[start:stop])
    return out


def _pairwise_lists(xs: torch.Tensor, offsets: list[int], pairs: list[tuple[int, int]], k: int):
    """Yields ``(t0, m0, row_lists, col_lists)`` for every camera pair ``(t, m)``, ``t < m``.

    The lists are :func:`knn.exact_block_lists` of the block ``xs[t0:t1] x xs[m0:m1]`` (each
    row's k nearest columns, ids ``m0 + j``; each column's k nearest rows, ids ``t0 + i``;
    by exact distance, then id), but the work of all of camera t's pairs is done in a few
    kernel calls instead of a few per pair, because every call opens parallel regions and
    on a shared CPU each region can stall for a time slice (issue 11): one GEMM panel
    ``xs[t0:t1] @ xs[m_first:m_last].T`` (tiled by rows within the tile limit) whose column
    blocks feed each pair's proposal lists in one ``knn_tile_update_blocks`` call per tile,
    one exact-distance call for the candidates of all pairs' refinements
    (:class:`knn.Refinement`; one per call unless the pending lists outgrow a quarter of the
    tile limit), and error bounds read from one :class:`_core.RowStats`. GEMM values only
    propose, so the lists are the same exact ones.
    """
    dtype = xs.dtype
    stats = _core.RowStats(xs)
    update = _core.kernel("knn_tile_update_blocks")
    code = _core.METRIC_CODES["cosine"]
    double = _core.is_double(xs)
    panels = []
    for t in sorted({t for t, _ in pairs}):
        later = [m for first, m in pairs if first == t]
        panels.append((t, later, offsets[later[0]], offsets[later[-1] + 1]))
    tiles = _core.DotTiles.for_blocks([(offsets[t + 1] - offsets[t], c1 - c0) for t, _, c0, c1 in panels], dtype)
    pending, entries = [], 0
    for t, later, c0, c1 in panels:
        t0, t1 = offsets[t], offsets[t + 1]
        blocks = {m: (offsets[m], offsets[m + 1]) for m in later}
        proposals = {m: (new_lists(t1 - t0, proposal_width(k, m1 - m0), dtype),
                         new_lists(m1 - m0, proposal_width(k, t1 - t0), dtype)) for m, (m0, m1) in blocks.items()}
        row_step, col_step = _core.tile_shape(t1 - t0, c1 - c0)
        # Pairs whose two sides keep lists of one width share the panel's tiles; the others
        # (a camera with fewer than k + FLOAT_SLACK rows) take exact_block_lists' own passes,
        # as does every pair when one row of the panel exceeds the tile limit.
        shared = [m for m in later if col_step == c1 - c0
                  and proposals[m][0][0].shape[1] == proposals[m][1][0].shape[1]]
        # Per shared block: column offset in the panel, width, first column id, list width.
        layout = torch.tensor([[blocks[m][0] - c0, blocks[m][1] - blocks[m][0], blocks[m][0],
                                proposals[m][0][0].shape[1]] for m in shared], dtype=torch.int64).T.contiguous()
        for r0 in range(t0, t1, row_step) if shared else ():
            r1 = min(r0 + row_step, t1)
            dots = tiles.mm(xs[r0:r1], xs[c0:c1])
            # One kernel call (one parallel region) for all of t's pairs in this tile.
            lists = torch.tensor([[_core.ptr(proposals[m][0][0][r0 - t0:r1 - t0]),
                                   _core.ptr(proposals[m][0][1][r0 - t0:r1 - t0]),
                                   _core.ptr(proposals[m][1][0]), _core.ptr(proposals[m][1][1])] for m in shared],
                                 dtype=torch.int64).T.contiguous()
            update(_core.ptr(dots), double, r1 - r0, c1 - c0, code, r0, *(_core.ptr(row) for row in layout),
                   *(_core.ptr(row) for row in lists), len(shared))
        for m in later:
            if m not in shared:
                m0, m1 = blocks[m]
                proposals[m] = block_proposals(xs[t0:t1], xs[m0:m1], "cosine", k, row_base=t0, col_base=m0)
        for m, (m0, m1) in blocks.items():
            row_proposals, col_proposals = proposals[m]
            pending.append((t0, m0,
                            Refinement(xs[t0:t1], xs[m0:m1], "cosine", k, row_proposals, col_base=m0,
                                       row_stats=stats[t0:t1], col_stats=stats[m0:m1]),
                            Refinement(xs[m0:m1], xs[t0:t1], "cosine", k, col_proposals, col_base=t0,
                                       row_stats=stats[m0:m1], col_stats=stats[t0:t1])))
            entries += row_proposals[0].numel() + col_proposals[0].numel()
        if entries >= _rescore_entries():
            yield from _rescore(xs, pending, k)
            pending, entries = [], 0
    yield from _rescore(xs, pending, k)


def _rescore_entries() -> int:
    """Proposal-list entries whose refinements wait for one shared rescoring call (a quarter
    of the tile limit: the lists and their selected pairs stay within about one tile's bytes)."""
    return max(1, _backend.tile_elements() // 4)


def _rescore(xs: torch.Tensor, pending: list, k: int):
    """Exact distances of every pending refinement's pairs in one call; yields their lists
    as :func:`_pairwise_lists` does."""
    if not pending:
        return
    sides = [(side, base, other) for t0, m0, row_side, col_side in pending
             for side, base, other in ((row_side, t0, m0), (col_side, m0, t0))]
    distances = _screen.exact_distances(xs, xs, torch.cat([side.row_index + base for side, base, _ in sides]),
                                        torch.cat([side.col_index + other for side, _, other in sides]), "cosine")
    found = []
    for (side, _, _), part in zip(sides, torch.split(distances, [side.row_index.numel() for side, _, _ in sides])):
        lists = new_lists(side.rows.shape[0], k, xs.dtype)
        side.finish(lists, part, available=side.cols.shape[0])
        found.append(lists)
    for index, (t0, m0, _, _) in enumerate(pending):
        yield t0, m0, found[2 * index], found[2 * index + 1]


def cross_camera_graph_cpu(x: torch.Tensor, cameras: torch.Tensor, num_cameras: int, k: int,
                           min_similarity: float | None, self_loops: bool, mode: str,
                           precision: str) -> torch.Tensor:
    """See :func:`fastassoc.cross_camera_graph`; ``precision`` is ignored (full float32 on CPU)."""
    num_nodes = x.shape[0]
    diagonal = 1.0 if self_loops else None
    empty_index = torch.empty(0, dtype=torch.int64)
    if num_nodes == 0 or k == 0:
        return _csr(num_nodes, empty_index, empty_index, torch.empty(0, dtype=torch.float64),
                    symmetrize=False, diagonal=diagonal)
    order, offsets = _group_by_camera(cameras, num_cameras)
    dtype = _core.compute_dtype(x)
    xn = _core.prepare(x, "cosine")
    xs = xn if order is None else xn[order]
    pairs = [(t, m) for t in range(num_cameras) for m in range(t + 1, num_cameras)
             if offsets[t + 1] > offsets[t] and offsets[m + 1] > offsets[m]]
    tiles = _core.DotTiles.for_blocks(
        [(offsets[t + 1] - offsets[t], offsets[m + 1] - offsets[m]) for t, m in pairs], dtype)
    if mode == "pairwise":
        del tiles
        edges = [(empty_index, empty_index)]
        for t0, m0, row_lists, col_lists in _pairwise_lists(xs, offsets, pairs, k):
            edges.append(mutual_pairs(row_lists, col_lists, row_base=t0, col_base=m0)[:2])
        # A block's lists only meet one camera, whose grouped order is its original order,
        # so positions rank ties like original indices; map them back once at the end.
        sources = torch.cat([e[0] for e in edges])
        targets = torch.cat([e[1] for e in edges])
        if order is not None:
            sources, targets = order[sources], order[targets]
    else:
        # Lists span several cameras: store original indices so ties go to the smaller one.
        # GEMM proposals k + FLOAT_SLACK wide, then exact lists (knn.refine_lists) in original order.
        available = num_nodes - torch.bincount(cameras, minlength=num_cameras)[cameras]
        width = proposal_width(k, int(available.max()))
        proposals = new_lists(num_nodes, width, dtype)
        for t, m in pairs:
            t0, t1, m0, m1 = offsets[t], offsets[t + 1], offsets[m], offsets[m + 1]
            block_topk(tiles, xs[t0:t1], xs[m0:m1], "cosine", width, row_base=t0, col_base=m0,
                       row_ids=None if order is None else order[t0:t1],
                       col_ids=None if order is None else order[m0:m1],
                       row_lists=(proposals[0][t0:t1], proposals[1][t0:t1]),
                       col_lists=(proposals[0][m0:m1], proposals[1][m0:m1]))
        if order is not None:
            proposals = tuple(torch.empty_like(p).index_copy_(0, order, p) for p in proposals)
        values, indices = new_lists(num_nodes, k, dtype)
        refine_lists(xn, xn, "cosine", k, proposals, (values, indices), available=available,
                     allowed=lambda rows: cameras[rows].unsqueeze(1) != cameras.unsqueeze(0))
        # One list per tracklet: keep each mutual pair once (i < j), symmetrised in the CSR.
        sources, targets, _ = mutual_pairs((values, indices), (values, indices))
        upper = sources < targets
        sources, targets = sources[upper], targets[upper]
        del tiles
    low, high = torch.minimum(sources, targets), torch.maximum(sources, targets)
    weights = _pair_dots(xn, low, high)
    if min_similarity is not None:
        strong = weights.to(torch.float64) > min_similarity
        low, high, weights = low[strong], high[strong], weights[strong]
    return _csr(num_nodes, low, high, weights, symmetrize=True, diagonal=diagonal)


def knn_soft_labels_cpu(x: torch.Tensor, cameras: torch.Tensor, num_cameras: int, k: int,
                        precision: str) -> torch.Tensor:
    """See :func:`fastassoc.knn_soft_labels`; ``precision`` is ignored (full float32 on CPU)."""
    num_nodes = x.shape[0]
    order, offsets = _group_by_camera(cameras, num_cameras)
    dtype = _core.compute_dtype(x)
    xs = _core.prepare(x if order is None else x[order], "sqeuclidean")
    norms = _core.squared_norms(xs, "sqeuclidean")
    positions = torch.arange(num_nodes, dtype=torch.int64)
    self_weights = torch.ones(num_nodes, dtype=dtype)
    blocks = [(offsets[t], offsets[t + 1]) for t in range(num_cameras) if min(k, offsets[t + 1] - offsets[t] - 1) > 0]
    sources, targets, weights = [positions], [positions], [self_weights]
    for t0, t1 in blocks:
        width = min(k, t1 - t0 - 1)
        values, indices = new_lists(t1 - t0, width, dtype)
        topk_self_join(xs[t0:t1], "sqeuclidean", width, (values, indices), norms=norms[t0:t1], base=t0,
                       exclude_self=True)
        # UTAL Eqs. 5-6, written as the reference writes them so the float rounding matches.
        sigma_sq = (values.to(torch.float64).sum() / values.numel()).to(dtype)
        weight = torch.exp(-values / sigma_sq) if bool(sigma_sq > 0) else torch.ones_like(values)
        row_sums = 1.0 + weight.sum(1)
        self_weights[t0:t1] = 1.0 / row_sums
        sources.append(positions[t0:t1].unsqueeze(1).expand_as(indices).reshape(-1))
        targets.append(indices.reshape(-1))
        weights.append((weight / row_sums.unsqueeze(1)).reshape(-1))
    sources, targets, weights = torch.cat(sources), torch.cat(targets), torch.cat(weights)
    if order is not None:
        sources, targets = order[sources], order[targets]
    return _csr(num_nodes, sources, targets, weights, symmetrize=False, diagonal=None)
